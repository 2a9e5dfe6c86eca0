"""Loading a saved pipeline for the command line and the app: which pipeline class, on which device, in which
precision. The CLI (`dalle_hf.cli`) and the app (`dalle_hf.app.models`) both load through `load_pipeline`, so a
flag means the same in both. Nothing heavy is imported at module level: the CLI's `--help` stays fast."""

QUANTIZATIONS = ("none", "int8-dynamic", "bnb-int8", "bnb-nf4")  # docs/performance.md compares them


def pipeline_class(path: str):
    """The dalle-hf pipeline class a saved folder's (or a repository's) `model_index.json` names: `DallePipeline`
    for the dVAE models, `DalleMiniPipeline` for a converted DALL·E mini / Mega."""
    import dalle_hf

    from .pipeline_dalle import DallePipeline

    name = DallePipeline.load_config(path)["_class_name"]
    name = name[1] if isinstance(name, list) else name  # a published copy names [module file, class]
    cls = getattr(dalle_hf, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, DallePipeline)):
        raise ValueError(f"{path}/model_index.json names {name!r}, which is not a dalle-hf pipeline")
    return cls


DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when torch sees a GPU, else the CPU
DTYPES = ("float32", "bfloat16", "float16")  # float16 on CUDA only: CPUs have no fp16 matmul kernels


def resolve_device(device: str, cuda_available: bool) -> str:
    """`--device` -> the device a pipeline loads on, "cpu" or "cuda": `auto` is CUDA when `cuda_available`
    (`torch.cuda.is_available()`); "cuda" without CUDA is a `ValueError` naming what is available."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise ValueError("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return device


def check_precision(dtype: str | None, quantization: str, device: str) -> None:
    """Refuse the `--dtype` / `--quantization` combinations that cannot run on `device` ("cpu" or "cuda"); a `dtype`
    of None is the saved one."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if dtype == "float16" and device == "cpu":
        raise ValueError("--dtype float16 needs --device cuda: CPUs have no float16 matmul kernels (about 1 GFLOP/s); "
                         "use --dtype bfloat16 or float32 on the CPU")
    if quantization == "int8-dynamic" and dtype != "float32":
        raise ValueError("--quantization int8-dynamic quantizes a float32 model: use --dtype float32")
    if quantization == "int8-dynamic" and device != "cpu":
        raise ValueError("--quantization int8-dynamic runs on the CPU (torch.ao's fbgemm kernels): use --device cpu, "
                         "or bnb-int8 on a GPU")


def load_pipeline(path: str, dtype: str | None = "float32", quantization: str = "none", device: str = "cpu",
                  pipeline_cls=None):
    r"""
    Load a saved pipeline for the CLI and the app: in `dtype`, quantized as `quantization` asks, on `device`.

    Args:
        path (`str`):
            A saved pipeline folder or Hub repo id.
        dtype (`str`, *optional*, defaults to `"float32"`):
            One of `DTYPES`; `"float16"` on CUDA only. None: the libraries' default (transformers models keep the
            dtype they were saved in, e.g. a bfloat16 conversion of Mega).
        quantization (`str`, *optional*, defaults to `"none"`):
            One of `QUANTIZATIONS` (docs/performance.md compares them); `"int8-dynamic"` on the CPU only.
        device (`str`, *optional*, defaults to `"cpu"`):
            One of `DEVICES`; `"auto"` is CUDA when torch sees a GPU (`resolve_device`).
        pipeline_cls (`type`, *optional*):
            The class to load with; by default the one the folder's `model_index.json` names (`pipeline_class`).

    Returns:
        The pipeline, on the device (`pipe.device`). Generators may stay on the CPU: `DallePipeline.draw` samples on
        the generator's device, diffusers' `randn_tensor` convention.

    Example:

    ```python
    >>> from dalle_hf.loading import load_pipeline
    >>> pipe = load_pipeline("dalle-mega-hf", "float16", "bnb-int8", device="cuda")  # int8 on one GPU
    ```
    """
    import torch

    from .quantization import bnb_quantization_config, quantize_dynamic_int8

    device = resolve_device(device, torch.cuda.is_available())
    check_precision(dtype, quantization, device)
    config = {
        "bnb-int8": lambda: bnb_quantization_config(8),
        "bnb-nf4": lambda: bnb_quantization_config(4),
    }.get(quantization)
    pipe = (pipeline_cls or pipeline_class(path)).from_pretrained(
        path, dtype=getattr(torch, dtype) if dtype else None, quantization_config=config() if config else None
    )
    if device == "cuda":
        pipe.to("cuda")  # a bitsandbytes transformer is already there (bitsandbytes places it); the rest follows
    return quantize_dynamic_int8(pipe) if quantization == "int8-dynamic" else pipe
