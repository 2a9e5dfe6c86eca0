"""The memory plan of DALL·E mini and Mega (docs/performance.md, "What fits where"): the counts against a hand count
and against the bytes of real models and caches, the table in the docs against the function, and random models made
directly in their dtype."""

from pathlib import Path

import pytest
import torch
from dalle_hf.configuration_dalle_bart import DalleBartConfig
from dalle_hf.memory_plan import (
    CUDA_CONTEXT_BYTES,
    dalle_bart_cache_bytes,
    dalle_bart_float_parameters,
    dalle_bart_linear_shapes,
    dalle_bart_memory_plan,
    dalle_bart_weight_bytes,
    float_bytes,
    random_dalle_bart,
    vqgan_parameters,
    what_fits_where_table,
)
from dalle_hf.modeling_dalle_bart import DalleBartCache, DalleBartForImageGeneration
from dalle_hf.quantization import PRECISIONS, precision_kwargs, weight_bytes
from tests.dalle_bart_reference import randomize, tiny_bart_config
from tests.dalle_mini_fixtures import save_tiny_mini_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_mega_counted_by_hand():
    """Mega: d = 2048, GLU 4096, 24 + 24 layers, 32 heads, vocabularies 50272 (text) and 16415 + 1 (image)."""
    mega = DalleBartConfig.mega()
    d, g = 2048, 4096
    encoder_linear = 24 * (4 * d * d + 3 * d * g)  # q, k, v, out; fc0, fc1, fc2
    decoder_linear = 24 * (8 * d * d + 3 * d * g)  # self and cross attention; the GLU
    assert sum(o * i for o, i in dalle_bart_linear_shapes(mega)) == encoder_linear + decoder_linear == 2_415_919_104
    floats = (50272 + 64) * d + 3 * d + 24 * (4 * d + g)  # encoder: embeddings, 2 norms, per-layer norms
    floats += (16416 + 256) * d + 3 * d + 24 * (7 * d + g) + 16416 * d  # decoder, its norms, the head
    assert dalle_bart_float_parameters(mega) == floats == 171_601_920
    assert floats + encoder_linear + decoder_linear == 2_587_521_024  # the published Mega's parameter count

    linears, rows = 24 * 7 + 24 * 11, 24 * (5 * d + 2 * g) + 24 * (9 * d + 2 * g)  # Linear layers, their output rows
    assert dalle_bart_weight_bytes(mega, "fp32") == 4 * 2_587_521_024
    assert dalle_bart_weight_bytes(mega, "fp16") == dalle_bart_weight_bytes(mega, "bf16") == 2 * 2_587_521_024
    # int8: one byte a weight, a float32 scale per output row and a format byte per layer; the rest float16
    assert dalle_bart_weight_bytes(mega, "bnb-int8") == 2_415_919_104 + 4 * rows + linears + 2 * floats
    assert dalle_bart_weight_bytes(mega, "bnb-int8", device="cpu") == 2_415_919_104 + 4 * rows + linears + 4 * floats
    # nf4: half a byte a weight, a float32 absmax per 64 weights and a 16-entry float32 code book per layer; bf16
    assert dalle_bart_weight_bytes(mega, "bnb-nf4") == 2_415_919_104 // 2 + 4 * 2_415_919_104 // 64 + 64 * linears + (
        2 * floats)

    # A 3 x 3 grid with super-conditioning: 18 rows; keys + values per decoder layer, fp16
    cache = dalle_bart_cache_bytes(mega, 18, "bnb-int8")
    assert cache == {"self": 2 * 24 * 18 * 256 * d * 2, "cross": 2 * 24 * 18 * 64 * d * 2}
    assert cache["self"] == 905_969_664


def test_mini_counts_equal_the_model_on_the_meta_device():
    for config in (DalleBartConfig.mini(), DalleBartConfig.mega()):
        with torch.device("meta"):
            model = DalleBartForImageGeneration(config)
        linear = [(m.out_features, m.in_features) for n, m in model.named_modules()
                  if type(m) is torch.nn.Linear and not n.endswith("lm_head")]
        assert sorted(linear) == sorted(dalle_bart_linear_shapes(config))
        total = sum(p.numel() for p in model.parameters())
        assert dalle_bart_float_parameters(config) == total - sum(o * i for o, i in linear)
    assert dalle_bart_weight_bytes(DalleBartConfig.mini(), "fp32") == 4 * 437_833_712


