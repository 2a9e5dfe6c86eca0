import inspect
import json
import re
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from dalle_hf.pipeline_dalle import MAX_IMAGES_PER_PROMPT, DallePipeline, DallePipelineOutput, filter_logits
from dalle_hf.pipeline_dalle_variation import DalleImageVariationPipeline, image_to_tensor


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_output_shapes_and_grouping(pipe):
    out = pipe(["a red circle", "a blue square"], num_images_per_prompt=3, num_images_to_keep=2, generator=gen())
    assert isinstance(out, DallePipelineOutput)
    assert len(out.images) == 4 and all(isinstance(im, PIL.Image.Image) and im.size == (16, 16) for im in out.images)
    assert out.clip_scores.shape == (2, 2)
    assert (out.clip_scores[:, 0] >= out.clip_scores[:, 1]).all()  # best first
    assert out.image_tokens.shape == (4, 4, 4) and out.image_tokens.dtype == torch.long


def test_clip_rerank_keeps_the_best_candidates(pipe):
    everything = pipe("a red circle", num_images_per_prompt=5, generator=gen(3), output_type="pt")
    best = pipe("a red circle", num_images_per_prompt=5, num_images_to_keep=2, generator=gen(3), output_type="pt")
    # the same 5 candidates were sampled; the kept 2 are the top-2 CLIP scores of all 5
    assert torch.allclose(best.clip_scores[0], everything.clip_scores[0][:2])
    assert torch.equal(best.image_tokens, everything.image_tokens[:2])


def test_deterministic_for_a_generator(pipe):
    kwargs = dict(num_images_per_prompt=2, top_k=8, top_p=0.9, temperature=0.8)
    a = pipe("a red circle", generator=gen(1), **kwargs).image_tokens
    b = pipe("a red circle", generator=gen(1), **kwargs).image_tokens
    c = pipe("a red circle", generator=gen(2), **kwargs).image_tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_output_types(pipe):
    pt = pipe("a red circle", generator=gen(), output_type="pt").images
    np_images = pipe("a red circle", generator=gen(), output_type="np").images
    pil = pipe("a red circle", generator=gen(), output_type="pil").images
    assert pt.shape == (1, 3, 16, 16) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    assert np_images.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(np_images[0], pt[0].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(np.asarray(pil[0]), (np_images[0] * 255).round().astype(np.uint8))
    images, scores, tokens = pipe("a red circle", generator=gen(), return_dict=False)
    assert len(images) == 1 and scores.shape == (1, 1) and tokens.shape == (1, 4, 4)


def test_without_clip_keeps_the_first_samples(tokenizer, transformer, vae):
    pipe = DallePipeline(tokenizer=tokenizer, transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    everything = pipe("a red circle", num_images_per_prompt=4, generator=gen(), output_type="pt")
    first = pipe("a red circle", num_images_per_prompt=4, num_images_to_keep=2, generator=gen(), output_type="pt")
    assert first.clip_scores is None and torch.equal(first.image_tokens, everything.image_tokens[:2])


def reference_sample(pipe, input_ids, generator, guidance_scale=1.0, negative_ids=None):
    """Sampling by full recomputation of the whole sequence at every step (no cache)."""
    model = pipe.transformer
    B, N = input_ids.shape[0], model.config.image_seq_len
    tokens = torch.zeros(B, 0, dtype=torch.long)
    uncond_ids = pipe.unconditional_ids(B) if negative_ids is None else negative_ids
    text = torch.cat([uncond_ids, input_ids]) if guidance_scale > 1 else input_ids
    for _ in range(N):
        image = torch.cat([tokens, tokens]) if guidance_scale > 1 else tokens
        logits = model.image_logits(model(input_ids=text, image_ids=image).logits[:, -1]).float()
        if guidance_scale > 1:
            uncond, cond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1, generator=generator)], dim=1)
    return tokens


@pytest.mark.latest
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_kv_cached_sampling_equals_full_recomputation(pipe, guidance_scale):
    input_ids = pipe.encode_prompt(["a red circle", "a blue square"])
    cached = pipe.sample_image_tokens(input_ids, guidance_scale=guidance_scale, generator=gen(5))
    full = reference_sample(pipe, input_ids, gen(5), guidance_scale)
    assert torch.equal(cached, full)


