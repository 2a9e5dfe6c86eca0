"""int8 and 4-bit: dynamic int8 for CPU speed, bitsandbytes int8 / nf4 through the pipeline API (load, generate,
save, reload). bitsandbytes runs on CPU too, which is what these tests use."""

import copy

import pytest
import torch
from torch import nn

from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.quantization import (
    CUDA_PRECISIONS,
    PRECISIONS,
    bnb_quantization_config,
    precision_kwargs,
    quantize_dynamic_int8,
    weight_bytes,
)

from .conftest import save_tiny_pipeline


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sample(pipe, seed=0):
    return pipe(["a red circle", "a blue square"], num_images_per_prompt=2, generator=gen(seed), output_type="pt")


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory, tokenizer):
    """A float32 pipeline on disk whose Linear shapes suit bitsandbytes' CPU kernels (`save_tiny_pipeline`)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe"), tokenizer)


def load(path, pipeline_class=DallePipeline, **kwargs):
    pipe = pipeline_class.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def logits(model, seed=0):
    g = gen(seed)
    text, image = torch.randint(3, 300, (2, 8), generator=g), torch.randint(0, 32, (2, 16), generator=g)
    with torch.no_grad():
        return model.image_logits(model(input_ids=text, image_ids=image).logits[:, 8:]).float()


# ---------------------------------------------------------------------------------------------------------------
# Dynamic int8 (CPU speed)
# ---------------------------------------------------------------------------------------------------------------
def test_dynamic_int8_quantizes_the_blocks_and_keeps_the_head(saved_pipeline):
    pipe = load(saved_pipeline)
    reference = logits(pipe.transformer)
    fp32_block_bytes = weight_bytes(pipe.transformer.h)
    assert quantize_dynamic_int8(pipe) is pipe
    model = pipe.transformer
    assert type(model.lm_head) is nn.Linear
    quantized = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) == 4 * model.config.n_layer and not [m for m in model.modules() if type(m) is nn.Linear][1:]
    assert weight_bytes(model.h) <= 0.3 * fp32_block_bytes  # int8 + per-channel scales; whole models in the benchmark
    error = (logits(model) - reference).abs().max() / reference.abs().max()
    assert error < 0.05


def test_dynamic_int8_pipeline_generates_deterministically(saved_pipeline):
    pipe = quantize_dynamic_int8(load(saved_pipeline))
    a, b = sample(pipe, 1), sample(pipe, 1)
    assert torch.equal(a.image_tokens, b.image_tokens) and a.image_tokens.shape == (4, 4, 4)
    guided = pipe("a red circle", num_images_per_prompt=2, guidance_scale=3.0, generator=gen(), output_type="pt")
    assert guided.images.shape == (2, 3, 16, 16)


def test_dynamic_int8_needs_a_float32_cpu_model(saved_pipeline):
    with pytest.raises(ValueError, match="float32 model on CPU"):
        quantize_dynamic_int8(load(saved_pipeline, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="DallePipeline or a torch.nn.Module"):
        quantize_dynamic_int8("checkpoints/dalle-shapes")


def test_weight_bytes_counts_float_weights(transformer):
    expected = sum(t.numel() * t.element_size() for t in transformer.state_dict().values())
    assert weight_bytes(transformer) == expected
    assert weight_bytes(copy.deepcopy(transformer).to(torch.bfloat16)) == expected // 2


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes through the pipeline API
# ---------------------------------------------------------------------------------------------------------------
def test_bnb_config_validates_bits():
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        bnb_quantization_config(3)


def test_bnb_int8_pipeline_loads_generates_saves_and_reloads(saved_pipeline, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    fp32 = load(saved_pipeline)
    pipe = load(saved_pipeline, quantization_config=bnb_quantization_config(8))
    model = pipe.transformer
    assert isinstance(model.h[0].attn.c_attn, bnb.nn.Linear8bitLt) and type(model.lm_head) is nn.Linear
    assert weight_bytes(model.h) <= 0.3 * weight_bytes(fp32.transformer.h)
    error = (logits(model) - logits(fp32.transformer)).abs().max() / logits(fp32.transformer).abs().max()
    assert error < 0.05
    before = sample(pipe)
    pipe.save_pretrained(tmp_path)
    reloaded = load(tmp_path)  # the quantization config travels in transformer/config.json
    assert isinstance(reloaded.transformer.h[0].attn.c_attn, bnb.nn.Linear8bitLt)
    assert torch.equal(logits(reloaded.transformer), logits(model))
    assert torch.equal(sample(reloaded).image_tokens, before.image_tokens)


def test_bnb_nf4_saved_after_a_forward_on_cpu_reloads_right(saved_pipeline, tmp_path):
    """bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward; saving then must unpack them
    exactly (see `unpack_bnb_4bit_cpu_weights`), or the checkpoint and the model in memory both go wrong."""
    bnb = pytest.importorskip("bitsandbytes")
    fp32 = load(saved_pipeline)
    pipe = load(saved_pipeline, quantization_config=bnb_quantization_config(4))
    model = pipe.transformer
    assert isinstance(model.h[0].mlp.c_proj, bnb.nn.Linear4bit)
    before = sample(pipe)  # a forward: on an AVX-512 BF16 CPU the weights are now repacked
    reference = logits(model)
    error = (reference - logits(fp32.transformer)).abs().max() / logits(fp32.transformer).abs().max()
    assert error < 0.2
    pipe.save_pretrained(tmp_path)
    assert torch.equal(logits(model), reference)  # saving left the model in memory intact
    reloaded = load(tmp_path)
    assert isinstance(reloaded.transformer.h[0].mlp.c_proj, bnb.nn.Linear4bit)
    assert torch.equal(logits(reloaded.transformer), reference)
    assert torch.equal(sample(reloaded).image_tokens, before.image_tokens)
    assert weight_bytes(reloaded.transformer.h) <= 0.2 * weight_bytes(fp32.transformer.h)


def test_cli_loads_each_precision(saved_pipeline):
    from dalle_hf.cli import build_parser, load_pipeline

    pipe = load_pipeline(str(saved_pipeline), "float32", "int8-dynamic")
    assert isinstance(pipe.transformer.h[0].mlp.c_fc, torch.ao.nn.quantized.dynamic.Linear)
    assert load_pipeline(str(saved_pipeline), "bfloat16").transformer.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="int8-dynamic quantizes a float32 model"):
        load_pipeline(str(saved_pipeline), "bfloat16", "int8-dynamic")
    args = build_parser().parse_args(["eval", "shapes", "--pipeline", "p", "--out", "o", "--quantization", "bnb-nf4"])
    assert args.quantization == "bnb-nf4" and args.dtype == "float32"


# ---------------------------------------------------------------------------------------------------------------
# precision_kwargs: one name per precision, shared by the CUDA tests and benchmarks/gpu_check.py
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_kwargs_load_and_generate_on_cpu(saved_pipeline, precision):
    if precision.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    pipe = load(saved_pipeline, **precision_kwargs(precision))
    model = pipe.transformer
    expected_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "bnb-int8": torch.float32}.get(
        precision, torch.bfloat16
    )
    assert model.bos_embedding.dtype == expected_dtype and next(pipe.vae.parameters()).dtype == expected_dtype
    c_fc = model.h[0].mlp.c_fc
    if precision == "bnb-int8":
        assert type(c_fc).__name__ == "Linear8bitLt" and c_fc.weight.dtype == torch.int8
    elif precision == "bnb-nf4":
        assert type(c_fc).__name__ == "Linear4bit" and c_fc.compute_dtype == torch.bfloat16
    else:
        assert type(c_fc) is nn.Linear and c_fc.weight.dtype == expected_dtype
    assert type(model.lm_head) is nn.Linear
    a, b = sample(pipe, 3), sample(pipe, 3)
    assert a.image_tokens.shape == (4, 4, 4) and torch.equal(a.image_tokens, b.image_tokens)


def test_precision_kwargs_int8_uses_float16_on_cuda_only():
    pytest.importorskip("bitsandbytes")
    assert precision_kwargs("bnb-int8", "cuda")["dtype"] == torch.float16
    assert precision_kwargs("bnb-int8", torch.device("cuda", 0))["dtype"] == torch.float16
    assert precision_kwargs("bnb-int8")["dtype"] == torch.float32
    config = precision_kwargs("bnb-nf4", "cuda")["quantization_config"]
    assert config.quant_kwargs["bnb_4bit_compute_dtype"] == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        precision_kwargs("fp8")


# ---------------------------------------------------------------------------------------------------------------
# DALL·E mini / Mega: the same options on DalleMiniPipeline and DalleBartForImageGeneration
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_mini(tmp_path_factory):
    from tests.dalle_mini_fixtures import save_tiny_mini_pipeline

    return save_tiny_mini_pipeline(tmp_path_factory.mktemp("mini"))


def load_mini(path, **kwargs):
    from dalle_hf.pipeline_dalle_mini import DalleMiniPipeline

    return load(path, DalleMiniPipeline, **kwargs)


def mini_logits(model, seed=0):
    """Teacher-forced logits of the sampled codes for a guided pair of prompts and 20 random codes: (2, 21, 16384)."""
    g = gen(seed)
    text = torch.full((2, 64), 1)
    text[:, 0], text[0, 1], text[1, 1:6], text[1, 6] = 0, 2, torch.randint(3, 300, (5,), generator=g), 2
    codes = torch.randint(0, 16384, (2, 20), generator=g)
    with torch.no_grad():
        return model.image_logits(model(input_ids=text, image_ids=codes).logits).float()


def sample_mini(pipe, seed=0):
    return pipe("a cat", num_images_per_prompt=2, generator=gen(seed), output_type="pt")  # guided: default 10


@pytest.mark.parametrize("precision", PRECISIONS)
def test_mini_pipeline_loads_each_precision_and_keeps_embeddings_norms_and_head_in_float(saved_mini, precision):
    if precision.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    pipe = load_mini(saved_mini, **precision_kwargs(precision))
    model = pipe.transformer
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "bnb-int8": torch.float32}.get(precision, torch.bfloat16)
    layer = model.decoder.layers[0]
    linears = [layer.self_attn.q_proj, layer.encoder_attn.k_proj, layer.glu.fc0, layer.glu.fc2,
               model.encoder.layers[1].self_attn.out_proj]
    expected = {"bnb-int8": "Linear8bitLt", "bnb-nf4": "Linear4bit"}.get(precision, "Linear")
    assert {type(m).__name__ for m in linears} == {expected}
    n_quantized = sum(type(m).__name__ == expected for m in model.modules())
    assert n_quantized == 2 * 7 + 2 * 11 + (0 if precision.startswith("bnb") else 1)  # + the head if float
    assert type(model.decoder.lm_head) is nn.Linear and model.decoder.lm_head.weight.dtype == dtype
    for name, p in model.named_parameters():
        if "embed" in name or "norm" in name or ".ln" in name or "final_ln" in name:
            assert p.dtype == dtype, name
    assert model.cache_dtype == dtype and next(pipe.vae.parameters()).dtype == dtype  # the VQGAN is not quantized
    a, b = sample_mini(pipe, 3), sample_mini(pipe, 3)
    assert a.image_tokens.shape == (2, 16, 16) and torch.equal(a.image_tokens, b.image_tokens)


def test_mini_quantized_logits_stay_near_float32(saved_mini):
    """Mean logit error relative to the fp32 logits' spread (measured on this tiny model: bf16 0.007, LLM.int8 0.013,
    nf4 0.15): every precision is off by a nonzero amount, nf4 the most."""
    pytest.importorskip("bitsandbytes")
    reference = mini_logits(load_mini(saved_mini).transformer)
    errors = {}
    for precision in ("bf16", "bnb-int8", "bnb-nf4"):
        logits = mini_logits(load_mini(saved_mini, **precision_kwargs(precision)).transformer)
        errors[precision] = ((logits - reference).abs().mean() / reference.std()).item()
    assert 0 < errors["bf16"] < 0.02 and 0 < errors["bnb-int8"] < 0.05 and 0 < errors["bnb-nf4"] < 0.3, errors
    assert errors["bnb-nf4"] > max(errors["bf16"], errors["bnb-int8"]), errors


@pytest.mark.parametrize("precision", ["bnb-int8", "bnb-nf4"])
def test_mini_quantized_pipeline_saved_after_a_forward_reloads_right(saved_mini, precision, tmp_path):
    """As for the DALL-E transformer: on a CPU with AVX-512 BF16 the first forward repacks 4-bit weights, and the
    model's state-dict pre-hook must unpack them before saving."""
    pytest.importorskip("bitsandbytes")
    pipe = load_mini(saved_mini, **precision_kwargs(precision))
    before = sample_mini(pipe)  # a forward first, as a user would
    reference = mini_logits(pipe.transformer)
    pipe.save_pretrained(tmp_path)
    assert torch.equal(mini_logits(pipe.transformer), reference)  # saving left the model in memory intact
    reloaded = load_mini(tmp_path, dtype=precision_kwargs(precision)["dtype"])  # the quantization config travels
    assert type(reloaded.transformer.decoder.layers[0].glu.fc1) is type(pipe.transformer.decoder.layers[0].glu.fc1)
    assert torch.equal(mini_logits(reloaded.transformer), reference)
    assert torch.equal(sample_mini(reloaded).image_tokens, before.image_tokens)


