"""dalle_hf.compression: exact round trips of dVAE code grids under the transformer, and clear refusals."""

import copy
import zlib

import numpy as np
import PIL.Image
import pytest
import torch

from dalle_hf.compression import (
    CODING_THREADS,
    FLAG_RAW,
    CompressionError,
    LikelihoodCoder,
    NextCodeDistribution,
    codes_crc32,
    compress_codes,
    compress_image,
    decompress,
    model_fingerprint,
    pack_raw,
    pinned_num_threads,
    shortest_payload,
    unpack_raw,
)
from dalle_hf.modeling_dalle import DalleForImageGeneration
from dalle_hf.pipeline_dalle import DallePipeline

from .conftest import tiny_dalle_config
from .test_cli import dalle_hf_cli


@pytest.fixture
def sharp_pipe(pipe):
    """The tiny random model is nearly uniform over its 32 codes (about 5 bits each, what the raw codes cost): with
    its head scaled up it is confident, so codes it samples cost far less and the range coder is used."""
    with torch.no_grad():
        pipe.transformer.lm_head.weight.mul_(30)
    return pipe


def likely_codes(pipe, caption="a red circle", seed=0):
    """(4, 4) codes sampled from the model itself: cheap under it."""
    tokens = pipe.sample_image_tokens(pipe.encode_prompt([caption]), generator=torch.Generator().manual_seed(seed))
    return tokens.view(4, 4)


def with_valid_trailer(data: bytes) -> bytes:
    """Recompute the file CRC after an edit, to reach the checks behind it."""
    body = data[:-4]
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_round_trip_is_exact_and_codes_under_the_model(sharp_pipe):
    codes = likely_codes(sharp_pipe)
    coder = LikelihoodCoder(sharp_pipe)
    data = coder.compress_codes(codes, "a red circle")
    header, payload = coder.read_header(data)
    assert header.flags == 0 and header.caption == "a red circle" and header.grid_size == 4
    assert header.codes_crc32 == codes_crc32(codes.flatten().numpy())
    bits = -sharp_pipe.score(image_tokens=codes[None], captions="a red circle").log_likelihood_bits.item()
    assert len(payload) < len(pack_raw(codes.flatten().numpy(), 5))  # cheaper than 5 bits a code
    assert 8 * len(payload) <= bits + 16  # within two bytes of the model's cross-entropy
    out = decompress(sharp_pipe, data)
    assert torch.equal(out.image_tokens, codes) and out.caption == "a red circle"
    assert isinstance(out.image, PIL.Image.Image) and out.image.size == (16, 16)
    reconstruction = sharp_pipe.postprocess(sharp_pipe.decode_image_tokens(codes.flatten()[None]), "pil")[0]
    assert np.array_equal(np.asarray(out.image), np.asarray(reconstruction))
    decoded_codes, image = out  # unpacks as (codes, image)
    assert decoded_codes is out.image_tokens and image is out.image


def test_the_caption_conditions_the_code(sharp_pipe):
    codes = likely_codes(sharp_pipe, "a blue square", seed=1)
    coder = LikelihoodCoder(sharp_pipe)
    for caption in ["a blue square", "", "a green triangle left of a yellow diamond"]:
        assert torch.equal(coder.decompress(coder.compress_codes(codes, caption)).image_tokens, codes)


@pytest.mark.parametrize("encode_threads, decode_threads", [(1, 2), (2, 1)])
def test_round_trip_across_thread_counts(sharp_pipe, encode_threads, decode_threads):
    codes = likely_codes(sharp_pipe, seed=2)
    with pinned_num_threads(encode_threads):
        data = compress_codes(sharp_pipe, codes, "three small circles")
    with pinned_num_threads(decode_threads):
        assert torch.equal(decompress(sharp_pipe, data).image_tokens, codes)
        assert compress_codes(sharp_pipe, codes, "three small circles") == data  # the same bytes


def test_probabilities_are_computed_on_pinned_threads_and_the_count_is_restored(sharp_pipe, monkeypatch):
    seen = []
    original = NextCodeDistribution.probabilities

    def recording(self):
        seen.append(torch.get_num_threads())
        return original(self)

    monkeypatch.setattr(NextCodeDistribution, "probabilities", recording)
    with pinned_num_threads(2):
        compress_codes(sharp_pipe, likely_codes(sharp_pipe), "a red circle")
        assert torch.get_num_threads() == 2
    assert seen and set(seen) == {CODING_THREADS}


