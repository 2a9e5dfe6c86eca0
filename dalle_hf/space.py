"""`dalle-hf export-space DIR --model org/name`: a Hugging Face Space folder that runs a published dalle-hf model.

The folder holds `app.py` (a copy of `dalle_hf/space_app.py` with the model id filled in), `requirements.txt` with
exact pins (the versions dalle-hf is tested with, read from this environment) and a `README.md` whose front matter
(`huggingface_hub.SpaceCardData`) says `sdk: gradio`, the SDK version, `models:` and `suggested_hardware: cpu-basic`.
The Space needs no dalle-hf: the model repository carries its code (`dalle_hf.hub`).
"""

import os
from importlib.metadata import version

from huggingface_hub import SpaceCard, SpaceCardData

# What app.py and the model repository's code import (diffusers pipeline, transformers models and CLIP, the
# tokenizers backend, safetensors weights, PIL/numpy images); pinned to the versions installed here.
SPACE_REQUIREMENTS = (
    "torch", "diffusers", "transformers", "tokenizers", "safetensors", "huggingface_hub", "gradio", "pillow", "numpy",
)  # fmt: skip
# cpu-basic has no GPU: the CPU wheel of torch is a few hundred MB instead of several GB.
TORCH_CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
_MODEL_LINE = 'MODEL_ID = os.environ.get("DALLE_HF_MODEL", "")'


def space_requirements() -> str:
    return TORCH_CPU_INDEX + "\n" + "".join(f"{name}=={version(name)}\n" for name in SPACE_REQUIREMENTS)


def export_space(out: str, model_id: str, title: str | None = None) -> list[str]:
    """Write the Space folder for the published model `model_id` ("org/name") into `out`; returns its files."""
    if model_id.count("/") != 1 or not all(model_id.split("/")):
        raise ValueError(f"--model must be a Hub repository id 'org/name', got {model_id!r}")
    os.makedirs(out, exist_ok=True)
    source = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "space_app.py"), encoding="utf-8").read()
    assert source.count(_MODEL_LINE) == 1, "space_app.py lost its MODEL_ID line"
    app = source.replace(_MODEL_LINE, f'MODEL_ID = os.environ.get("DALLE_HF_MODEL", "{model_id}")')
    with open(os.path.join(out, "app.py"), "w", encoding="utf-8") as f:
        f.write(app)
    with open(os.path.join(out, "requirements.txt"), "w", encoding="utf-8") as f:
        f.write(space_requirements())
    data = SpaceCardData(
        title=title or f"DALL-E {model_id.split('/')[1]}",
        sdk="gradio",
        sdk_version=version("gradio"),
        app_file="app.py",
        models=[model_id],
        suggested_hardware="cpu-basic",
        short_description="Text to image with a DALL-E model made with dalle-hf",
    )
    body = (f"# {data.title}\n\nA Gradio demo of [{model_id}](https://huggingface.co/{model_id}), a DALL-E "
            "(Ramesh et al. 2021) pipeline made with dalle-hf. It loads the model with `trust_remote_code=True` "
            "(the model repository carries its pipeline and model code) and runs on a CPU.\n")  # fmt: skip
    SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(os.path.join(out, "README.md"))
    return sorted(os.listdir(out))


__all__ = ["export_space", "space_requirements"]
