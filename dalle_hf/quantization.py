"""Precision and quantization of a DALL-E pipeline: the options, each through the standard APIs where one exists.

| option | how | where it pays |
|---|---|---|
| bf16 | `DallePipeline.from_pretrained(path, dtype=torch.bfloat16)` | CPUs with bf16 matmul (AVX-512 BF16, AMX), GPUs |
| fp16 | `from_pretrained(path, **precision_kwargs("fp16", "cuda"))` | GPUs only |
| int8, dynamic | `quantize_dynamic_int8(pipe)` after loading (torch.ao, fbgemm/x86 kernels) | CPU speed |
| int8, bitsandbytes | `from_pretrained(path, quantization_config=bnb_quantization_config(8))` | GPU memory (LLM.int8) |
| nf4, bitsandbytes | `from_pretrained(path, quantization_config=bnb_quantization_config(4))` | GPU memory |

Never fp16 on CPU: it has no fp16 matmul kernels there (about 1 GFLOP/s). Measured numbers: docs/performance.md.

The same options serve both model families, the DALL-E transformer (`DallePipeline`) and DALL·E mini / Mega
(`DalleMiniPipeline`, `DalleBartForImageGeneration`): what is quantized is every `nn.Linear` of the transformer but
the head. What stays in the float dtype, and why:

- the head (`lm_head`, `INT8_SKIP_MODULES`): it decides every sampled token, a quantization error there moves the
  argmax directly; the models also read its weight as a tensor (`decode_step` slices the sampled rows,
  `image_log_probs` projects in float64), which a quantized layer does not offer;
- the embeddings (`nn.Embedding`, never replaced by bitsandbytes): a step reads one row of each, so quantizing them
  saves memory (Mega: 0.27 GB of 5.2 GB in fp16) but no time, and bitsandbytes has no embedding kernel for them;
- the LayerNorms: a few thousand parameters, and the normalization is where low precision hurts most;
- the image tokenizer (dVAE, VQGAN) and CLIP: `components=("transformer",)`, they run once per image.
"""

import warnings

import torch
from torch import nn

INT8_SKIP_MODULES = ("lm_head",)  # the head decides every sampled token; it is also small (width x vocab)


