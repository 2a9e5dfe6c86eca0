"""What DALL·E mini and Mega need in GPU memory, computed from the config: weights, the sampling cache, activations.

The "What fits where" table of docs/performance.md is generated from `dalle_bart_memory_plan` (`python -m
dalle_hf.memory_plan`), and benchmarks/gpu_check.py prints it beside what it measures. The counts are exact for the
tensors dalle-hf allocates (tests/test_memory_plan.py checks them against a hand count and against real models and
caches); the activations and the CUDA context are estimates, stated as such.

- Weights: bitsandbytes quantizes the `nn.Linear` layers of the transformer but the head (`INT8_SKIP_MODULES`);
  embeddings, LayerNorms and the head stay in the float dtype of the precision, and so does the VQGAN.
- Cache ([`DalleBartCache`]), in the compute dtype: self-attention keys and values for all `image_seq_len`
  positions of every decoder layer, and the cross-attention keys and values of the `text_seq_len` text states.
- Rows: super-conditioning runs `[uncond ; cond]`, two rows per image; a 3 x 3 grid is 18 rows.
- The cache is freed before the VQGAN decodes (it lives in `sample_image_tokens`), so the peak is the larger of
  sampling (weights + cache + a step's activations) and decoding (weights + the VQGAN's activations).
"""

import torch

from .configuration_dalle_bart import DalleBartConfig
from .quantization import CUDA_PRECISIONS

MIB, GIB = 2**20, 2**30
# The CUDA context (driver, torch's and bitsandbytes' kernels, loaded lazily since CUDA 11.7) and cuBLAS's workspace:
# 300-600 MiB with recent drivers; it is not in torch.cuda.max_memory_allocated but it is on the card.
CUDA_CONTEXT_BYTES = 768 * MIB
# What torch's caching allocator reserves beyond what it hands out (rounding to blocks, fragmentation).
ALLOCATOR_SLACK = 0.10
# The VQGAN f16 16384 as a diffusers VQModel (the layout of taming-transformers' f16 model, which dalle-mini uses).
VQGAN_F16_16384 = dict(
    block_out_channels=(128, 128, 256, 256, 512), down_block_types=("DownEncoderBlock2D",) * 4 + (
        "AttnDownEncoderBlock2D",), up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
    layers_per_block=2, latent_channels=256, num_vq_embeddings=16384, vq_embed_dim=256, norm_num_groups=32,
    sample_size=256,
)  # fmt: skip
# Full-resolution tensors of the VQGAN decoder's last block alive at once (the residual input, a GroupNorm/SiLU
# output, a convolution's output, the upsampled input): an estimate.
VQGAN_LIVE_FULL_RESOLUTION_TENSORS = 4
VQGAN_DECODE_CHUNK = 8  # images the pipeline decodes at once (`DalleMiniFamily.decode_image_tokens`)
# float32 copies of a step's logits the sampling makes (guidance, filtering, softmax, the draw): an estimate.
SAMPLING_LOGIT_COPIES = 4


def float_bytes(precision: str, device: str = "cuda") -> int:
    """Bytes per element of everything bitsandbytes does not quantize, as `precision_kwargs` loads it."""
    if precision == "bnb-int8":
        return 2 if torch.device(device).type == "cuda" else 4  # LLM.int8 takes float16 activations on CUDA
    sizes = {"fp32": 4, "fp16": 2, "bf16": 2, "bnb-nf4": 2}
    if precision not in sizes:
        raise ValueError(f"precision must be one of {CUDA_PRECISIONS}, got {precision!r}")
    return sizes[precision]


def quantized_linear_bytes(n_out: int, n_in: int, precision: str) -> int:
    """Bytes bitsandbytes stores for one quantized Linear's weight (no bias): int8 values with one float32 scale per
    output row (`SCB`) and a one-byte format tag; or nf4, two values a byte, one float32 absmax per block of 64 and
    the 16-value float32 code book (the ~80-byte JSON quant state per layer is not counted)."""
    n = n_out * n_in
    if precision == "bnb-int8":
        return n + 4 * n_out + 1
    if precision == "bnb-nf4":
        return n // 2 + 4 * -(-n // 64) + 4 * 16
    raise ValueError(f"quantized precisions are bnb-int8 and bnb-nf4, got {precision!r}")


def dalle_bart_linear_shapes(config: DalleBartConfig) -> list[tuple[int, int]]:
    """(out, in) of every `nn.Linear` bitsandbytes quantizes: per encoder layer 4 attention projections and the
    GLU's 3; per decoder layer 8 (self and cross) and 3. The head is not among them."""
    d, g = config.d_model, config.glu_dim
    glu = [(g, d), (g, d), (d, g)]
    return ([(d, d)] * 4 + glu) * config.encoder_layers + ([(d, d)] * 8 + glu) * config.decoder_layers