def test_probabilities_are_float64_and_agree_with_the_teacher_forced_pass(sharp_pipe):
    codes = likely_codes(sharp_pipe).flatten()
    ids = sharp_pipe.encode_prompt(["a red circle"])
    with torch.no_grad():
        distribution = NextCodeDistribution(sharp_pipe.transformer, ids)
        cached = []
        for i, code in enumerate(codes.tolist()):
            cached.append(distribution.probabilities())
            if i + 1 < len(codes):
                distribution.advance(code)
        out = sharp_pipe.transformer(input_ids=ids, image_ids=codes[None, :-1])
        forced = sharp_pipe.transformer.image_log_probs(out.last_hidden_state[0, 8:]).exp().numpy()  # (16, 32)
    cached = np.stack(cached)
    assert cached.dtype == np.float64 and cached.shape == (16, 32)
    np.testing.assert_allclose(cached.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(cached, forced, rtol=1e-4, atol=1e-7)  # two paths: close, not bit-identical


def test_raw_fallback_when_coding_would_not_save_bytes(pipe):
    codes = torch.randint(0, 32, (4, 4), generator=torch.Generator().manual_seed(0))  # ~5 bits each: no saving
    coder = LikelihoodCoder(pipe)
    data = coder.compress_codes(codes, "a red circle")
    header, payload = coder.read_header(data)
    assert header.flags == FLAG_RAW and payload == pack_raw(codes.flatten().numpy(), 5) and len(payload) == 10
    assert torch.equal(coder.decompress(data).image_tokens, codes)


def test_pack_raw_round_trips():
    codes = np.random.default_rng(0).integers(0, 512, 256)
    packed = pack_raw(codes, 9)
    assert len(packed) == 288 and np.array_equal(unpack_raw(packed, 256, 9), codes)
    with pytest.raises(CompressionError, match="expected 288"):
        unpack_raw(packed[:-1], 256, 9)


def test_shortest_payload_stays_near_the_cross_entropy():
    import constriction

    Categorical = constriction.stream.model.Categorical
    shortened = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        probabilities = rng.dirichlet(np.full(64, 0.05), size=50)  # (50, 64)
        codes = np.array([rng.choice(64, p=p) for p in probabilities])
        encoder = constriction.stream.queue.RangeEncoder()
        for code, p in zip(codes, probabilities):
            encoder.encode(int(code), Categorical(p, perfect=False))
        words = encoder.get_compressed().astype(">u4").tobytes()
        payload = shortest_payload(words, codes, probabilities)
        bits = -np.log2(probabilities[np.arange(50), codes]).sum()
        assert len(payload) <= len(words) and 8 * len(payload) <= bits + 16
        shortened += len(payload) < len(words)
        padded = payload + b"\0" * (-len(payload) % 4)
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(padded, dtype=">u4").astype(np.uint32))
        assert [decoder.decode(Categorical(p, perfect=False)) for p in probabilities] == codes.tolist()
    assert shortened >= 4  # whole sealed words usually carry spare bytes


def test_every_flipped_byte_is_refused(sharp_pipe):
    coder = LikelihoodCoder(sharp_pipe)
    data = coder.compress_codes(likely_codes(sharp_pipe), "a red circle")
    for i in range(len(data)):
        corrupted = bytearray(data)
        corrupted[i] ^= 0x10
        expected = "not a dalle-hf compressed file" if i < 4 else "corrupted"
        with pytest.raises(CompressionError, match=expected):
            coder.decompress(bytes(corrupted))
    with pytest.raises(CompressionError, match="corrupted"):
        coder.decompress(data[:-1])  # truncated
    with pytest.raises(CompressionError, match="not a dalle-hf"):
        coder.decompress(b"")
    with pytest.raises(ValueError, match="data must be bytes"):
        coder.decompress("a string")


@pytest.mark.parametrize("sharp", [True, False])  # range-coded, raw
def test_codes_that_do_not_match_their_crc_are_refused(pipe, sharp):
    if sharp:
        with torch.no_grad():
            pipe.transformer.lm_head.weight.mul_(30)
    coder = LikelihoodCoder(pipe)
    unlikely = torch.randint(0, 32, (4, 4), generator=torch.Generator().manual_seed(0))
    data = coder.compress_codes(likely_codes(pipe) if sharp else unlikely, "a red circle")
    header, payload = coder.read_header(data)
    assert header.flags == (0 if sharp else FLAG_RAW)
    wrong_crc = bytearray(data)
    wrong_crc[26] ^= 0x01  # the codes' CRC-32 field (after magic, version, flags, fingerprint and grid size)
    with pytest.raises(CompressionError, match="do not match the file's CRC-32"):
        coder.decompress(with_valid_trailer(bytes(wrong_crc)))
    wrong_payload = bytearray(data)
    wrong_payload[len(data) - 4 - len(payload)] ^= 0x80  # the payload's first byte
    with pytest.raises(CompressionError, match="do not match the file's CRC-32"):
        coder.decompress(with_valid_trailer(bytes(wrong_payload)))


