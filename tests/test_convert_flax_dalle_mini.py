"""The Flax DALL·E mini reader and key mapping against files dalle-mini 0.1.5's own code wrote.

`tests/fixtures/dalle_mini/{scan,unscanned}/` hold `config.json` + `flax_model.msgpack` from `DalleBart.save_pretrained`
at tiny shapes (written by `make_fixtures.py` under jax; the suite needs no jax), with the decoder's position table
written as a chunked array; `dalle_mini_reference.npz` holds dalle-mini's own encoder states and teacher-forced
logits for them. The converted weights go into min-dalle 0.4.11's classes, whose keys are ours (prefixed, minus the
LayerNorms without a scale), and must give dalle-mini's numbers.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dalle_hf.convert_flax_dalle_mini import (
    config_kwargs_from_flax,
    flax_key_to_ours,
    flax_to_state_dict,
    resolve_snapshot,
)
from dalle_hf.flax_msgpack import flax_msgpack_shapes, iter_flax_msgpack, read_flax_msgpack, write_flax_msgpack
from tests.fixtures.dalle_mini.reference import UNSCALED_NORMS, load_min_dalle_models, min_dalle_state_shapes

FIXTURES = Path(__file__).parent / "fixtures" / "dalle_mini"
LAYOUTS = ("scan", "unscanned")


def tiny_kwargs(layout="scan"):
    config = json.loads((FIXTURES / layout / "config.json").read_text())
    return config_kwargs_from_flax(config, flax_msgpack_shapes(FIXTURES / layout / "flax_model.msgpack"))


@pytest.fixture(scope="module")
def min_dalle():
    """min-dalle's encoder and decoder at the fixture's shapes, and our expected keys and shapes."""
    models = load_min_dalle_models()
    c = SimpleNamespace(**tiny_kwargs())
    torch.manual_seed(0)
    encoder = models.DalleBartEncoder(
        layer_count=c.encoder_layers, embed_count=c.d_model, attention_head_count=c.attention_heads,
        text_vocab_count=c.text_vocab_size, text_token_count=c.text_seq_len, glu_embed_count=c.glu_dim, device="cpu",
    ).eval()  # fmt: skip
    decoder = models.DalleBartDecoder(
        image_vocab_count=c.image_vocab_size, embed_count=c.d_model, attention_head_count=c.attention_heads,
        glu_embed_count=c.glu_dim, layer_count=c.decoder_layers, device="cpu",
    ).eval()  # fmt: skip
    return encoder, decoder, min_dalle_state_shapes(encoder, decoder)


def test_config_read_from_published_config_and_checked_against_shapes():
    kwargs = tiny_kwargs("scan")
    assert kwargs == dict(
        text_vocab_size=64, image_vocab_size=48, text_seq_len=8, image_seq_len=256, d_model=16, encoder_layers=2,
        decoder_layers=2, glu_dim=24, attention_heads=2, decoder_start_token_id=48, sampled_image_vocab_size=48,
    )  # fmt: skip
    assert tiny_kwargs("unscanned") == kwargs
    config = json.loads((FIXTURES / "scan" / "config.json").read_text())
    shapes = flax_msgpack_shapes(FIXTURES / "scan" / "flax_model.msgpack")
    with pytest.raises(ValueError, match=r"config.json says encoder_ffn_dim=30 but the tensors .* say 24"):
        config_kwargs_from_flax({**config, "encoder_ffn_dim": 30, "decoder_ffn_dim": 30}, shapes)
    with pytest.raises(ValueError, match=r"config.json says decoder_layers=3 but the tensors .* say 2"):
        config_kwargs_from_flax({**config, "decoder_layers": 3}, shapes)
    with pytest.raises(ValueError, match="force_ln_scale=True is a dalle-mini variant dalle-hf does not implement"):
        config_kwargs_from_flax({**config, "force_ln_scale": True}, shapes)
    with pytest.raises(ValueError, match="ln_positions='swinv2'"):
        config_kwargs_from_flax({**config, "ln_positions": "swinv2"}, shapes)
    with pytest.raises(ValueError, match="model_type 'dallebart'"):
        config_kwargs_from_flax({**config, "model_type": "bart"}, shapes)
    del shapes["model/decoder/embed_tokens/embedding"]
    with pytest.raises(ValueError, match="missing tensor 'model/decoder/embed_tokens/embedding'"):
        config_kwargs_from_flax(config, shapes)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_flax_key_maps_onto_min_dalles_keys_and_shapes(layout, min_dalle):
    """All keys of dalle-mini's real tree map; the result has exactly min-dalle's keys minus the no-scale weights."""
    _, _, expected = min_dalle
    params = read_flax_msgpack(FIXTURES / layout / "flax_model.msgpack")
    assert all(flax_key_to_ours(k) is not None for k in params)
    state = flax_to_state_dict(params, SimpleNamespace(**tiny_kwargs(layout)), expected_shapes=expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in state.values())
    assert not any(k.endswith(f"{n}.weight") for k in state for n in UNSCALED_NORMS)
    # values follow dalle-mini's naming: kernels transposed, scan slices per layer, LayerNorm scale -> weight
    layers = "FlaxBartDecoderLayers" if layout == "scan" else "FlaxBartDecoderLayer_1"
    index = (1,) if layout == "scan" else ()
    pick = lambda key: params[f"model/decoder/layers/{layers}/{key}"][index]  # noqa: E731
    k_proj = pick("FlaxBartAttention_1/k_proj/kernel")
    np.testing.assert_array_equal(state["decoder.layers.1.encoder_attn.k_proj.weight"], k_proj.T)
    np.testing.assert_array_equal(state["decoder.layers.1.glu.fc2.weight"], pick("GLU_0/Dense_2/kernel").T)
    np.testing.assert_array_equal(state["decoder.layers.1.encoder_attn_layer_norm.weight"], pick("LayerNorm_3/scale"))
    np.testing.assert_array_equal(state["decoder.layers.1.pre_encoder_attn_layer_norm.bias"], pick("LayerNorm_2/bias"))
    np.testing.assert_array_equal(state["decoder.lm_head.weight"], params["lm_head/kernel"].T)
    positions = params["model/decoder/embed_positions/embedding"]
    np.testing.assert_array_equal(state["decoder.embed_positions.weight"], positions)


def test_fixture_has_a_chunked_array_read_whole():
    """dalle-mini's decoder position table was written by flax as a `__msgpack_chunked_array__` of two chunks."""
    data = (FIXTURES / "scan" / "flax_model.msgpack").read_bytes()
    assert data.count(b"__msgpack_chunked_array__") == 1
    table = read_flax_msgpack(FIXTURES / "scan" / "flax_model.msgpack")["model/decoder/embed_positions/embedding"]
    assert table.shape == (256, 16) and table.dtype == np.float32
    assert np.all(np.isfinite(table)) and table[:128].std() > 0 and table[128:].std() > 0  # both chunks filled
    shapes = flax_msgpack_shapes(FIXTURES / "scan" / "flax_model.msgpack")
    assert shapes["model/decoder/embed_positions/embedding"] == (256, 16)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_weights_give_dalle_minis_own_outputs(layout, min_dalle):
    """Loaded into min-dalle's classes, the converted weights reproduce dalle-mini's encoder states and logits."""
    encoder, decoder, expected = min_dalle
    stream = iter_flax_msgpack(FIXTURES / layout / "flax_model.msgpack")
    state = flax_to_state_dict(stream, SimpleNamespace(**tiny_kwargs(layout)), expected_shapes=expected)
    for prefix, module in (("encoder.", encoder), ("decoder.", decoder)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        result = module.load_state_dict(part, strict=False)
        assert not result.unexpected_keys
        assert all(any(k.endswith(f"{n}.weight") for n in UNSCALED_NORMS) for k in result.missing_keys)
        for key in result.missing_keys:  # absent scales act as 1, as in dalle-mini
            module.get_parameter(key).data.fill_(1.0)
    reference = np.load(FIXTURES / "dalle_mini_reference.npz")
    text = torch.from_numpy(reference["text_ids"]).long().repeat(2, 1)  # min-dalle's encoder takes two rows
    image = torch.from_numpy(reference["image_ids"]).long()
    with torch.no_grad():
        encoder_state = encoder(text)
        logits, _ = decoder(
            attention_mask=text.ne(1)[:, None, None, :], encoder_state=encoder_state,
            attention_state=torch.zeros(2, 4, 256, 16), prev_tokens=image, token_index=torch.arange(image.shape[1]),
        )  # fmt: skip
    np.testing.assert_allclose(encoder_state[0].numpy(), reference[f"{layout}_encoder_states"][0], atol=1e-5)
    np.testing.assert_allclose(logits[0].numpy(), reference[f"{layout}_logits"][0], atol=1e-5)


def test_dtype_cast_per_tensor(min_dalle):
    _, _, expected = min_dalle
    params = read_flax_msgpack(FIXTURES / "scan" / "flax_model.msgpack")
    state = flax_to_state_dict(params, SimpleNamespace(**tiny_kwargs()), expected_shapes=expected, dtype=torch.bfloat16)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    lm_head = torch.from_numpy(params["lm_head/kernel"].T.copy())
    torch.testing.assert_close(state["decoder.lm_head.weight"], lm_head.bfloat16())


def test_wrong_missing_and_unknown_tensors_are_named(min_dalle, tmp_path):
    _, _, expected = min_dalle
    config = SimpleNamespace(**tiny_kwargs())
    params = read_flax_msgpack(FIXTURES / "scan" / "flax_model.msgpack")
    source = "snapshot/flax_model.msgpack"
    wrong = {**params, "lm_head/kernel": params["lm_head/kernel"][:, :40]}
    with pytest.raises(ValueError, match=r"snapshot/flax_model.msgpack: tensor 'lm_head/kernel' has shape \(16, 40\); "
                       r"'decoder.lm_head.weight' needs \(49, 16\) transposed"):  # fmt: skip
        flax_to_state_dict(wrong, config, expected_shapes=expected, source=source)
    missing = {k: v for k, v in params.items() if "GLU_0/Dense_1" not in k}
    with pytest.raises(ValueError, match=r"missing tensor for 'encoder.layers.0.glu.fc1.weight' \(and 3 more\)"):
        flax_to_state_dict(missing, config, expected_shapes=expected, source=source)
    stack = "model/encoder/layers/FlaxBartEncoderLayers/LayerNorm_0"
    scaled = {**params, f"{stack}/scale": np.ones((2, 16), np.float32)}
    with pytest.raises(ValueError, match=f"unexpected tensor '{stack}/scale' .*force_ln_scale"):
        flax_to_state_dict(scaled, config, expected_shapes=expected, source=source)
    with pytest.raises(ValueError, match="unexpected tensor 'model/encoder/extra/kernel'"):
        flax_to_state_dict({**params, "model/encoder/extra/kernel": np.ones(2)}, config, expected_shapes=expected)
    three = {**params, f"{stack}/bias": np.zeros((3, 16), np.float32)}
    with pytest.raises(ValueError, match=f"'{stack}/bias' of shape \\(3, 16\\) should stack 2 encoder layers"):
        flax_to_state_dict(three, config, expected_shapes=expected)


def test_truncated_file_refused_naming_file_and_tensor(min_dalle, tmp_path):
    _, _, expected = min_dalle
    data = (FIXTURES / "scan" / "flax_model.msgpack").read_bytes()
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"flax_model.msgpack: file ends early .* while reading 'model/"):
        flax_msgpack_shapes(path)
    with pytest.raises(ValueError, match=r"flax_model.msgpack: file ends early .* while reading 'model/"):
        flax_to_state_dict(iter_flax_msgpack(path), SimpleNamespace(**tiny_kwargs()), expected_shapes=expected)


