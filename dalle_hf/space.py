"""`dalle-hf export-space DIR --model org/name`: a Hugging Face Space folder that runs a published dalle-hf model.

The folder holds `app.py` (a copy of `dalle_hf/space_app.py` with the model id and the model's settings filled in),
`requirements.txt` with exact pins (the versions dalle-hf is tested with, read from this environment) and a
`README.md` whose front matter (`huggingface_hub.SpaceCardData`) says `sdk: gradio`, the SDK version, `models:` and
`suggested_hardware`. The Space needs no dalle-hf: the model repository carries its code (`dalle_hf.hub`).

Hardware follows the model, read from the repository's `model_index.json` and `transformer/config.json` (two small
files): a dVAE model made on a CPU runs on `cpu-basic`; DALL·E mini / Mega (0.4B / 2.6B parameters, 256 tokens per
image) asks for a small GPU, `t4-small` (16 GB). On a GPU the Space loads the transformer in float16 when the card
has room for its weights with a margin, in bitsandbytes int8 when it has not; on a CPU (`--hardware cpu-basic`) in
bfloat16. A GPU Space installs PyPI's torch (CUDA wheels) and bitsandbytes; a CPU Space the CPU wheel of torch.
"""

import json
import os
from importlib.metadata import version

from huggingface_hub import SpaceCard, SpaceCardData

# What app.py and the model repository's code import (diffusers pipeline, transformers models and CLIP, the
# tokenizers backend, safetensors weights, PIL/numpy images); pinned to the versions installed here.
SPACE_REQUIREMENTS = (
    "torch", "diffusers", "transformers", "tokenizers", "safetensors", "huggingface_hub", "gradio", "pillow", "numpy",
)  # fmt: skip
# DALL·E mini's text normalizer (ftfy, unidecode, emoji), and on a GPU bitsandbytes int8 (accelerate loads it).
DALLE_MINI_REQUIREMENTS = ("ftfy", "unidecode", "emoji")
INT8_REQUIREMENTS = ("bitsandbytes", "accelerate")
# cpu-basic has no GPU: the CPU wheel of torch is a few hundred MB instead of several GB.
TORCH_CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
CPU_HARDWARE = ("cpu-basic", "cpu-upgrade")
GPU_HARDWARE = ("t4-small", "t4-medium", "l4x1", "a10g-small", "a10g-large", "a100-large")
# float16 weights of the transformer, times this, plus the fixed part, must fit the GPU, else int8: the KV cache of a
# 3 x 3 grid, the VQGAN and CLIP, activations and the CUDA context.
GPU_MARGIN, GPU_FIXED_BYTES = 1.25, 2**30
_MODEL_LINE = 'MODEL_ID = os.environ.get("DALLE_HF_MODEL", "")'
_SETTINGS_LINE = "SETTINGS = {}"


def space_requirements(gpu: bool = False, extra: tuple[str, ...] = ()) -> str:
    """Exact pins of this environment: a CPU Space gets the CPU wheel index, a GPU Space PyPI's CUDA torch (the
    local version label, `+cpu`, dropped)."""
    lines = [] if gpu else [TORCH_CPU_INDEX]
    for name in SPACE_REQUIREMENTS + extra:
        pinned = version(name).split("+")[0] if gpu and name == "torch" else version(name)
        lines.append(f"{name}=={pinned}")
    return "\n".join(lines) + "\n"