def test_another_model_is_refused(sharp_pipe, tokenizer):
    data = compress_codes(sharp_pipe, likely_codes(sharp_pipe), "a red circle")
    torch.manual_seed(1)
    other_transformer = DalleForImageGeneration(tiny_dalle_config()).eval()
    other = DallePipeline(tokenizer=tokenizer, transformer=other_transformer, vae=sharp_pipe.vae)
    with pytest.raises(CompressionError, match="compressed with another model"):
        decompress(other, data)
    changed_vae = copy.deepcopy(sharp_pipe.vae)
    with torch.no_grad():
        next(changed_vae.parameters()).add_(1e-3)
    other_vae = DallePipeline(tokenizer=tokenizer, transformer=sharp_pipe.transformer, vae=changed_vae)
    assert model_fingerprint(other_vae) != model_fingerprint(sharp_pipe)
    with pytest.raises(CompressionError, match="another model"):
        decompress(other_vae, data)
    half_transformer = copy.deepcopy(sharp_pipe.transformer).to(torch.bfloat16)
    half = DallePipeline(tokenizer=tokenizer, transformer=half_transformer, vae=sharp_pipe.vae)
    with pytest.raises(CompressionError, match="same dtype"):
        decompress(half, data)


def test_compress_time_decode_check_catches_nondeterministic_probabilities(sharp_pipe, monkeypatch):
    original = NextCodeDistribution.probabilities
    calls = []

    def drifting(self):  # the second pass (the decode check) sees slightly different numbers
        calls.append(1)
        p = original(self)
        if len(calls) > 16:
            p = p[::-1].copy()
        return p

    monkeypatch.setattr(NextCodeDistribution, "probabilities", drifting)
    with pytest.raises(RuntimeError, match="decode-after-encode check failed"):
        compress_codes(sharp_pipe, likely_codes(sharp_pipe), "a red circle")


def test_compress_image_accepts_images_and_paths(sharp_pipe, tmp_path):
    image = sharp_pipe.postprocess(sharp_pipe.decode_image_tokens(likely_codes(sharp_pipe).flatten()[None]), "pil")[0]
    path = tmp_path / "in.png"
    image.save(path)
    data = compress_image(sharp_pipe, image, "a red circle")
    assert compress_image(sharp_pipe, str(path), "a red circle") == data
    codes, _ = decompress(sharp_pipe, data)
    assert torch.equal(codes, sharp_pipe.encode_images([image])[0])


@pytest.mark.parametrize(
    "codes, caption, match",
    [
        (torch.zeros(3, 3, dtype=torch.long), "a", r"one \(4, 4\) grid"),
        (torch.full((4, 4), 32), "a", r"codes in \[0, 32\)"),
        (torch.zeros(4, 4, dtype=torch.long), None, "caption must be a str"),
        (torch.zeros(4, 4, dtype=torch.long), "x" * 70000, "at most 65535"),
    ],
)
def test_compress_codes_validates(pipe, codes, caption, match):
    with pytest.raises(ValueError, match=match):
        compress_codes(pipe, codes, caption)


def test_cli_round_trip(sharp_pipe, tmp_path):
    sharp_pipe.save_pretrained(tmp_path / "pipe")
    image = sharp_pipe.postprocess(sharp_pipe.decode_image_tokens(likely_codes(sharp_pipe).flatten()[None]), "pil")[0]
    image.save(tmp_path / "in.png")
    result = dalle_hf_cli("compress", str(tmp_path / "in.png"), "--caption", "a red circle", "--pipeline",
                          str(tmp_path / "pipe"), "--out", str(tmp_path / "in.dhfc"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bits per code" in result.stdout
    data = (tmp_path / "in.dhfc").read_bytes()
    assert data == compress_image(sharp_pipe, image, "a red circle")
    result = dalle_hf_cli("decompress", str(tmp_path / "in.dhfc"), "--pipeline", str(tmp_path / "pipe"), "--out",
                          str(tmp_path / "out.png"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    expected = decompress(sharp_pipe, data).image
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out.png")), np.asarray(expected))
    (tmp_path / "bad.dhfc").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    result = dalle_hf_cli("decompress", str(tmp_path / "bad.dhfc"), "--pipeline", str(tmp_path / "pipe"), "--out",
                          str(tmp_path / "bad.png"))  # fmt: skip
    assert result.returncode == 2 and "corrupted" in result.stderr and not (tmp_path / "bad.png").exists()
    help_text = " ".join(dalle_hf_cli("compress", "--help").stdout.split())
    assert "lossless for the codes" in help_text.lower() and "lossy for the pixels" in help_text.lower()


def test_fingerprint_ignores_the_tokenizers_call_state(pipe):
    backend = pipe.tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    before = model_fingerprint(pipe)
    pipe.encode_prompt(["a red circle"])  # sets the backend's truncation and padding in place
    assert backend.truncation is not None and backend.padding is not None
    assert model_fingerprint(pipe) == before


def test_fingerprint_covers_dynamically_quantized_weights(pipe, tokenizer):
    from dalle_hf.quantization import quantize_dynamic_int8

    quantized = quantize_dynamic_int8(copy.deepcopy(pipe))
    changed = copy.deepcopy(pipe)
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight.mul_(2)
    assert model_fingerprint(quantize_dynamic_int8(changed)) != model_fingerprint(quantized)