@pytest.fixture(scope="module")
def saved_mini(tmp_path_factory):
    return save_tiny_mini_pipeline(tmp_path_factory.mktemp("mini"))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_weight_bytes_equal_the_loaded_model(saved_mini, precision):
    """Computed from the config, against the state dict of the model `precision_kwargs` loads (CPU: bnb-int8 keeps
    float32 around its int8 layers). nf4 stores a small JSON quant state per layer that the count leaves out."""
    if precision.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    model = DalleBartForImageGeneration.from_pretrained(saved_mini / "transformer",
                                                        **precision_kwargs(precision, model=True))
    computed = dalle_bart_weight_bytes(model.config, precision, device="cpu")
    if precision == "bnb-nf4":
        assert type(model.decoder.layers[0].glu.fc0).__name__ == "Linear4bit"
        assert 0 <= weight_bytes(model) - computed < 200 * len(dalle_bart_linear_shapes(model.config))
    else:
        assert weight_bytes(model) == computed


def test_cache_bytes_equal_the_allocated_cache():
    config = tiny_bart_config()
    model = randomize(DalleBartForImageGeneration(config)).to(torch.bfloat16)
    text = torch.full((6, 64), 1)
    text[:, :3] = torch.tensor([0, 5, 2])
    cache = model(input_ids=text, use_cache=True, logits_to_keep=1).cache
    assert isinstance(cache, DalleBartCache)
    allocated = {
        "self": sum(t.numel() * t.element_size() for t in (cache.keys, cache.values)),
        "cross": sum(t.numel() * t.element_size() for t in cache.encoder_keys + cache.encoder_values),
    }
    assert allocated == dalle_bart_cache_bytes(config, 6, "bf16")


def test_plan_adds_up_and_mega_int8_grid_fits_6_gb():
    plan = dalle_bart_memory_plan(DalleBartConfig.mega(), "bnb-int8", images=9)
    assert plan["rows"] == 18 and plan["cuda_context"] == CUDA_CONTEXT_BYTES
    sampling = plan["self_cache"] + plan["cross_cache"] + plan["step_activations"]
    assert plan["tensors_peak"] == plan["weights"] + plan["vqgan_weights"] + max(
        sampling, plan["vqgan_decode_activations"])
    assert plan["total"] == plan["tensors_peak"] + plan["allocator_slack"] + plan["cuda_context"]
    assert plan["total"] < 6e9  # the goal: a Mega 3 x 3 grid in 6 GB (decimal, the smaller reading)
    one = dalle_bart_memory_plan(DalleBartConfig.mega(), "bnb-int8", images=1)
    assert 9 * one["self_cache"] == plan["self_cache"] and one["rows"] == 2
    unguided = dalle_bart_memory_plan(DalleBartConfig.mega(), "bnb-int8", images=9, guided=False)
    assert 2 * unguided["cross_cache"] == plan["cross_cache"]
    assert dalle_bart_memory_plan(DalleBartConfig.mega(), "fp16", images=9)["total"] > 6e9  # fp16 does not fit
    with pytest.raises(ValueError, match="images must be a positive int"):
        dalle_bart_memory_plan(DalleBartConfig.mega(), "bnb-int8", images=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        float_bytes("int4")


def test_vqgan_decode_chunk_is_the_pipelines():
    import inspect

    from dalle_hf.memory_plan import VQGAN_DECODE_CHUNK
    from dalle_hf.pipeline_dalle_mini import DalleMiniFamily

    default = inspect.signature(DalleMiniFamily.decode_image_tokens).parameters["batch_size"].default
    assert VQGAN_DECODE_CHUNK == default


def test_vqgan_parameters_match_the_published_file():
    """The VQGAN f16 16384's Flax file is 304 MB of float32 (dalle-mini/vqgan_imagenet_f16_16384)."""
    assert 300e6 < 4 * vqgan_parameters() < 306e6


def test_docs_table_is_generated_by_the_function():
    assert what_fits_where_table() in (ROOT / "docs" / "performance.md").read_text()


def test_random_model_is_made_in_its_dtype():
    config = tiny_bart_config()
    model = random_dalle_bart(config, dtype=torch.bfloat16, seed=3)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    fc0 = model.decoder.layers[0].glu.fc0.weight.float()
    assert fc0.std().item() == pytest.approx(config.initializer_range, rel=0.1)
    assert (model.decoder.layers[0].self_attn_layer_norm.weight == 1).all()
    assert (model.decoder.layers[0].glu.ln0.bias == 0).all()
    again = random_dalle_bart(config, dtype=torch.bfloat16, seed=3)
    assert torch.equal(again.decoder.lm_head.weight, model.decoder.lm_head.weight)
    assert not torch.equal(random_dalle_bart(config, seed=4).decoder.lm_head.weight.bfloat16(),
                           model.decoder.lm_head.weight)
