"""Tiny random components shared by the tests: CPU, 2 layers, width 32, a 4x4 token grid on 16x16 images."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from dalle_hf.configuration_dalle import DalleConfig
from dalle_hf.configuration_dvae import DalleVAEConfig
from dalle_hf.modeling_dalle import DalleForImageGeneration
from dalle_hf.modeling_dvae import DalleVAE
from dalle_hf.tokenization import train_text_tokenizer

torch.set_num_threads(1)

CAPTIONS = [
    "a red circle",
    "a blue square",
    "a green triangle left of a yellow diamond",
    "three small circles",
    "a pink square and a cyan circle",
    "a diamond above a triangle",
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_text_tokenizer(CAPTIONS * 10, vocab_size=300, text_seq_len=8)


def tiny_dalle_config(**overrides) -> DalleConfig:
    kwargs = dict(
        text_vocab_size=300, text_seq_len=8, image_vocab_size=32, image_grid_size=4, n_layer=2, n_head=2, n_embd=32
    )
    kwargs.update(overrides)
    return DalleConfig(**kwargs)


@pytest.fixture
def transformer():
    torch.manual_seed(0)
    return DalleForImageGeneration(tiny_dalle_config()).eval()


def tiny_vae() -> DalleVAE:
    torch.manual_seed(0)
    config = DalleVAEConfig(image_size=16, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32)
    return DalleVAE(config).eval()


def tiny_clip(tokenizer):
    """(CLIPModel, CLIPProcessor) for 16x16 images and the tiny tokenizer."""
    from transformers import CLIPModel

    from dalle_hf.clip import make_clip_config, make_clip_processor

    torch.manual_seed(0)
    config = make_clip_config(
        len(tokenizer), text_seq_len=8, image_size=16, patch_size=4, vision_width=32, vision_layers=2,
        text_width=32, text_layers=2, projection_dim=32, head_dim=16,
    )
    return CLIPModel(config).eval(), make_clip_processor(tokenizer, image_size=16)


def save_tiny_pipeline(path, tokenizer, with_clip: bool = False):
    """Save a float32 pipeline whose Linear shapes suit bitsandbytes' kernels (width 128: K and N multiples of 32
    and of two 4-bit blocks of 64, so a transposed `absmax` would show); returns `path`."""
    from dalle_hf.pipeline_dalle import DallePipeline

    torch.manual_seed(0)
    transformer = DalleForImageGeneration(tiny_dalle_config(n_embd=128, n_head=4)).eval()
    clip_model, clip_processor = tiny_clip(tokenizer) if with_clip else (None, None)
    pipe = DallePipeline(
        tokenizer=tokenizer, transformer=transformer, vae=tiny_vae(), clip_model=clip_model,
        clip_processor=clip_processor,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture
def vae():
    return tiny_vae()


@pytest.fixture
def clip(tokenizer):
    return tiny_clip(tokenizer)


@pytest.fixture
def pipe(tokenizer, transformer, vae, clip):
    from dalle_hf.pipeline_dalle import DallePipeline

    pipe = DallePipeline(
        tokenizer=tokenizer, transformer=transformer, vae=vae, clip_model=clip[0], clip_processor=clip[1]
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_folder(root, images: dict, captions: dict | None = None):
    """An imagefolder (`--dataset imagefolder`): `images` ({file name: PIL image}) saved under `root` with a
    metadata.jsonl of `captions` ({file name: text}; default "caption of NAME")."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(root / name)
    captions = captions or {name: f"caption of {name}" for name in images}
    with open(root / "metadata.jsonl", "w") as f:
        for name, text in captions.items():
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")


def load_script(path):
    """Import a script that is not part of the package (e.g. `benchmarks/gpu_check.py`) as a module, by file path."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _autograd_left_on():
    """Fail the test that turns autograd off for the rest of the session (importing the `min_dalle` package does, in
    its `__init__`: reference code is loaded by path instead) rather than the training tests that run after it."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left torch's autograd off for the rest of the session")
