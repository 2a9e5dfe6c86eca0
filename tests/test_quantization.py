"""int8 and 4-bit: dynamic int8 for CPU speed, bitsandbytes int8 / nf4 through the pipeline API (load, generate,
save, reload). bitsandbytes runs on CPU too, which is what these tests use."""

import copy

import pytest
import torch
from torch import nn

from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.quantization import (
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


def load(path, **kwargs):
    pipe = DallePipeline.from_pretrained(path, **kwargs)
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
        precision_kwargs("fp16")