def read_model_files(model_id: str) -> tuple[dict, dict | None]:
    """The repository's `model_index.json` and `transformer/config.json` (None when absent), from the Hub or its
    cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    with open(hf_hub_download(model_id, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    try:
        path = hf_hub_download(model_id, "config.json", subfolder="transformer")
    except EntryNotFoundError:
        return index, None
    with open(path, encoding="utf-8") as f:
        return index, json.load(f)


def transformer_parameters(config: dict) -> int:
    """Parameters of the DALL·E mini / Mega transformer `config` describes, counted on the meta device."""
    import torch

    from .configuration_dalle_bart import DalleBartConfig
    from .modeling_dalle_bart import DalleBartForImageGeneration

    with torch.device("meta"):
        model = DalleBartForImageGeneration(DalleBartConfig.from_dict(config))
    return sum(p.numel() for p in model.parameters())


def space_settings(index: dict, transformer_config: dict | None) -> dict:
    """What app.py needs to know of the model before loading it: the family, the UI's defaults, and for DALL·E mini /
    Mega the GPU memory above which float16 is used (int8 below), and the CPU dtype."""
    class_name = index["_class_name"]
    class_name = class_name[1] if isinstance(class_name, list) else class_name
    guidance = float(index.get("default_guidance_scale", 1.0))
    if class_name != "DalleMiniPipeline":
        return {"family": "dalle", "guidance": guidance, "max_guidance": max(6.0, guidance)}
    if transformer_config is None:
        raise ValueError("a DalleMiniPipeline repository needs transformer/config.json")
    parameters = transformer_parameters(transformer_config)
    return {
        "family": "dalle-mini", "parameters": parameters, "guidance": guidance, "max_guidance": max(16.0, guidance),
        "candidates": 4, "keep": 2, "max_candidates": 9, "cpu_dtype": "bfloat16",
        "fp16_min_gpu_bytes": int(2 * parameters * GPU_MARGIN + GPU_FIXED_BYTES),
    }  # fmt: skip


def export_space(out: str, model_id: str, title: str | None = None, hardware: str | None = None) -> list[str]:
    """Write the Space folder for the published model `model_id` ("org/name") into `out`; returns its files.

    `hardware` (a Space hardware name) defaults to `t4-small` for DALL·E mini / Mega and `cpu-basic` otherwise."""
    if model_id.count("/") != 1 or not all(model_id.split("/")):
        raise ValueError(f"--model must be a Hub repository id 'org/name', got {model_id!r}")
    if hardware is not None and hardware not in CPU_HARDWARE + GPU_HARDWARE:
        raise ValueError(f"--hardware must be one of {CPU_HARDWARE + GPU_HARDWARE}, got {hardware!r}")
    settings = space_settings(*read_model_files(model_id))
    mini = settings["family"] == "dalle-mini"
    hardware = hardware or ("t4-small" if mini else "cpu-basic")
    gpu = hardware in GPU_HARDWARE
    extra = (DALLE_MINI_REQUIREMENTS if mini else ()) + (INT8_REQUIREMENTS if gpu else ())

    os.makedirs(out, exist_ok=True)
    source = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "space_app.py"), encoding="utf-8").read()
    assert source.count(_MODEL_LINE) == 1, "space_app.py lost its MODEL_ID line"
    assert source.count(_SETTINGS_LINE) == 1, "space_app.py lost its SETTINGS line"
    app = source.replace(_MODEL_LINE, f'MODEL_ID = os.environ.get("DALLE_HF_MODEL", "{model_id}")')
    app = app.replace(_SETTINGS_LINE, f"SETTINGS = {settings!r}")
    with open(os.path.join(out, "app.py"), "w", encoding="utf-8") as f:
        f.write(app)
    with open(os.path.join(out, "requirements.txt"), "w", encoding="utf-8") as f:
        f.write(space_requirements(gpu=gpu, extra=extra))
    data = SpaceCardData(
        title=title or f"DALL-E {model_id.split('/')[1]}",
        sdk="gradio",
        sdk_version=version("gradio"),
        app_file="app.py",
        models=[model_id],
        suggested_hardware=hardware,
        short_description="Text to image with a DALL-E model made with dalle-hf",
    )
    if mini:
        runs = ("runs on a GPU (float16, or bitsandbytes int8 when the GPU's memory is short) or, slowly, on a CPU "
                "(bfloat16)")  # fmt: skip
        what = "DALL·E mini / Mega (Dayma et al.) converted to a dalle-hf pipeline"
    else:
        runs, what = "runs on a CPU", "a DALL-E (Ramesh et al. 2021) pipeline made with dalle-hf"
    body = (f"# {data.title}\n\nA Gradio demo of [{model_id}](https://huggingface.co/{model_id}), {what}. It loads the "
            f"model with `trust_remote_code=True` (the model repository carries its pipeline and model code) and "
            f"{runs}.\n")  # fmt: skip
    SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(os.path.join(out, "README.md"))
    return sorted(os.listdir(out))


__all__ = ["export_space", "space_requirements", "space_settings"]
