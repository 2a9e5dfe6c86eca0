"""The GPU path: the pipelines generate on CUDA in every precision of `dalle_hf.quantization.PRECISIONS`, quantized
pipelines save and reload, sampling is deterministic for a generator, and `enable_model_cpu_offload()` works.

DALL·E mini's pipeline runs the same way in `CUDA_PRECISIONS` (fp16 too), on a tiny random model.

The tests marked `cuda` are skipped without a CUDA GPU; `benchmarks/gpu_check.py` runs them first
(`pytest -m cuda tests/test_cuda.py`). They use the tiny pipeline of `conftest.save_tiny_pipeline` (width 128,
a 4x4 grid of codes on 16x16 images, CLIP included). Loading goes through `precision_kwargs`, which
tests/test_quantization.py also runs on the CPU for every precision; the unmarked tests at the end check on the
CPU that offloading moves every component, which the CUDA offload test relies on.
"""

import pytest
import torch
from torch import nn

from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.pipeline_dalle_variation import DalleImageVariationPipeline
from dalle_hf.quantization import CUDA_PRECISIONS, PRECISIONS, precision_kwargs

from .conftest import save_tiny_pipeline

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe"), tokenizer, with_clip=True)


def load(path, precision: str = "fp32", device: str = "cuda") -> DallePipeline:
    if precision.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    pipe = DallePipeline.from_pretrained(path, **precision_kwargs(precision, device)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0, device: str = "cuda", **kwargs):
    """Four candidates per prompt, the CLIP-best two kept; the generator lives where sampling runs."""
    generator = torch.Generator(device).manual_seed(seed)
    return pipe(PROMPTS, num_images_per_prompt=4, num_images_to_keep=2, generator=generator, output_type="pt",
                **kwargs)


def image_logits(model, seed: int = 0) -> torch.Tensor:
    """Image-code logits of fixed random text and image tokens, on the model's device: (2, 16, 32) float32."""
    g = torch.Generator().manual_seed(seed)
    text, image = torch.randint(3, 300, (2, 8), generator=g), torch.randint(0, 32, (2, 16), generator=g)
    device = model.bos_embedding.device
    with torch.no_grad():
        out = model(input_ids=text.to(device), image_ids=image.to(device))
    return model.image_logits(out.logits[:, 8:]).float()


def check_output(out, vocab_size: int = 32) -> None:
    assert out.images.shape == (4, 3, 16, 16) and torch.isfinite(out.images).all()
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.image_tokens.shape == (4, 4, 4)
    assert out.image_tokens.min() >= 0 and out.image_tokens.max() < vocab_size
    assert out.clip_scores.shape == (2, 2) and (out.clip_scores[:, 0] >= out.clip_scores[:, 1]).all()


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_generates_on_cuda_deterministically_in_each_precision(saved, precision):
    pipe = load(saved, precision)
    for name in ("transformer", "vae", "clip_model"):
        devices = {p.device.type for p in getattr(pipe, name).parameters()}
        assert devices == {"cuda"}, f"{name} has parameters on {devices}"
    c_fc = pipe.transformer.h[0].mlp.c_fc
    expected = {"bnb-int8": "Linear8bitLt", "bnb-nf4": "Linear4bit"}.get(precision, "Linear")
    assert type(c_fc).__name__ == expected and type(pipe.transformer.lm_head) is nn.Linear
    a, b, c = generate(pipe, 1), generate(pipe, 1), generate(pipe, 2)
    check_output(a)
    assert torch.equal(a.image_tokens, b.image_tokens) and torch.allclose(a.images, b.images, atol=1e-5)
    assert not torch.equal(a.image_tokens, c.image_tokens)
    guided = generate(pipe, 1, guidance_scale=3.0)  # the batch doubles to [uncond ; cond]
    check_output(guided)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", ["bnb-int8", "bnb-nf4"])
def test_quantized_pipeline_saves_and_reloads_on_cuda(saved, precision, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    pipe = load(saved, precision)
    before = generate(pipe, 5)  # a forward before saving, as a user would
    reference = image_logits(pipe.transformer)
    pipe.save_pretrained(tmp_path)
    assert torch.equal(image_logits(pipe.transformer), reference)  # saving left the model in memory intact
    dtype = precision_kwargs(precision, "cuda")["dtype"]
    reloaded = DallePipeline.from_pretrained(tmp_path, dtype=dtype).to("cuda")  # the quantization config travels
    reloaded.set_progress_bar_config(disable=True)
    layer = {"bnb-int8": bnb.nn.Linear8bitLt, "bnb-nf4": bnb.nn.Linear4bit}[precision]
    assert isinstance(reloaded.transformer.h[0].mlp.c_fc, layer)
    assert reloaded.transformer.h[0].mlp.c_fc.weight.device.type == "cuda"
    assert torch.allclose(image_logits(reloaded.transformer), reference, rtol=0, atol=1e-3 * reference.abs().max())
    assert torch.equal(generate(reloaded, 5).image_tokens, before.image_tokens)


@pytest.mark.cuda
@requires_cuda
def test_transformer_on_cuda_matches_cpu_with_the_kv_cache(saved):
    """fp32 logits on the GPU agree with the CPU's, for a full forward and for KV-cached decode steps."""
    cpu = DallePipeline.from_pretrained(saved).transformer
    gpu = DallePipeline.from_pretrained(saved).transformer.to("cuda")
    reference = image_logits(cpu)
    assert torch.allclose(image_logits(gpu).cpu(), reference, rtol=0, atol=1e-4 * reference.abs().max())
    text = torch.randint(3, 300, (3, 8), generator=torch.Generator().manual_seed(1))
    steps = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(2))
    logits = {}
    for name, model in (("cpu", cpu), ("cuda", gpu)):
        with torch.no_grad():
            out = model(input_ids=text.to(name), use_cache=True, logits_to_keep=1)
            rows = [model.image_logits(out.logits[:, -1])]
            for i in range(steps.shape[1]):
                rows.append(model.decode_step(steps[:, i : i + 1].to(name), out.cache))
        logits[name] = torch.stack(rows).float().cpu()  # (6, 3, 32)
    scale = logits["cpu"].abs().max()
    assert torch.allclose(logits["cuda"], logits["cpu"], rtol=0, atol=1e-4 * scale)


