"""DALL·E mini / Mega beyond text-to-image: inpainting, variations, scores, classification and compression through
the dVAE models' pipelines (`DalleMiniFamily` mixed in), on tiny random weights with the VQGAN's codebook size; a
VQGAN without its encoder (a min-dalle conversion) refuses every image input with a clear error."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import BartTokenizerFast

from dalle_hf.cli import main as cli_main
from dalle_hf.compression import FLAG_RAW, CompressionError, LikelihoodCoder
from dalle_hf.image_processing import image_to_tensor
from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
from dalle_hf.pipeline_dalle_inpaint import DalleInpaintPipelineOutput
from dalle_hf.pipeline_dalle_mini import (
    DalleMiniImageVariationPipeline,
    DalleMiniInpaintPipeline,
    DalleMiniPipeline,
)
from tests.dalle_bart_reference import randomize, tiny_bart_config, tiny_vqgan, write_tiny_bart_tokenizer


PROMPT = "a cat wearing a hat"


@pytest.fixture(scope="module")
def bart_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bart-tokenizer")
    write_tiny_bart_tokenizer(folder)
    return BartTokenizerFast.from_pretrained(folder, model_max_length=64)


@pytest.fixture(scope="module")
def components(bart_tokenizer):
    """Tokenizer, transformer and VQGAN of a tiny DALL·E mini; the head scaled up so that the model is confident
    (codes it samples cost far fewer than the 14 bits of a uniform code)."""
    transformer = randomize(DalleBartForImageGeneration(tiny_bart_config()))
    with torch.no_grad():
        transformer.decoder.lm_head.weight.mul_(4)
    return {"tokenizer": bart_tokenizer, "transformer": transformer, "vae": tiny_vqgan()}


def make(pipeline_class, components, **kwargs):
    pipe = pipeline_class(**components, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def picture():
    """A 32 x 32 RGB image (the tiny VQGAN's size) with structure, as a PIL image."""
    y, x = np.mgrid[0:32, 0:32]
    array = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).clip(0, 255).astype(np.uint8)
    return PIL.Image.fromarray(array)


