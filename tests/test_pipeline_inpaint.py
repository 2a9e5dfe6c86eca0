"""DalleInpaintPipeline on the tiny models of conftest.py (16 px images, a 4 x 4 grid of 4 px cells)."""

import inspect
import re

import numpy as np
import PIL.Image
import pytest
import torch

import dalle_hf
from dalle_hf.image_processing import cell_mask, mask_to_tensor, soft_alpha
from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.pipeline_dalle_inpaint import DalleInpaintPipeline, DalleInpaintPipelineOutput
from dalle_hf.pipeline_dalle_variation import DalleImageVariationPipeline


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def inpaint(pipe):
    inpaint = DalleInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


@pytest.fixture
def image():
    """A 16 x 16 uint8 image with detail everywhere (random pixels), so any changed pixel would show."""
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def box_mask(y0, y1, x0, x1, size=16):
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_pixels_outside_the_mask_are_the_input(inpaint, image):
    mask = box_mask(3, 9, 5, 11)  # touches cells (0..2) x (1..2)
    out = inpaint("a red circle", image=image, mask_image=mask, num_images_per_prompt=4, num_images_to_keep=3,
                  generator=gen())
    assert isinstance(out, DalleInpaintPipelineOutput) and len(out.images) == 3
    original = np.asarray(image)
    for edited in out.images:
        edited = np.asarray(edited)
        assert edited.shape == (16, 16, 3)
        np.testing.assert_array_equal(edited[~mask], original[~mask])  # exactly, every pixel outside the mask
        assert (edited[mask] != original[mask]).any()  # and the masked region was repainted
    as_np = inpaint("a red circle", image=image, mask_image=mask, generator=gen(), output_type="np").images
    np.testing.assert_array_equal(as_np[0][~mask], original[~mask].astype(np.float32) / 255)


def test_only_the_masked_cells_change(inpaint, pipe, image):
    mask = box_mask(5, 6, 9, 10)  # one pixel in cell (row 1, column 2)
    out = inpaint("a blue square", image=image, mask_image=mask, num_images_per_prompt=6, generator=gen(1))
    expected_cells = torch.zeros(4, 4, dtype=torch.bool)
    expected_cells[1, 2] = True
    assert torch.equal(out.cell_mask, expected_cells)
    codes = pipe.encode_images([image])  # (1, 4, 4)
    assert (out.image_tokens[:, ~expected_cells] == codes[:, ~expected_cells]).all()
    assert len(set(out.image_tokens[:, 1, 2].tolist())) > 1  # the masked cell was sampled, not copied
    dilated = inpaint("a blue square", image=image, mask_image=mask, mask_dilation=1, generator=gen(1))
    assert dilated.cell_mask.sum() == 9 and dilated.cell_mask[0:3, 1:4].all()
    # pixels outside the user's mask still come from the input, though their cells were resampled
    np.testing.assert_array_equal(np.asarray(dilated.images[0])[~mask], np.asarray(image)[~mask])


def reference_inpaint(pipe, input_ids, codes, known, generator, guidance_scale):
    """Masked sampling by recomputing the whole sequence at every step (no cache, no prefill)."""
    model, tokens = pipe.transformer, torch.zeros(input_ids.shape[0], 0, dtype=torch.long)
    text = torch.cat([pipe.unconditional_ids(len(input_ids)), input_ids]) if guidance_scale > 1 else input_ids
    for i in range(model.config.image_seq_len):
        if known[i]:
            tokens = torch.cat([tokens, codes[:, i : i + 1].expand(len(tokens), 1)], dim=1)
            continue
        image = tokens.repeat(2, 1) if guidance_scale > 1 else tokens
        logits = model.image_logits(model(input_ids=text, image_ids=image).logits[:, -1]).float()
        if guidance_scale > 1:
            uncond, cond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1, generator=generator)], dim=1)
    return tokens


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_masked_sampling_equals_full_recomputation(inpaint, image, guidance_scale):
    """A hole in the middle: kept cells before (the prefill), between and after the masked ones."""
    cells = torch.zeros(4, 4, dtype=torch.bool)
    cells[1, 1:3] = cells[2, 0] = True
    input_ids = inpaint.encode_prompt(["a red circle"]).repeat(3, 1)
    codes = inpaint.encode_image_codes(inpaint.prepare_image(image))  # (1, 16)
    cached = inpaint.sample_masked_tokens(input_ids, codes, cells, 1.0, None, None, guidance_scale, gen(4), None, None)
    full = reference_inpaint(inpaint, input_ids, codes, (~cells).flatten().tolist(), gen(4), guidance_scale)
    assert torch.equal(cached, full)