@pytest.mark.cuda
@requires_cuda
def test_model_cpu_offload_generates_on_cuda(saved):
    pytest.importorskip("accelerate")
    reference = generate(load(saved), 3)
    pipe = DallePipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload()
    assert pipe._execution_device.type == "cuda"
    out = generate(pipe, 3)
    check_output(out)
    assert torch.equal(out.image_tokens, reference.image_tokens)
    assert torch.allclose(out.clip_scores, reference.clip_scores, atol=1e-4)
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cpu"}  # offloaded again after the call
    variations = DalleImageVariationPipeline(**pipe.components)
    variations.set_progress_bar_config(disable=True)
    variations.enable_model_cpu_offload()
    out = variations(reference.images[0], num_rows_to_keep=2, num_images_per_prompt=4, num_images_to_keep=2,
                     generator=torch.Generator("cuda").manual_seed(0), output_type="pt")
    assert out.images.shape == (2, 3, 16, 16)


@pytest.mark.cuda
@requires_cuda
def test_cpu_generator_on_a_cuda_pipeline(saved):
    """The docs' examples pass `torch.Generator()` (a CPU generator): on CUDA the tokens are drawn on the CPU
    (`DallePipeline.draw`), and the same seed gives the same images."""
    pipe = load(saved)
    first, again = generate(pipe, 0, device="cpu"), generate(pipe, 0, device="cpu")
    assert torch.equal(first.image_tokens, again.image_tokens)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype, quantization", [("float32", "none"), ("float16", "none"), ("float16", "bnb-int8")])