def test_negative_prompt_replaces_the_unconditional_branch(pipe):
    prompts, negatives = ["a red circle", "a blue square"], ["a circle", "a square"]
    input_ids, negative_ids = pipe.encode_prompt(prompts), pipe.encode_prompt(negatives)
    cached = pipe.sample_image_tokens(input_ids, guidance_scale=3.0, generator=gen(5), negative_ids=negative_ids)
    assert torch.equal(cached, reference_sample(pipe, input_ids, gen(5), 3.0, negative_ids))
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("input_ids")), with_kwargs=True
    )
    try:
        out = pipe(prompts, num_images_per_prompt=2, guidance_scale=3.0, negative_prompt=negatives, generator=gen(1))
    finally:
        handle.remove()
    # the prefill: [negative ; conditional], one row per candidate
    assert torch.equal(seen[0], torch.cat([negative_ids.repeat_interleave(2, 0), input_ids.repeat_interleave(2, 0)]))
    assert out.image_tokens.shape == (4, 4, 4)
    # one str applies to every prompt; the empty one is the unconditional text itself
    one = pipe(prompts, guidance_scale=3.0, negative_prompt="a circle", generator=gen(2)).image_tokens
    assert torch.equal(
        one, pipe(prompts, guidance_scale=3.0, negative_prompt=["a circle"] * 2, generator=gen(2)).image_tokens
    )
    empty = pipe(prompts, guidance_scale=3.0, negative_prompt="", generator=gen(2)).image_tokens
    assert torch.equal(empty, pipe(prompts, guidance_scale=3.0, generator=gen(2)).image_tokens)


def test_guidance_batch_is_unconditional_then_conditional(pipe):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("input_ids")), with_kwargs=True
    )
    try:
        pipe(["a red circle", "a blue square"], guidance_scale=2.0, generator=gen())
    finally:
        handle.remove()
    text = seen[0]  # the prefill
    assert text.shape == (4, 8)
    assert (text[:2] == 0).all()  # unconditional half: all padding
    assert torch.equal(text[2:], pipe.encode_prompt(["a red circle", "a blue square"]))


def test_empty_prompt_is_unconditional_and_long_prompt_truncated(pipe, caplog):
    assert (pipe.encode_prompt([""]) == 0).all()
    long_prompt = " ".join(["a red circle and a blue square"] * 5)
    assert pipe.prompt_token_count(long_prompt) > 8
    ids = pipe.encode_prompt([long_prompt])
    assert ids.shape == (1, 8) and ids[0, -1] == pipe.tokenizer.eos_token_id


def test_filter_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [[True, True, False, False]]
    # probabilities ~[0.03, 0.09, 0.24, 0.64]: top_p=0.7 keeps the two largest
    assert torch.isinf(filter_logits(logits, None, 0.7)).tolist() == [[True, True, False, False]]
    assert not torch.isinf(filter_logits(logits, None, 1.0)).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=3), "prompt must be a str"),
        (dict(prompt=["ok", None]), "prompt must be a str"),
        (dict(prompt=[]), "prompt must be a str"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(num_images_per_prompt=MAX_IMAGES_PER_PROMPT + 1), "num_images_per_prompt"),
        (dict(num_images_per_prompt=2, num_images_to_keep=3), "num_images_to_keep"),
        (dict(temperature=0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(guidance_scale=0.5), "guidance_scale"),
        (dict(output_type="latent"), "output_type"),
        (dict(generator=42), "generator"),
        (dict(negative_prompt=3, guidance_scale=2.0), "negative_prompt must be a str"),
        (dict(negative_prompt=["a", "b"], guidance_scale=2.0), r"one per prompt \(1\), got a list of 2"),
        (dict(negative_prompt="a circle", guidance_scale=1.0), "needs guidance_scale > 1"),
    ],
)
def test_bad_inputs_raise_value_error(pipe, kwargs, match):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_documented_defaults_match_the_signature():
    for fn in (DallePipeline.__call__, DalleImageVariationPipeline.__call__):
        doc = fn.__doc__
        for name, param in inspect.signature(fn).parameters.items():
            if param.default is inspect.Parameter.empty or param.default is None:
                continue
            marker = f"{name} (`"
            if marker in doc:
                section = doc[doc.index(marker) :].split("\n")[0]
                documented = re.search(r"defaults to `?([^`)]+)`?\)", section).group(1).strip("\"'")
                assert documented == str(param.default), (fn.__qualname__, name, section)


def test_callback_streams_tokens(pipe):
    lengths = []
    pipe(
        "a red circle",
        generator=gen(),
        callback_on_step_end=lambda p, i, t, kw: lengths.append(kw["image_tokens"].shape[1]),
    )
    assert lengths == list(range(1, 17))


@pytest.mark.latest
def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["dalle_hf.modeling_dalle", "DalleForImageGeneration"]
    assert index["vae"] == ["dalle_hf.modeling_dvae", "DalleVAE"]
    files = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".ckpt"))]
    loaded = DallePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    a = pipe(["a red circle"], num_images_per_prompt=3, num_images_to_keep=2, generator=gen(7), output_type="pt")
    b = loaded(["a red circle"], num_images_per_prompt=3, num_images_to_keep=2, generator=gen(7), output_type="pt")
    assert torch.equal(a.image_tokens, b.image_tokens)
    assert torch.equal(a.images, b.images) and torch.allclose(a.clip_scores, b.clip_scores)