def test_variations_are_inpainting_of_the_bottom_rows(pipe, inpaint, image):
    variations = DalleImageVariationPipeline(**pipe.components)
    variations.set_progress_bar_config(disable=True)
    rows = 1
    varied = variations(image, prompt="a red circle", num_rows_to_keep=rows, num_images_per_prompt=1, generator=gen(2),
                        output_type="pt")
    mask = box_mask(4 * rows, 16, 0, 16)  # the pixels of the bottom 3 rows of cells
    inpainted = inpaint("a red circle", image=image, mask_image=mask, guidance_scale=1.0, generator=gen(2),
                        output_type="pt")
    assert torch.equal(varied.image_tokens, inpainted.image_tokens)
    inside = torch.from_numpy(soft_alpha(torch.from_numpy(mask), 2).numpy() == 1)  # where nothing is blended
    assert torch.equal(varied.images[0][:, inside], inpainted.images[0][:, inside])
    # and the variations draw what the kept rows as a prefix drew before they became a mask
    codes = pipe.encode_images([image]).flatten(1)  # (1, 16)
    before = pipe.sample_image_tokens(pipe.encode_prompt(["a red circle"]), codes[:, : 4 * rows], generator=gen(2))
    assert torch.equal(varied.image_tokens.flatten(1), before)


def test_deterministic_for_a_generator(inpaint, image):
    mask = box_mask(0, 8, 0, 8)
    kwargs = dict(num_images_per_prompt=3, top_k=8, top_p=0.9, temperature=0.8, guidance_scale=2.0)
    a = inpaint("a red circle", image=image, mask_image=mask, generator=gen(1), **kwargs)
    b = inpaint("a red circle", image=image, mask_image=mask, generator=gen(1), **kwargs)
    c = inpaint("a red circle", image=image, mask_image=mask, generator=gen(2), **kwargs)
    assert torch.equal(a.image_tokens, b.image_tokens) and not torch.equal(a.image_tokens, c.image_tokens)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))


def test_ranking_by_whole_grid_likelihood_and_clip(pipe, inpaint, image):
    mask = box_mask(4, 12, 4, 12)
    everything = inpaint("a red circle", image=image, mask_image=mask, num_images_per_prompt=6, rerank="clip",
                         generator=gen(3), output_type="pt")
    # the default ranks by CLIP alone (with a CLIP model): it picked the best edits (docs/inpainting.md)
    default = inpaint("a red circle", image=image, mask_image=mask, num_images_per_prompt=6, num_images_to_keep=2,
                      generator=gen(3), output_type="pt")
    assert default.ranked_by == "clip" and default.likelihood_scores is None
    top_clip = everything.clip_scores[0].topk(2).indices
    assert torch.equal(default.image_tokens, everything.image_tokens[top_clip])
    torch.testing.assert_close(default.clip_scores[0], everything.clip_scores[0][top_clip])
    both = inpaint("a red circle", image=image, mask_image=mask, num_images_per_prompt=6, num_images_to_keep=2,
                   generator=gen(3), output_type="pt", rerank="both")
    assert both.ranked_by == "both" and both.clip_scores.shape == (1, 2) and both.likelihood_scores.shape == (1, 2)
    # the likelihood is the whole grid's (kept cells after the mask included), as DallePipeline.score gives it
    scored = pipe.score(image_tokens=everything.image_tokens, captions="a red circle")
    likelihood = scored.log_likelihood  # (6,)
    z = lambda s: (s - s.mean()) / s.std(unbiased=False)  # noqa: E731
    combined = z(everything.clip_scores[0].double()) + z(likelihood)
    top = combined.topk(2).indices
    assert torch.equal(both.image_tokens, everything.image_tokens[top])
    torch.testing.assert_close(both.likelihood_scores[0], likelihood[top])
    by_likelihood = inpaint("a red circle", image=image, mask_image=mask, num_images_per_prompt=6,
                            num_images_to_keep=1, rerank="likelihood", generator=gen(3))
    assert torch.equal(by_likelihood.image_tokens[0], everything.image_tokens[likelihood.argmax()])