def dalle_bart_float_parameters(config: DalleBartConfig) -> int:
    """Parameters that stay in float under bitsandbytes: embeddings, LayerNorms, the head."""
    d, g = config.d_model, config.glu_dim
    encoder = (config.text_vocab_size + config.text_seq_len) * d + 3 * d  # embeddings, layernorm_embedding, final_ln
    encoder += config.encoder_layers * (4 * d + g)  # pre (bias), post (scale, bias), GLU ln0 (d) and ln1 (g)
    decoder = (config.image_vocab_size + 1 + config.image_seq_len) * d + 3 * d
    decoder += config.decoder_layers * (7 * d + g)  # two pre (bias), two post (scale, bias), GLU ln0, ln1
    return encoder + decoder + (config.image_vocab_size + 1) * d  # + lm_head


def dalle_bart_weight_bytes(config: DalleBartConfig, precision: str, device: str = "cuda") -> int:
    """Bytes of `DalleBartForImageGeneration`'s weights loaded with `precision_kwargs(precision, device)`."""
    floats = dalle_bart_float_parameters(config)
    linears = dalle_bart_linear_shapes(config)
    size = float_bytes(precision, device)
    if precision.startswith("bnb"):
        return floats * size + sum(quantized_linear_bytes(o, i, precision) for o, i in linears)
    return (floats + sum(o * i for o, i in linears)) * size


def dalle_bart_cache_bytes(config: DalleBartConfig, rows: int, precision: str, device: str = "cuda") -> dict:
    """Bytes of a [`DalleBartCache`] for `rows` rows in the compute dtype: keys and values of every decoder layer,
    self-attention over `image_seq_len` positions and cross-attention over `text_seq_len` text states."""
    per_position = 2 * config.decoder_layers * rows * config.d_model * float_bytes(precision, device)  # keys + values
    return {"self": per_position * config.image_seq_len, "cross": per_position * config.text_seq_len}


def dalle_bart_step_activation_bytes(config: DalleBartConfig, rows: int, precision: str, device: str = "cuda") -> int:
    """An estimate of one sampling step's transient tensors: a layer's states (x, normed, q, k, v, attention output,
    out, residual: 8 d), its GLU (fc0, fc1, gelu, product: 4 g) and attention weights (heads x positions), plus the
    head's logits and `SAMPLING_LOGIT_COPIES` float32 copies of them."""
    size = float_bytes(precision, device)
    layer = rows * (8 * config.d_model + 4 * config.glu_dim + config.attention_heads * config.image_seq_len) * size
    logits = rows * (config.image_vocab_size + 1) * (size + 4 * SAMPLING_LOGIT_COPIES)
    return layer + logits


def vqgan_parameters(vqgan_config: dict | None = None) -> int:
    """Parameters of the VQGAN (a diffusers `VQModel`, encoder included), counted on the `meta` device."""
    from diffusers import VQModel

    with torch.device("meta"):
        return sum(p.numel() for p in VQModel(**(vqgan_config or VQGAN_F16_16384)).parameters())


def vqgan_decode_activation_bytes(images: int, precision: str, device: str = "cuda", image_size: int = 256,
                                  channels: int = 128) -> int:
    """An estimate of the VQGAN decoder's peak: `VQGAN_LIVE_FULL_RESOLUTION_TENSORS` tensors of its last block
    (`channels` at full resolution) for a chunk of up to `VQGAN_DECODE_CHUNK` images."""
    chunk = min(images, VQGAN_DECODE_CHUNK)
    return VQGAN_LIVE_FULL_RESOLUTION_TENSORS * chunk * channels * image_size**2 * float_bytes(precision, device)