def test_hub_repo_id_resolves_from_an_offline_cache(tmp_path, monkeypatch):
    """`--flax dalle-mini/dalle-mini` goes through `snapshot_download`; offline it reads the HF cache."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--dalle-mini--dalle-mini" / "snapshots" / ("a" * 40)
    shutil.copytree(FIXTURES / "scan", snapshot)
    (cache / "models--dalle-mini--dalle-mini" / "refs").mkdir()
    (cache / "models--dalle-mini--dalle-mini" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    folder = resolve_snapshot("dalle-mini/dalle-mini", ["config.json", "flax_model.msgpack"])
    assert Path(folder) == snapshot and (Path(folder) / "flax_model.msgpack").is_file()
    assert resolve_snapshot(str(FIXTURES / "scan"), []) == str(FIXTURES / "scan")
    with pytest.raises(ValueError, match="expected a snapshot folder or a Hub repo id"):
        resolve_snapshot(str(tmp_path / "no" / "such" / "dir"), [])


def test_load_flax_dalle_mini_end_to_end(tmp_path, min_dalle):
    """config.json + flax_model.msgpack -> (DalleBartConfig, state dict); a bad file names the file and tensor."""
    pytest.importorskip("dalle_hf.configuration_dalle_bart", reason="DalleBartConfig comes from the bart branch")
    from dalle_hf.convert_flax_dalle_mini import load_flax_dalle_mini

    _, _, expected = min_dalle
    config, state = load_flax_dalle_mini(str(FIXTURES / "unscanned"), expected_shapes=expected)
    assert (config.d_model, config.glu_dim, config.decoder_layers, config.decoder_start_token_id) == (16, 24, 2, 48)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    folder = tmp_path / "snapshot"
    shutil.copytree(FIXTURES / "scan", folder)
    params = read_flax_msgpack(folder / "flax_model.msgpack")
    params["model/encoder/embed_tokens/embedding"] = params["model/encoder/embed_tokens/embedding"][:60]
    write_flax_msgpack(params, folder / "flax_model.msgpack")
    with pytest.raises(ValueError, match=r"says encoder_vocab_size=64 but the tensors of flax_model.msgpack say 60"):
        load_flax_dalle_mini(str(folder), expected_shapes=expected)
    (folder / "flax_model.msgpack").unlink()
    with pytest.raises(ValueError, match=r"expected .*snapshot/flax_model.msgpack"):
        load_flax_dalle_mini(str(folder), expected_shapes=expected)


def write_tiny_bpe(folder: Path):
    """A BART-style vocab.json / merges.txt of 40 tokens (the fixture's text vocabulary has 64 rows)."""
    merges = [("Ġ", "a"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "h"), ("Ġh", "at")]
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "Ġ", *letters, *("".join(m) for m in merges)]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def test_convert_flax_folder_loads_and_matches_dalle_minis_logits(tmp_path):
    """convert_flax on dalle-mini's own tiny files -> a folder DalleMiniPipeline loads; its transformer gives
    dalle-mini's encoder states and logits, and it generates and scores (the VQGAN's encoder is converted)."""
    pytest.importorskip("dalle_hf.convert_dalle_mini", reason="save_converted_pipeline comes from the bart branch")
    from dalle_hf import DalleMiniPipeline
    from dalle_hf.convert_flax_dalle_mini import convert_flax
    from tests.fixtures.dalle_mini.seeded import seeded_params

    flax_dir, vqgan_dir, out = tmp_path / "dalle-mini", tmp_path / "vqgan", tmp_path / "converted"
    shutil.copytree(FIXTURES / "scan", flax_dir)
    write_tiny_bpe(flax_dir)
    (flax_dir / "enwiki-words-frequency.txt").write_text("the 10\ncat 5\n")
    vqgan_dir.mkdir()
    vqgan = json.loads((FIXTURES / "vqgan_tiny.json").read_text())
    (vqgan_dir / "config.json").write_text(json.dumps(vqgan["config"]))
    write_flax_msgpack(seeded_params(vqgan["shapes"]), vqgan_dir / "flax_model.msgpack")
    convert_flax(str(flax_dir), str(vqgan_dir), str(out))
    card = (out / "README.md").read_text()
    assert "dalle-mini/dalle-mini" in card and "convert-dalle-mini --flax" in card and "apache-2.0" in card
    assert (out / "tokenizer" / "enwiki-words-frequency.txt").is_file()

    # the folder carries its code (DiffusionPipeline.from_pretrained(out, trust_remote_code=True) loads it:
    # tests/test_convert_dalle_mini.py); dalle-hf's class loads it with the installed modules
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dalle_mini", "DalleMiniPipeline"]
    pipe = DalleMiniPipeline.from_pretrained(str(out))
    assert type(pipe.transformer).__module__ == "dalle_hf.modeling_dalle_bart"
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "DalleMiniPipeline" and pipe.config.vae_has_encoder is True
    reference = np.load(FIXTURES / "dalle_mini_reference.npz")
    with torch.no_grad():
        output = pipe.transformer(
            input_ids=torch.from_numpy(reference["text_ids"]).long(),
            image_ids=torch.from_numpy(reference["image_ids"][:, 1:]).long(),  # after the start token, 48
        )  # fmt: skip
    encoder_states = output.encoder_last_hidden_state[0].numpy()
    np.testing.assert_allclose(encoder_states, reference["scan_encoder_states"][0], atol=1e-5)
    np.testing.assert_allclose(output.logits[0].numpy(), reference["scan_logits"][0], atol=1e-5)
    result = pipe("a cat", top_k=1, output_type="pt")
    assert result.images.shape == (1, 3, 32, 32) and result.image_tokens.shape == (1, 16, 16)
    assert result.image_tokens.max() < 48  # sampling keeps the first image_vocab_size logits
    scores = pipe.score(images=result.images, captions="a cat")  # through the converted VQGAN encoder
    assert scores.image_tokens.shape == (1, 16, 16) and scores.image_tokens.max() < 32
    assert torch.isfinite(scores.log_likelihood).all() and (scores.log_likelihood < 0).all()