def test_mini_model_alone_loads_with_a_transformers_config(saved_mini):
    """`precision_kwargs(..., model=True)`: a transformers `BitsAndBytesConfig` for one model's `from_pretrained`."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration

    kwargs = precision_kwargs("bnb-nf4", model=True)
    assert isinstance(kwargs["quantization_config"], BitsAndBytesConfig)
    assert kwargs["quantization_config"].llm_int8_skip_modules == ["lm_head"]
    model = DalleBartForImageGeneration.from_pretrained(saved_mini / "transformer", **kwargs)
    assert isinstance(model.encoder.layers[0].glu.fc0, bnb.nn.Linear4bit) and type(model.decoder.lm_head) is nn.Linear
    assert precision_kwargs("bf16", model=True) == {"dtype": torch.bfloat16}


def test_dynamic_int8_on_the_mini_transformer(saved_mini):
    pipe = quantize_dynamic_int8(load_mini(saved_mini))
    reference = mini_logits(load_mini(saved_mini).transformer)
    model = pipe.transformer
    assert isinstance(model.decoder.layers[0].glu.fc0, torch.ao.nn.quantized.dynamic.Linear)
    assert type(model.decoder.lm_head) is nn.Linear
    error = (mini_logits(model) - reference).abs().max() / reference.abs().max()
    assert error < 0.05
    assert sample_mini(pipe).image_tokens.shape == (2, 16, 16)


def test_fp16_is_for_cuda_only():
    assert precision_kwargs("fp16", "cuda") == {"dtype": torch.float16}
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        precision_kwargs("fp16")
    assert "fp16" in CUDA_PRECISIONS and "fp16" not in PRECISIONS
