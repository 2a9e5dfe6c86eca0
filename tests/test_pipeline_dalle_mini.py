"""DalleMiniPipeline: DallePipeline's sampling over DALL·E mini's models, greedy generation token for token equal to
min-dalle 0.4.11's loop from start token 16384, CLIP reranking, scores, and the refusals."""

import pytest
import torch
from transformers import BartTokenizerFast

from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
from dalle_hf.pipeline_dalle import DallePipelineOutput
from dalle_hf.pipeline_dalle_mini import DalleMiniPipeline
from tests.dalle_bart_reference import (
    load_into_min_dalle,
    min_dalle_generate,
    min_dalle_modules,
    randomize,
    tiny_bart_config,
    tiny_vqgan,
    write_tiny_bart_tokenizer,
)

PROMPT = "a cat wearing a hat"


@pytest.fixture(scope="module")
def bart_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bart-tokenizer")
    write_tiny_bart_tokenizer(folder)
    return BartTokenizerFast.from_pretrained(folder, model_max_length=64)


@pytest.fixture(scope="module")
def mini_transformer():
    return randomize(DalleBartForImageGeneration(tiny_bart_config()))


@pytest.fixture
def mini_pipe(bart_tokenizer, mini_transformer, clip):
    pipe = DalleMiniPipeline(
        tokenizer=bart_tokenizer, transformer=mini_transformer, vae=tiny_vqgan(), clip_model=clip[0],
        clip_processor=clip[1],
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompts_and_the_unconditional_branch(mini_pipe):
    ids = mini_pipe.encode_prompt([PROMPT, " "])  # (2, 64)
    assert ids.shape == (2, 64)
    assert ids[0, 0] == 0 and (ids[0] == 2).sum() == 1 and ids[0, -1] == 1  # <s> ... </s> <pad> ...
    assert ids[1].tolist() == [0, 2] + [1] * 62  # the empty prompt: dalle-mini's unconditional branch
    assert torch.equal(mini_pipe.unconditional_ids(3), ids[1:].repeat(3, 1))
    assert mini_pipe.config.default_guidance_scale == 10.0
    assert mini_pipe.image_size == 32


@torch.no_grad()
def test_greedy_generation_equals_min_dalle_token_for_token(mini_pipe, mini_transformer):
    out = mini_pipe(PROMPT, num_images_per_prompt=2, top_k=1, output_type="pt")  # guidance: the default 10
    encoder, decoder = min_dalle_modules(mini_transformer.config)
    load_into_min_dalle(mini_transformer.state_dict(), encoder, decoder)
    text = torch.cat([mini_pipe.unconditional_ids(1), mini_pipe.encode_prompt([PROMPT])])  # (2, 64)
    reference = min_dalle_generate(encoder, decoder, text, 2, start_token=16384, top_k=1, supercondition_factor=10)
    assert out.image_tokens.shape == (2, 16, 16)
    assert torch.equal(out.image_tokens.flatten(1), reference)  # 512 of 512 tokens
    assert len(set(reference[0].tolist())) > 8  # not a constant image
    # min-dalle's own start token, 16383 (a real code), draws other images from the same weights
    own_start = min_dalle_generate(encoder, decoder, text, 1, start_token=16383, top_k=1, supercondition_factor=10)
    assert not torch.equal(own_start[0], reference[0])


def test_top_k_sampling_with_clip_reranking(mini_pipe):
    out = mini_pipe([PROMPT, "a red hat"], num_images_per_prompt=3, num_images_to_keep=2, top_k=256,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert isinstance(out, DallePipelineOutput)
    assert len(out.images) == 4 and out.images[0].size == (32, 32)
    assert out.image_tokens.shape == (4, 16, 16) and out.image_tokens.max() < 16384
    assert out.clip_scores.shape == (2, 2) and out.ranked_by == "clip"
    assert (out.clip_scores[:, 0] >= out.clip_scores[:, 1]).all()  # best first
    again = mini_pipe([PROMPT, "a red hat"], num_images_per_prompt=3, num_images_to_keep=2, top_k=256,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(out.image_tokens, again.image_tokens)


def test_images_are_the_vqgan_decoding_clipped_to_unit_range(mini_pipe):
    out = mini_pipe(PROMPT, top_k=1, output_type="pt")
    vae = mini_pipe.vae
    latents = vae.quantize.get_codebook_entry(out.image_tokens.flatten(), (1, 16, 16, 4))
    expected = vae.decode(latents, force_not_quantize=True).sample.clamp(0, 1)
    torch.testing.assert_close(out.images, expected)


def test_scores_and_classification_from_codes(mini_pipe):
    codes = mini_pipe(PROMPT, num_images_per_prompt=2, top_k=1).image_tokens
    score = mini_pipe.score(image_tokens=codes, captions=PROMPT)
    assert score.log_likelihood.shape == (2,) and torch.isfinite(score.log_likelihood).all()
    assert (score.log_likelihood < 0).all()
    ranked = mini_pipe.classify(codes[0], [PROMPT, "a red hat"])
    assert sorted(ranked.captions) == sorted([PROMPT, "a red hat"])
    with pytest.raises(ValueError, match=r"image codes in \[0, 16384\)"):
        mini_pipe.score(image_tokens=torch.full((1, 16, 16), 16384), captions=PROMPT)


def test_images_encode_to_codes_unless_the_encoder_is_missing(mini_pipe, bart_tokenizer, mini_transformer):
    image = torch.rand(2, 3, 32, 32)
    codes = mini_pipe.encode_images(image)
    assert codes.shape == (2, 16, 16) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 16384
    decoder_only = DalleMiniPipeline(
        tokenizer=bart_tokenizer, transformer=mini_transformer, vae=tiny_vqgan(), vae_has_encoder=False
    )
    with pytest.raises(ValueError, match="no encoder weights"):
        decoder_only.score(images=image, captions=PROMPT)


def test_settings_are_validated(mini_pipe, bart_tokenizer, mini_transformer):
    with pytest.raises(ValueError, match="top_k"):
        mini_pipe(PROMPT, top_k=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        mini_pipe(PROMPT, guidance_scale=0.5)
    with pytest.raises(ValueError, match="vae_has_encoder"):
        DalleMiniPipeline(tokenizer=bart_tokenizer, transformer=mini_transformer, vae=tiny_vqgan(), vae_has_encoder=1)