def dalle_bart_memory_plan(config: DalleBartConfig, precision: str, images: int, guided: bool = True,
                           device: str = "cuda", vqgan_config: dict | None = None) -> dict:
    r"""
    GPU memory to sample `images` images with DALL·E mini or Mega in `precision`: each part in bytes, and the total.

    Args:
        config (`DalleBartConfig`): the model's shapes (`DalleBartConfig.mini()`, `DalleBartConfig.mega()`).
        precision (`str`): one of `CUDA_PRECISIONS` (`precision_kwargs`' names; fp16 is CUDA only).
        images (`int`): images sampled together (9 for a 3 x 3 grid).
        guided (`bool`, *optional*, defaults to `True`): super-conditioning, two rows per image.
        device (`str`, *optional*, defaults to `"cuda"`): only bnb-int8's float dtype depends on it.
        vqgan_config (`dict`, *optional*): the `VQModel`'s arguments, defaults to `VQGAN_F16_16384`.

    Returns:
        `dict` with `rows`, `weights` (the transformer), `vqgan_weights`, `self_cache`, `cross_cache`,
        `step_activations`, `vqgan_decode_activations`, `tensors_peak` (weights + the larger phase),
        `allocator_slack`, `cuda_context` and `total`, in bytes.

    Example:

    ```python
    >>> from dalle_hf.configuration_dalle_bart import DalleBartConfig
    >>> from dalle_hf.memory_plan import dalle_bart_memory_plan
    >>> plan = dalle_bart_memory_plan(DalleBartConfig.mega(), "bnb-int8", images=9)
    >>> plan["rows"], round(plan["total"] / 2**30, 2) < 6
    (18, True)
    ```
    """
    if images < 1:
        raise ValueError(f"images must be a positive int, got {images!r}")
    rows = images * (2 if guided else 1)
    size = float_bytes(precision, device)
    cache = dalle_bart_cache_bytes(config, rows, precision, device)
    plan = {
        "rows": rows,
        "weights": dalle_bart_weight_bytes(config, precision, device),
        "vqgan_weights": vqgan_parameters(vqgan_config) * size,
        "self_cache": cache["self"],
        "cross_cache": cache["cross"],
        "step_activations": dalle_bart_step_activation_bytes(config, rows, precision, device),
        "vqgan_decode_activations": vqgan_decode_activation_bytes(images, precision, device),
    }
    sampling = plan["self_cache"] + plan["cross_cache"] + plan["step_activations"]
    plan["tensors_peak"] = plan["weights"] + plan["vqgan_weights"] + max(sampling, plan["vqgan_decode_activations"])
    plan["allocator_slack"] = int(ALLOCATOR_SLACK * plan["tensors_peak"])
    plan["cuda_context"] = CUDA_CONTEXT_BYTES
    plan["total"] = plan["tensors_peak"] + plan["allocator_slack"] + plan["cuda_context"]
    return plan


def what_fits_where_table(precisions=CUDA_PRECISIONS, grids=(1, 9)) -> str:
    """The markdown table of docs/performance.md's "What fits where" for DALL·E mini and Mega (GiB)."""
    lines = [
        "| model | precision | images (rows) | transformer | VQGAN | self cache | cross cache | activations "
        "(step / VQGAN decode) | tensors at peak | + slack + CUDA context = total |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, config in (("mini", DalleBartConfig.mini()), ("Mega", DalleBartConfig.mega())):
        for precision in precisions:
            for images in grids:
                p = dalle_bart_memory_plan(config, precision, images)
                grid = "1" if images == 1 else f"{images} ({int(images ** 0.5)} x {int(images ** 0.5)})"
                lines.append(
                    f"| {name} | {precision} | {grid} ({p['rows']} rows) | {p['weights'] / GIB:.2f} | "
                    f"{p['vqgan_weights'] / GIB:.2f} | {p['self_cache'] / GIB:.3f} | {p['cross_cache'] / GIB:.3f} | "
                    f"{p['step_activations'] / GIB:.3f} / {p['vqgan_decode_activations'] / GIB:.2f} | "
                    f"{p['tensors_peak'] / GIB:.2f} | **{p['total'] / GIB:.2f}** |"
                )
    return "\n".join(lines)


def random_dalle_bart(config: DalleBartConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      seed: int = 0):
    """A `DalleBartForImageGeneration` with random weights made directly in `dtype` on `device`: built on the `meta`
    device, then materialized, so a bf16 Mega never passes through 10 GB of float32 and a GPU's weights are made on
    the GPU. The init is the model's own (`_init_weights`: Linear and Embedding weights normal with std
    `initializer_range`, LayerNorm scales 1 and biases 0), drawn here from a generator seeded with `seed` on `device`
    so that it depends on nothing else in the process. For benchmarks and memory checks; converted weights load with
    `from_pretrained`."""
    from .modeling_dalle_bart import DalleBartForImageGeneration

    with torch.device("meta"):
        model = DalleBartForImageGeneration(config)
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # only LayerNorms have biases (dalle-mini's Linears have none)
                p.zero_()
            elif p.dim() == 1:  # LayerNorm scales
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=generator)
    return model.eval()


__all__ = [
    "CUDA_CONTEXT_BYTES",
    "VQGAN_F16_16384",
    "dalle_bart_cache_bytes",
    "dalle_bart_memory_plan",
    "dalle_bart_weight_bytes",
    "quantized_linear_bytes",
    "random_dalle_bart",
    "what_fits_where_table",
]


if __name__ == "__main__":
    print(what_fits_where_table())