def test_inpainting_keeps_every_pixel_outside_the_mask(components, picture):
    inpaint = make(DalleMiniInpaintPipeline, components)
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:20, 16:30] = True  # rows 4-9, columns 8-14 of the 16 x 16 cells (2 px each)
    out = inpaint(PROMPT, image=picture, mask_image=mask, num_images_per_prompt=3, num_images_to_keep=2,
                  top_k=64, generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    assert isinstance(out, DalleInpaintPipelineOutput) and out.ranked_by == "likelihood"  # no CLIP model
    assert out.images.shape == (2, 3, 32, 32) and out.image_tokens.shape == (2, 16, 16)
    original = image_to_tensor(picture, 32)  # (1, 3, 32, 32)
    outside = torch.from_numpy(~mask).expand(2, 3, 32, 32)
    assert torch.equal(out.images[outside], original.expand(2, 3, 32, 32)[outside])  # exactly, every pixel
    assert not torch.equal(out.images, original.expand(2, 3, 32, 32))  # the masked region was repainted
    expected_cells = torch.zeros(16, 16, dtype=torch.bool)
    expected_cells[4:10, 8:15] = True
    assert torch.equal(out.cell_mask, expected_cells)
    codes = inpaint.encode_images([picture])[0]  # (16, 16): the VQGAN encoder's codes of the input
    assert torch.equal(out.image_tokens[:, ~expected_cells], codes[~expected_cells].expand(2, -1))
    assert (out.image_tokens[:, expected_cells] != codes[expected_cells]).any()
    again = inpaint(PROMPT, image=picture, mask_image=mask, num_images_per_prompt=3, num_images_to_keep=2,
                    top_k=64, generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    assert torch.equal(again.image_tokens, out.image_tokens) and torch.equal(again.images, out.images)


def test_task_pipelines_share_the_modules_and_settings(components, picture):
    pipe = make(DalleMiniPipeline, components, default_guidance_scale=7.0, vae_has_encoder=False)
    inpaint = DalleMiniInpaintPipeline.from_pipe(pipe)
    variations = DalleMiniImageVariationPipeline.from_pipe(pipe)
    for task in (inpaint, variations):
        assert task.transformer is pipe.transformer and task.vae is pipe.vae  # one copy of the weights
        assert task.config.default_guidance_scale == 7.0 and task.config.vae_has_encoder is False
    with pytest.raises(ValueError, match="no encoder weights"):
        variations(picture)
    inpaint = DalleMiniInpaintPipeline.from_pipe(pipe, vae_has_encoder=True)
    inpaint.set_progress_bar_config(disable=True)
    assert inpaint.config.default_guidance_scale == 7.0 and inpaint.image_size == 32
    assert inpaint.codebook_size == 16384
    with pytest.raises(ValueError, match="mask_image is empty"):
        inpaint(PROMPT, image=picture, mask_image=np.zeros((32, 32), dtype=bool))


def test_variations_keep_the_top_rows_and_are_seeded(components, picture):
    variations = make(DalleMiniImageVariationPipeline, components)
    out = variations(picture, num_rows_to_keep=6, num_images_per_prompt=3, num_images_to_keep=2, top_k=64,
                     generator=torch.Generator().manual_seed(1), output_type="pt")  # fmt: skip
    assert out.images.shape == (2, 3, 32, 32) and out.image_tokens.shape == (2, 16, 16)
    assert out.clip_scores is None and 0 <= out.images.min() and out.images.max() <= 1
    codes = variations.encode_images([picture])[0]  # (16, 16)
    assert torch.equal(out.image_tokens[:, :6], codes[:6].expand(2, -1, -1))  # the kept rows
    assert not torch.equal(out.image_tokens[0, 6:], out.image_tokens[1, 6:])  # two different completions
    again = variations(picture, num_rows_to_keep=6, num_images_per_prompt=3, num_images_to_keep=2, top_k=64,
                       generator=torch.Generator().manual_seed(1), output_type="pt")  # fmt: skip
    assert torch.equal(again.image_tokens, out.image_tokens) and torch.equal(again.images, out.images)
    other = variations(picture, num_rows_to_keep=6, num_images_per_prompt=3, num_images_to_keep=2, top_k=64,
                       generator=torch.Generator().manual_seed(2), output_type="pt")  # fmt: skip
    assert not torch.equal(other.image_tokens, out.image_tokens)
    with pytest.raises(ValueError, match=r"num_rows_to_keep must be an int in \[0, 15\]"):
        variations(picture, num_rows_to_keep=16)


def test_scores_and_classification_of_images(components, picture):
    pipe = make(DalleMiniPipeline, components)
    score = pipe.score(images=[picture, picture.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)], captions=PROMPT)
    assert score.image_tokens.shape == (2, 16, 16)
    assert torch.isfinite(score.log_likelihood).all() and (score.log_likelihood < 0).all()
    codes = pipe.encode_images([picture])  # (1, 16, 16)
    from_codes = pipe.score(image_tokens=codes, captions=PROMPT)
    assert torch.equal(from_codes.log_likelihood, score.log_likelihood[:1])  # images -> the same codes -> same score
    ranked = pipe.classify(picture, [PROMPT, "a red hat", ""])
    assert sorted(ranked.captions) == sorted([PROMPT, "a red hat", ""])
    torch.testing.assert_close(ranked.probabilities.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (ranked.log_likelihood[:-1] >= ranked.log_likelihood[1:]).all()  # most likely first
    # the empty caption is the unconditional prompt: its log-likelihood ratio is 0
    assert ranked.log_likelihood_ratio[ranked.captions.index("")].abs() < 1e-9


def sampled_codes(pipe, seed=0) -> torch.LongTensor:
    """(16, 16) codes drawn from the model itself given PROMPT: cheap under it."""
    tokens = pipe.sample_image_tokens(pipe.encode_prompt([PROMPT]), generator=torch.Generator().manual_seed(seed))
    return tokens.view(16, 16)


def test_compression_round_trip_is_exact(components, picture):
    pipe = make(DalleMiniPipeline, components)
    coder = LikelihoodCoder(pipe)
    codes = sampled_codes(pipe)
    data = coder.compress_codes(codes, PROMPT)
    header, payload = coder.read_header(data)
    assert header.flags == 0 and header.grid_size == 16 and header.caption == PROMPT  # range-coded
    assert len(payload) < 256 * 14 / 8  # fewer bytes than the raw 14-bit codes
    out = coder.decompress(data)
    assert torch.equal(out.image_tokens, codes) and out.image.size == (32, 32)
    expected = pipe.postprocess(pipe.decode_image_tokens(codes.flatten()[None]), "pil")[0]
    assert np.array_equal(np.asarray(out.image), np.asarray(expected))
    # an image: its VQGAN codes, exactly back
    data = coder.compress_image(picture, PROMPT)
    assert torch.equal(coder.decompress(data).image_tokens, pipe.encode_images([picture])[0])


def test_compression_with_megas_wider_head(bart_tokenizer):
    """Mega's head has 16415 + 1 rows but 16384 codes: the coder codes over the 16384 that are codes."""
    transformer = randomize(DalleBartForImageGeneration(tiny_bart_config(image_vocab_size=16415)))
    with torch.no_grad():
        transformer.decoder.lm_head.weight.mul_(4)
    pipe = make(DalleMiniPipeline, {"tokenizer": bart_tokenizer, "transformer": transformer, "vae": tiny_vqgan()})
    coder = LikelihoodCoder(pipe)
    assert coder.vocab_size == 16384 and coder.raw_bits == 14
    codes = sampled_codes(pipe, seed=3)
    data = coder.compress_codes(codes, PROMPT)
    assert coder.read_header(data)[0].flags == 0
    assert torch.equal(coder.decompress(data).image_tokens, codes)
    raw = coder.compress_codes(torch.randint(0, 16384, (16, 16), generator=torch.Generator().manual_seed(0)))
    assert coder.read_header(raw)[0].flags == FLAG_RAW  # uniform codes: coding would not save bytes
    assert coder.decompress(raw).image_tokens.max() < 16384


def test_another_models_file_is_refused(components, bart_tokenizer):
    pipe = make(DalleMiniPipeline, components)
    data = LikelihoodCoder(pipe).compress_codes(sampled_codes(pipe), PROMPT)
    other = make(DalleMiniPipeline, {**components, "transformer": randomize(
        DalleBartForImageGeneration(tiny_bart_config()), seed=1)})  # fmt: skip
    with pytest.raises(CompressionError, match="compressed with another model"):
        LikelihoodCoder(other).decompress(data)
    other_vqgan = make(DalleMiniPipeline, {**components, "vae": tiny_vqgan(seed=1)})
    with pytest.raises(CompressionError, match="compressed with another model"):
        LikelihoodCoder(other_vqgan).decompress(data)


def test_a_vqgan_without_encoder_refuses_image_inputs(components, picture):
    """A min-dalle conversion (its detoker.pt is the VQGAN's decoder only): generation, scores of codes and
    compression of codes work; every path that needs an image's codes is refused, naming the fix."""
    mask = np.zeros((32, 32), dtype=bool)
    mask[:8] = True
    calls = {
        "inpainting": lambda: make(DalleMiniInpaintPipeline, components, vae_has_encoder=False)(
            PROMPT, image=picture, mask_image=mask),
        "variations": lambda: make(DalleMiniImageVariationPipeline, components, vae_has_encoder=False)(picture),
        "score": lambda: make(DalleMiniPipeline, components, vae_has_encoder=False).score([picture], PROMPT),
        "classify": lambda: make(DalleMiniPipeline, components, vae_has_encoder=False).classify(
            picture, [PROMPT, "a red hat"]),
        "compress": lambda: LikelihoodCoder(make(DalleMiniPipeline, components, vae_has_encoder=False))
        .compress_image(picture, PROMPT),
    }  # fmt: skip
    for name, call in calls.items():
        with pytest.raises(ValueError, match="no encoder weights.*--flax DIR --vqgan DIR"):
            call()
    decoder_only = make(DalleMiniPipeline, components, vae_has_encoder=False)
    codes = sampled_codes(decoder_only)
    assert torch.isfinite(decoder_only.score(image_tokens=codes[None], captions=PROMPT).log_likelihood).all()
    coder = LikelihoodCoder(decoder_only)
    assert torch.equal(coder.decompress(coder.compress_codes(codes, PROMPT)).image_tokens, codes)


def test_cli_compress_and_decompress_a_saved_mini_pipeline(components, picture, tmp_path, capsys):
    folder = tmp_path / "dalle-mini-tiny"
    make(DalleMiniPipeline, components).save_pretrained(folder)
    picture.save(tmp_path / "in.png")
    assert cli_main(["compress", str(tmp_path / "in.png"), "--caption", PROMPT, "--pipeline", str(folder),
                     "--out", str(tmp_path / "in.dhfc")]) == 0  # fmt: skip
    assert "the uniform code is 14 bits per code" in capsys.readouterr().out
    assert cli_main(["decompress", str(tmp_path / "in.dhfc"), "--pipeline", str(folder),
                     "--out", str(tmp_path / "out.png")]) == 0  # fmt: skip
    assert f"256 codes, caption {PROMPT!r}" in capsys.readouterr().out
    pipe = DalleMiniPipeline.from_pretrained(folder)
    codes = pipe.encode_images([picture])  # (1, 16, 16)
    expected = pipe.postprocess(pipe.decode_image_tokens(codes.flatten(1)), "pil")[0]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out.png")), np.asarray(expected))


def test_from_pipe_serves_the_dvae_family_too(pipe):
    from dalle_hf.pipeline_dalle import DallePipeline
    from dalle_hf.pipeline_dalle_inpaint import DalleInpaintPipeline

    guided = DallePipeline.from_pipe(pipe, default_guidance_scale=3.0)
    inpaint = DalleInpaintPipeline.from_pipe(guided)
    assert inpaint.config.default_guidance_scale == 3.0 and inpaint.transformer is pipe.transformer
    assert inpaint.clip_model is pipe.clip_model
    with pytest.raises(ValueError, match="must be a dalle-hf pipeline"):
        DalleInpaintPipeline.from_pipe(object())