def _transformer_of(pipe_or_model) -> nn.Module:
    model = getattr(pipe_or_model, "transformer", pipe_or_model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a DallePipeline or a torch.nn.Module, got {type(pipe_or_model).__name__}")
    return model


def quantize_dynamic_int8(pipe_or_model, skip_modules: tuple[str, ...] = INT8_SKIP_MODULES):
    r"""
    Dynamic int8 quantization of the transformer's `nn.Linear` layers, for fast CPU sampling.

    Weights become int8 per output channel once; activations are quantized per batch on the fly (PyTorch's
    `torch.ao.quantization.quantize_dynamic`, x86/fbgemm VNNI kernels). Embeddings, LayerNorms and the layers
    named in `skip_modules` stay in float32. Applied in place after loading; the result is for inference and is
    not meant to be saved (save the float model and quantize after loading).

    Args:
        pipe_or_model (`DallePipeline` or `DalleForImageGeneration`):
            A pipeline (its `transformer` is quantized) or a model, float32 on CPU.
        skip_modules (`tuple[str, ...]`, *optional*, defaults to `("lm_head",)`):
            Names of `nn.Linear` submodules (matched as the last component) to keep in float32.

    Returns:
        The same `pipe_or_model`, quantized in place.

    Example:

    ```python
    >>> from dalle_hf import DallePipeline
    >>> from dalle_hf.quantization import quantize_dynamic_int8
    >>> pipe = quantize_dynamic_int8(DallePipeline.from_pretrained("checkpoints/dalle-shapes"))
    >>> images = pipe("a red circle", num_images_per_prompt=16, num_images_to_keep=4).images
    ```
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = _transformer_of(pipe_or_model)
    weights = [p for p in model.parameters()]
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in weights):
        found = sorted({f"{p.dtype}/{p.device.type}" for p in weights})
        raise ValueError(f"quantize_dynamic_int8 needs a float32 model on CPU, got parameters {found}")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] not in skip_modules]
    if not names:
        raise ValueError("quantize_dynamic_int8 found no nn.Linear layers to quantize")
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it will move to torchao; it is built in, torchao is not a dependency.
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True)
    model.eval()
    return pipe_or_model


def bnb_kwargs(bits: int = 8, compute_dtype: torch.dtype | None = None) -> dict:
    """The bitsandbytes settings of `bnb_quantization_config` as keyword arguments of transformers'
    `BitsAndBytesConfig`, the head kept in float (`llm_int8_skip_modules`)."""
    if bits == 8:
        kwargs = {"load_in_8bit": True}
    elif bits == 4:
        kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
        if compute_dtype is not None:
            kwargs["bnb_4bit_compute_dtype"] = compute_dtype
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    kwargs["llm_int8_skip_modules"] = list(INT8_SKIP_MODULES)
    return kwargs


def bnb_quantization_config(bits: int = 8, compute_dtype: torch.dtype | None = None, components=("transformer",)):
    r"""
    A `diffusers.PipelineQuantizationConfig` for bitsandbytes int8 (LLM.int8) or 4-bit nf4 on the transformer.

    The standard API, with the head kept in float (`llm_int8_skip_modules`). Pass it to
    `DallePipeline.from_pretrained(path, quantization_config=...)` (or `DalleMiniPipeline`'s); the quantized
    pipeline saves with `save_pretrained` and reloads without a config. bitsandbytes saves memory on CUDA; on CPU
    it runs, slower than float32.

    Args:
        bits (`int`, *optional*, defaults to 8):
            8 for `bitsandbytes_8bit`, 4 for `bitsandbytes_4bit` with nf4 (QLoRA's NormalFloat) blocks.
        compute_dtype (`torch.dtype`, *optional*):
            4-bit only: the matmul dtype (`bnb_4bit_compute_dtype`); bf16 on a recent GPU or CPU.
        components (`tuple[str, ...]`, *optional*, defaults to `("transformer",)`):
            Pipeline components to quantize.

    Example:

    ```python
    >>> from dalle_hf import DallePipeline
    >>> from dalle_hf.quantization import bnb_quantization_config
    >>> pipe = DallePipeline.from_pretrained("checkpoints/dalle-shapes", quantization_config=bnb_quantization_config(8))
    ```
    """
    from diffusers import PipelineQuantizationConfig

    kwargs = bnb_kwargs(bits, compute_dtype)
    backend = "bitsandbytes_8bit" if bits == 8 else "bitsandbytes_4bit"
    return PipelineQuantizationConfig(
        quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=list(components)
    )


PRECISIONS = ("fp32", "bf16", "bnb-int8", "bnb-nf4")  # every device
CUDA_PRECISIONS = ("fp32", "fp16", "bf16", "bnb-int8", "bnb-nf4")  # fp16 has no CPU matmul kernels


def precision_kwargs(precision: str, device: str | torch.device = "cpu", model: bool = False) -> dict:
    r"""
    `from_pretrained` keyword arguments that load a pipeline (or a model) in one of `CUDA_PRECISIONS` for `device`.

    | precision | transformer's Linear layers | everything else (embeddings, norms, head, dVAE/VQGAN, CLIP) |
    |---|---|---|
    | `"fp32"` | float32 | float32 |
    | `"fp16"` (CUDA only) | float16 | float16 |
    | `"bf16"` | bfloat16 | bfloat16 |
    | `"bnb-int8"` | LLM.int8 | float16 on CUDA, float32 on CPU |
    | `"bnb-nf4"` | nf4, computed in bfloat16 | bfloat16 |

    LLM.int8 quantizes float16 activations and casts any other dtype, with a warning, at every call; on CPU there
    are no float16 kernels, so float32 there.

    bitsandbytes places a quantized transformer on the GPU while loading when CUDA is available; call
    `pipe.to(device)` after loading to move the rest.

    Args:
        precision (`str`):
            One of `CUDA_PRECISIONS` (`PRECISIONS` on a CPU).
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the pipeline will run; `"bnb-int8"` and `"fp16"` depend on it.
        model (`bool`, *optional*, defaults to `False`):
            Arguments for one model's `from_pretrained` (e.g. `DalleBartForImageGeneration`): a transformers
            `BitsAndBytesConfig` instead of a pipeline's `PipelineQuantizationConfig`.

    Example:

    ```python
    >>> from dalle_hf import DallePipeline
    >>> from dalle_hf.quantization import precision_kwargs
    >>> pipe = DallePipeline.from_pretrained("checkpoints/dalle-shapes", **precision_kwargs("bnb-nf4", "cuda"))
    >>> pipe = pipe.to("cuda")
    ```
    """
    on_cuda = torch.device(device).type == "cuda"
    if precision in ("fp32", "bf16") or (precision == "fp16" and on_cuda):
        return {"dtype": {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]}
    if precision == "fp16":
        raise ValueError(f"fp16 needs a CUDA device (CPUs have no fp16 matmul kernels), got device {device!r}; "
                         "use bf16 on the CPU")
    if precision not in CUDA_PRECISIONS:
        raise ValueError(f"precision must be one of {CUDA_PRECISIONS}, got {precision!r}")
    bits, dtype = (8, torch.float16 if on_cuda else torch.float32) if precision == "bnb-int8" else (4, torch.bfloat16)
    compute_dtype = None if bits == 8 else torch.bfloat16
    if model:
        from transformers import BitsAndBytesConfig

        return {"dtype": dtype, "quantization_config": BitsAndBytesConfig(**bnb_kwargs(bits, compute_dtype))}
    return {"dtype": dtype, "quantization_config": bnb_quantization_config(bits, compute_dtype)}


def unpack_bnb_4bit_cpu_weights(module: nn.Module, *args, **kwargs) -> None:
    """Undo bitsandbytes' CPU repacking of 4-bit weights, exactly, before a state dict is taken.

    On a CPU with AVX-512 BF16, the first inference forward of a `bnb.nn.Linear4bit` repacks its weight for a
    fused kernel and stores `absmax` transposed, as `(K / blocksize, N)` in bf16. bitsandbytes 0.50's inverse
    (run by `Linear4bit._save_to_state_dict`) restores the nibbles but, without double quantization, leaves
    `absmax` transposed, so a checkpoint saved after a forward reloads with scales on the wrong blocks (and the
    in-memory model is corrupted too). Registered as a state-dict pre-hook on `DalleForImageGeneration`; a no-op
    without packed 4-bit layers. The bf16 `absmax` is what the packed kernel used, so outputs are unchanged.
    """
    for m in module.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        transposed = state.absmax  # (K / blocksize, N), bf16
        m.weight.data, state = _convert_weight_packed_for_cpu_inverse(m.weight.data, state)
        if not state.nested:  # the nested branch re-quantizes absmax from the right layout itself
            state.absmax = transposed.T.reshape(-1).float()  # (N * K / blocksize,) as `quantize_4bit` made it


def _tensor_bytes(t) -> int:
    if isinstance(t, (tuple, list)):
        return sum(_tensor_bytes(x) for x in t)
    if not isinstance(t, torch.Tensor):
        return 0
    n = t.numel() * t.element_size()
    if t.is_quantized and t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        n += _tensor_bytes(t.q_per_channel_scales()) + _tensor_bytes(t.q_per_channel_zero_points())
    return n


def weight_bytes(pipe_or_model) -> int:
    """Bytes of a model's weights as stored: parameters and buffers, int8/int4 data with their scales.

    Counts the state dict, so float, `torch.ao` dynamic int8 (packed weights, per-channel scales) and
    bitsandbytes (int8 + `SCB`, 4-bit + `absmax`/quant-state) models compare on one scale.
    """
    return sum(_tensor_bytes(t) for t in _transformer_of(pipe_or_model).state_dict().values())


__all__ = [
    "CUDA_PRECISIONS",
    "PRECISIONS",
    "bnb_kwargs",
    "bnb_quantization_config",
    "precision_kwargs",
    "quantize_dynamic_int8",
    "unpack_bnb_4bit_cpu_weights",
    "weight_bytes",
]