def test_without_clip_ranks_by_likelihood(tokenizer, transformer, vae, image):
    inpaint = DalleInpaintPipeline(tokenizer=tokenizer, transformer=transformer, vae=vae)
    inpaint.set_progress_bar_config(disable=True)
    out = inpaint("a red circle", image=image, mask_image=box_mask(0, 4, 0, 4), num_images_per_prompt=3,
                  num_images_to_keep=2, generator=gen())
    assert out.ranked_by == "likelihood" and out.clip_scores is None and out.likelihood_scores.shape == (1, 2)
    with pytest.raises(ValueError, match="needs a CLIP model"):
        inpaint("a red circle", image=image, mask_image=box_mask(0, 4, 0, 4), rerank="both")


def test_bad_masks_and_settings_raise(inpaint, image):
    call = lambda mask, **kw: inpaint("a red circle", image=image, mask_image=mask, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="mask_image is empty"):
        call(np.zeros((16, 16), dtype=bool))
    with pytest.raises(ValueError, match="touches all 4 x 4 code cells"):
        call(np.ones((16, 16), dtype=bool))
    with pytest.raises(ValueError, match="touches all"):  # one pixel in every cell is everything too
        call(np.tile(box_mask(0, 1, 0, 1, size=4), (4, 4)))
    with pytest.raises(ValueError, match=re.escape("the image's size (H, W) = (16, 16), got (8, 16)")):
        call(np.ones((8, 16), dtype=bool))
    with pytest.raises(ValueError, match="the image's size"):
        call(PIL.Image.new("L", (32, 32), 255))
    with pytest.raises(ValueError, match="mask_image is required"):
        call(None)
    with pytest.raises(ValueError, match="mask_image must be a PIL.Image"):
        call("mask.png")
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\]"):
        call(np.full((16, 16), 2.0))
    with pytest.raises(ValueError, match="mask_image arrays"):
        call(np.zeros((16, 16, 3), dtype=bool))
    with pytest.raises(ValueError, match="mask_dilation"):
        call(box_mask(0, 4, 0, 4), mask_dilation=-1)
    with pytest.raises(ValueError, match="soft_edge_px"):
        call(box_mask(0, 4, 0, 4), soft_edge_px=0)
    with pytest.raises(ValueError, match="prompt must be a str"):
        inpaint(["a", "b"], image=image, mask_image=box_mask(0, 4, 0, 4))
    with pytest.raises(ValueError, match="rerank must be one of"):
        call(box_mask(0, 4, 0, 4), rerank="random")
    with pytest.raises(ValueError, match="num_images_to_keep"):
        call(box_mask(0, 4, 0, 4), num_images_per_prompt=2, num_images_to_keep=3)


def test_mask_conversions():
    white = PIL.Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    white.paste((255, 255, 255, 255), (0, 0, 16, 32))  # the left half, in a larger RGBA mask
    mask = mask_to_tensor(white, (32, 32), 16)
    assert mask.shape == (16, 16) and mask[:, :8].all() and not mask[:, 8:].any()
    as_float = mask_to_tensor(torch.tensor(np.asarray(white.convert("L")) / 255.0)[None, None], (32, 32), 16)
    assert torch.equal(mask, as_float)
    cells = cell_mask(torch.from_numpy(box_mask(0, 1, 15, 16)), 4)  # the top-right pixel
    assert cells.sum() == 1 and cells[0, 3]
    alpha = soft_alpha(torch.from_numpy(box_mask(4, 12, 4, 12)), 2)
    assert alpha[~torch.from_numpy(box_mask(4, 12, 4, 12))].eq(0).all()  # exact outside
    assert alpha[4, 4:12].eq(0.5).all() and alpha[5:11, 5:11].eq(1).all()  # soft at the inner edge


def test_public_name_and_documented_defaults():
    assert dalle_hf.DalleInpaintPipeline is DalleInpaintPipeline and issubclass(DalleInpaintPipeline, DallePipeline)
    assert issubclass(DalleImageVariationPipeline, DalleInpaintPipeline)
    documented = dict(re.findall(r"^\s*(\w+) \(`[^`]*`, \*optional\*, defaults to `?([^`:\n]+?)`?\):",
                                 DalleInpaintPipeline.__call__.__doc__, re.M))
    parameters = inspect.signature(DalleInpaintPipeline.__call__).parameters
    assert len(documented) >= 6
    for name, text in documented.items():
        default = parameters[name].default
        assert str(default) == text or name == "num_images_to_keep", (name, default, text)
