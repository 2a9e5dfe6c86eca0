"""The checkpoints shipped in checkpoints/ (dalle-shapes, dalle-emoji) load on a fresh clone and generate."""

import json
from pathlib import Path

import pytest
import torch

from dalle_hf.pipeline_dalle import DallePipeline

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "dalle-shapes"
EMOJI = CHECKPOINT.parent / "dalle-emoji"
CHECKPOINTS_BUDGET = 100 * 2**20  # all of checkpoints/ (every version stays in git history)


def test_checkpoint_is_complete_and_small():
    index = json.loads((CHECKPOINT / "model_index.json").read_text())
    assert index["_class_name"] == "DallePipeline"
    for component in ("tokenizer", "transformer", "vae", "clip_model", "clip_processor"):
        assert index[component][0] is not None and (CHECKPOINT / component).is_dir(), component
    files = [p for p in CHECKPOINT.parent.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]  # safetensors only
    assert sum(p.stat().st_size for p in files) < CHECKPOINTS_BUDGET
    assert "python -m dalle_hf.train_dalle" in (CHECKPOINT / "README.md").read_text()


@pytest.mark.latest
def test_shipped_pipeline_generates():
    pipe = DallePipeline.from_pretrained(CHECKPOINT)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.default_guidance_scale == 3.0  # chosen on ShapesEval dev candidates for reranking (card)
    out = pipe(
        "a red circle", num_images_per_prompt=2, num_images_to_keep=1, generator=torch.Generator().manual_seed(0)
    )
    assert len(out.images) == 1 and out.images[0].size == (64, 64)
    assert out.clip_scores.shape == (1, 1)
    assert out.image_tokens.shape == (1, 16, 16)
    # the same seed gives the same image
    again = pipe(
        "a red circle", num_images_per_prompt=2, num_images_to_keep=1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out.image_tokens, again.image_tokens)


def test_emoji_checkpoint_is_complete_and_carries_its_world():
    from dalle_hf.data.emoji import STYLES
    from dalle_hf.data.world import read_world_file

    index = json.loads((EMOJI / "model_index.json").read_text())
    for component in ("tokenizer", "transformer", "vae", "clip_model", "clip_processor"):
        assert index[component][0] is not None and (EMOJI / component).is_dir(), component
    world = read_world_file(str(EMOJI))
    assert world["world"] == "emoji" and world["styles"] == list(STYLES)
    assert {"apple", "cat", "rocket", "twemoji"} <= set(world["words"])
    assert "red apple in twemoji style" in world["examples"]
    card = (EMOJI / "README.md").read_text()
    assert "python -m dalle_hf.train_dalle" in card and "--dataset emoji" in card
    assert "CC BY 4.0" in card and "Twemoji" in card  # the attribution the CC BY styles ask for


@pytest.mark.latest
def test_shipped_emoji_pipeline_generates():
    pipe = DallePipeline.from_pretrained(EMOJI)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("red apple in twemoji style", num_images_per_prompt=2, num_images_to_keep=1,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    # the emoji model's design: 32 px images as 8 x 8 codes (docs/emoji-world.md, "The probe")
    assert len(out.images) == 1 and out.images[0].size == (32, 32) and out.image_tokens.shape == (1, 8, 8)
    again = pipe("red apple in twemoji style", num_images_per_prompt=2, num_images_to_keep=1,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(out.image_tokens, again.image_tokens)