def test_default_guidance_scale_travels_with_the_checkpoint(pipe, tmp_path):
    guided = DallePipeline(**pipe.components, default_guidance_scale=2.0)
    guided.set_progress_bar_config(disable=True)
    guided.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["default_guidance_scale"] == 2.0
    loaded = DallePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.default_guidance_scale == 2.0 and pipe.config.default_guidance_scale == 1.0
    used = []  # the guidance scale each call samples with
    original = loaded.sample_image_tokens
    loaded.sample_image_tokens = lambda *args: used.append(args[5]) or original(*args)
    loaded("a red circle", generator=gen(3))
    loaded("a red circle", guidance_scale=1.0, generator=gen(3))
    assert used == [2.0, 1.0]
    for bad in (0.5, "2", True):
        with pytest.raises(ValueError, match="default_guidance_scale"):
            DallePipeline(**pipe.components, default_guidance_scale=bad)


@pytest.mark.latest
def test_from_pretrained_hf_cache_offline(pipe, tmp_path):
    """The real `from_pretrained("org/name")` path, resolved from an HF-cache-shaped folder with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--dalle-hf--tiny-shapes"
    pipe.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "import torch; from dalle_hf import DallePipeline;"
        "p = DallePipeline.from_pretrained('dalle-hf/tiny-shapes'); p.set_progress_bar_config(disable=True);"
        "print(p('a red circle', generator=torch.Generator().manual_seed(0)).image_tokens.flatten().tolist())"
    )
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = pipe("a red circle", generator=gen(0)).image_tokens.flatten().tolist()
    assert result.stdout.strip().splitlines()[-1] == str(expected)


# ---------------------------------------------------------------------------------------------------------------
# Variations
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.latest
def test_variation_keeps_the_input_rows(pipe):
    variations = DalleImageVariationPipeline(**pipe.components)
    image = pipe("a red circle", generator=gen(), output_type="pt").images[0]
    codes = pipe.vae.get_codebook_indices(image[None])  # (1, 4, 4)
    out = variations(image, num_rows_to_keep=2, num_images_per_prompt=3, num_images_to_keep=2, generator=gen(1))
    assert len(out.images) == 2 and out.clip_scores.shape == (1, 2)
    assert (out.image_tokens[:, :2] == codes[:, :2]).all()
    # the same call with a prompt is deterministic too
    a = variations(image, prompt="a red circle", num_rows_to_keep=1, generator=gen(2)).image_tokens
    b = variations(image, prompt="a red circle", num_rows_to_keep=1, generator=gen(2)).image_tokens
    assert torch.equal(a, b)
    # a negative prompt is the guidance branch's text, after the same kept rows
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        out = variations(image, prompt="a red circle", negative_prompt="a circle", num_rows_to_keep=1,
                         num_images_per_prompt=2, guidance_scale=3.0, generator=gen(3))
    finally:
        handle.remove()
    n = 2
    assert torch.equal(seen[0]["input_ids"][:n], pipe.encode_prompt(["a circle"]).repeat(n, 1))
    assert torch.equal(seen[0]["input_ids"][n:], pipe.encode_prompt(["a red circle"]).repeat(n, 1))
    assert (seen[0]["image_ids"] == codes.flatten(1)[:, :4]).all() and (out.image_tokens[:, :1] == codes[:, :1]).all()
    with pytest.raises(ValueError, match="needs guidance_scale > 1"):
        variations(image, negative_prompt="a circle", num_rows_to_keep=1, guidance_scale=1.0)


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "P", "RGB"])
def test_image_conversions_are_explicit(mode):
    rgb = PIL.Image.new("RGB", (40, 30), (200, 10, 10))
    image = rgb.convert(mode)
    tensor = image_to_tensor(image, 16)
    assert tensor.shape == (1, 3, 16, 16) and tensor.dtype == torch.float32
    if mode == "RGBA":  # fully transparent pixels are composited on white
        transparent = PIL.Image.new("RGBA", (16, 16), (0, 0, 0, 0))
        assert torch.allclose(image_to_tensor(transparent, 16), torch.ones(1, 3, 16, 16))


def test_variation_bad_inputs(pipe):
    variations = DalleImageVariationPipeline(**pipe.components)
    image = PIL.Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="image must be a PIL.Image"):
        variations("not-an-image.png", num_rows_to_keep=1)
    with pytest.raises(ValueError, match="num_rows_to_keep"):
        variations(image, num_rows_to_keep=4)
    with pytest.raises(ValueError, match="prompt must be a str"):
        variations(image, prompt=["a", "b"], num_rows_to_keep=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        variations(torch.full((3, 16, 16), 2.0), num_rows_to_keep=1)
    with pytest.raises(ValueError, match="image arrays"):
        variations(np.zeros((4, 4, 2), dtype=np.uint8), num_rows_to_keep=1)