def test_cli_and_app_load_on_cuda(saved, tmp_path, monkeypatch, dtype, quantization):
    """`dalle-hf generate --device auto` and the app's loading (`--device auto`) put the pipeline on the GPU through
    the shared `dalle_hf.loading.load_pipeline`, and sample with the CPU generator they make."""
    from dalle_hf import cli, loading
    from dalle_hf.app import models as app_models

    if quantization.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    flags = ["--dtype", dtype, "--quantization", quantization, "--candidates", "4", "--keep", "2"]
    assert cli.main(["generate", PROMPTS[0], "--pipeline", str(saved), *flags, "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00.png", "01.png"]
    pipe = loading.load_pipeline(str(saved), dtype, quantization, device="auto")
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cuda"} and pipe.device.type == "cuda"
    monkeypatch.setattr(app_models, "DEVICE", app_models.DEVICE)
    monkeypatch.setattr(app_models, "DTYPE", app_models.DTYPE)
    assert app_models.use_device("auto", dtype) == "cuda"
    model = app_models.DALLE.load(saved)
    assert model.text_to_image.device.type == "cuda" and model.variations.device.type == "cuda"
    out = model.text_to_image(PROMPTS[0], num_images_per_prompt=4, num_images_to_keep=2, output_type="pt",
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()


# ---------------------------------------------------------------------------------------------------------------
# On the CPU: the wiring the CUDA offload test relies on
# ---------------------------------------------------------------------------------------------------------------
def spy_on_offload_hooks(pipe) -> list[str]:
    """Record, in order, each component whose offload hook runs (the hook moves it to the execution device)."""
    calls = []
    for name in ("transformer", "vae", "clip_model"):
        hook = getattr(pipe, name)._hf_hook
        pre_forward = hook.pre_forward

        def spy(module, *args, _name=name, _pre_forward=pre_forward, **kwargs):
            calls.append(_name)
            return _pre_forward(module, *args, **kwargs)

        hook.pre_forward = spy
    return calls


def test_model_cpu_offload_moves_every_component_before_use(pipe):
    """`enable_model_cpu_offload` moves a model to the GPU when its `forward` runs; the pipeline decodes with
    `vae.decode_code` and ranks with `clip_model.get_*_features`, so those must run the hook too. On the CPU the
    hooks run with the CPU as their execution device: this checks they fire, in the pipeline's order."""
    pytest.importorskip("accelerate")
    pipe.enable_model_cpu_offload(device="cpu")
    calls = spy_on_offload_hooks(pipe)
    out = pipe("a red circle", num_images_per_prompt=2, num_images_to_keep=1, generator=torch.Generator(),
               output_type="pt")
    assert out.images.shape == (1, 3, 16, 16)
    first_calls = list(dict.fromkeys(calls))
    assert first_calls == ["transformer", "vae", "clip_model"], calls

    variations = DalleImageVariationPipeline(**pipe.components)
    variations.enable_model_cpu_offload(device="cpu")
    calls = spy_on_offload_hooks(variations)
    variations(out.images[0], num_rows_to_keep=2, num_images_per_prompt=2, num_images_to_keep=1,
               generator=torch.Generator(), output_type="pt")
    assert set(calls) == {"transformer", "vae", "clip_model"} and calls[0] == "vae", calls  # encodes first


# ---------------------------------------------------------------------------------------------------------------
# DALL·E mini / Mega on CUDA: every CUDA precision, through the same precision_kwargs
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_mini(tmp_path_factory):
    from tests.dalle_mini_fixtures import save_tiny_mini_pipeline

    return save_tiny_mini_pipeline(tmp_path_factory.mktemp("mini"))


def load_mini(path, precision: str = "fp32", device: str = "cuda"):
    from dalle_hf.pipeline_dalle_mini import DalleMiniPipeline

    if precision.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    pipe = DalleMiniPipeline.from_pretrained(path, **precision_kwargs(precision, device)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_mini(pipe, seed: int = 0):
    """Two guided images (super-conditioning 10, the default) drawn with a CUDA generator."""
    return pipe("a cat", num_images_per_prompt=2, generator=torch.Generator("cuda").manual_seed(seed),
                output_type="pt")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", CUDA_PRECISIONS)
def test_mini_generates_on_cuda_in_each_precision(saved_mini, precision):
    pipe = load_mini(saved_mini, precision)
    model = pipe.transformer
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "bnb-nf4": torch.bfloat16}.get(precision, torch.float16)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.device.type for p in pipe.vae.parameters()} == {"cuda"}
    fc0 = model.decoder.layers[0].glu.fc0
    assert type(fc0).__name__ == {"bnb-int8": "Linear8bitLt", "bnb-nf4": "Linear4bit"}.get(precision, "Linear")
    assert type(model.decoder.lm_head) is nn.Linear and model.decoder.lm_head.weight.dtype == dtype
    assert model.decoder.embed_tokens.weight.dtype == dtype and model.cache_dtype == dtype
    a, b, c = generate_mini(pipe, 1), generate_mini(pipe, 1), generate_mini(pipe, 2)
    assert a.image_tokens.shape == (2, 16, 16) and a.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(a.images).all() and a.image_tokens.max() < 16384
    assert torch.equal(a.image_tokens, b.image_tokens) and not torch.equal(a.image_tokens, c.image_tokens)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", ["bnb-int8", "bnb-nf4"])
def test_mini_quantized_pipeline_saves_and_reloads_on_cuda(saved_mini, precision, tmp_path):
    pipe = load_mini(saved_mini, precision)
    before = generate_mini(pipe, 5)
    pipe.save_pretrained(tmp_path)
    # the quantization config travels in transformer/config.json; the float dtype is the caller's
    reloaded = type(pipe).from_pretrained(tmp_path, dtype=precision_kwargs(precision, "cuda")["dtype"]).to("cuda")
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.transformer.decoder.layers[0].glu.fc0) is type(pipe.transformer.decoder.layers[0].glu.fc0)
    assert torch.equal(generate_mini(reloaded, 5).image_tokens, before.image_tokens)


@pytest.mark.cuda
@requires_cuda
def test_mini_memory_plan_matches_cuda_tensors():
    """A random mini-shaped model made on the GPU in fp16 (`random_dalle_bart`): its weights and a 3 x 3 grid's
    cache take the planned bytes (the allocator rounds each tensor up to 512 bytes)."""
    from dalle_hf.configuration_dalle_bart import DalleBartConfig
    from dalle_hf.memory_plan import dalle_bart_cache_bytes, dalle_bart_weight_bytes, random_dalle_bart

    config = DalleBartConfig.mini(encoder_layers=2, decoder_layers=2)
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    model = random_dalle_bart(config, "cuda", torch.float16)
    rounding = 512 * len(list(model.parameters()))
    assert 0 <= torch.cuda.memory_allocated() - start - dalle_bart_weight_bytes(config, "fp16") < rounding
    text = torch.full((18, 64), 1, device="cuda")
    text[:, 0], text[:9, 1], text[9:, 1:4] = 0, 2, torch.tensor([100, 200, 2], device="cuda")
    with torch.no_grad():
        cache = model(input_ids=text, use_cache=True, logits_to_keep=1).cache
    planned = dalle_bart_cache_bytes(config, 18, "fp16")
    cache_bytes = sum(t.numel() * t.element_size() for t in [cache.keys, cache.values, *cache.encoder_keys,
                                                            *cache.encoder_values])
    assert cache_bytes == planned["self"] + planned["cross"]
