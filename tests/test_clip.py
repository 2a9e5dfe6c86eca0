"""Tests for dalle_hf.clip (tiny CLIP, processor round trip, score functions) and dalle_hf.train_clip."""

import inspect
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from dalle_hf.clip import (
    clip_image_image_scores,
    clip_pixel_values,
    clip_text_image_scores,
    make_clip_config,
    make_clip_processor,
)
from dalle_hf.tokenization import train_text_tokenizer

TINY = dict(
    text_seq_len=8, image_size=32, patch_size=8, vision_width=32, vision_layers=2, text_width=32, text_layers=2,
    projection_dim=32, head_dim=16,
)  # fmt: skip
CAPTIONS = ["a red circle", "a blue square", "a square left of a triangle", "three triangles", "two green circles"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(CAPTIONS * 4, vocab_size=300, text_seq_len=8)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return make_clip_processor(tokenizer, image_size=32)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return CLIPModel(make_clip_config(len(tokenizer), **TINY)).eval()


def test_config_pools_at_eos(tokenizer, model):
    config = make_clip_config(len(tokenizer), **TINY)
    assert config.text_config.eos_token_id == 1 and config.text_config.pad_token_id == 0
    assert config.text_config.max_position_embeddings == 8
    assert config.vision_config.image_size == 32 and config.vision_config.num_attention_heads == 2
    # Pooling reads the first <eos> (id 1): anything after it must not change the text embedding.
    ids = tokenizer(["a red circle"], padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    eos = ids[0].tolist().index(1)
    changed = ids.clone()
    changed[0, eos + 1 :] = 5
    with torch.no_grad():
        a = model.get_text_features(input_ids=ids).pooler_output
        b = model.get_text_features(input_ids=changed).pooler_output
    torch.testing.assert_close(a, b)


def test_config_validation():
    with pytest.raises(ValueError, match="patch_size"):
        make_clip_config(300, image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="head_dim"):
        make_clip_config(300, vision_width=40, head_dim=32)


def test_documented_defaults_match_signature():
    for fn in (make_clip_config, make_clip_processor):
        doc = inspect.getdoc(fn)
        for name, param in inspect.signature(fn).parameters.items():
            if param.default is not inspect.Parameter.empty:
                assert f"{name} (`" in doc and f"defaults to {param.default}" in doc.split(f"{name} (`")[1].split("\n")[0]


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = CLIPProcessor.from_pretrained(tmp_path)
    assert type(loaded.image_processor).__name__ == "CLIPImageProcessorPil"
    assert loaded.image_processor.crop_size["height"] == 32 and loaded.image_processor.crop_size["width"] == 32
    assert loaded.tokenizer.pad_token_id == 0 and loaded.tokenizer.eos_token_id == 1
    assert loaded.tokenizer.model_max_length == 8
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    a = processor(text=CAPTIONS[:2], images=[image, image], padding="max_length", truncation=True, return_tensors="pt")
    b = loaded(text=CAPTIONS[:2], images=[image, image], padding="max_length", truncation=True, return_tensors="pt")
    assert a["input_ids"].shape == (2, 8)
    torch.testing.assert_close(a["input_ids"], b["input_ids"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])


def test_clip_pixel_values_matches_processor(processor):
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    image.paste((200, 30, 30), (4, 4, 20, 20))
    reference = processor(images=image, return_tensors="pt")["pixel_values"]
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255  # (1, 3, H, W)
    torch.testing.assert_close(clip_pixel_values(tensor, processor), reference, atol=1e-4, rtol=1e-4)
    assert clip_pixel_values(torch.rand(3, 3, 64, 64), processor).shape == (3, 3, 32, 32)


def test_score_functions(model, processor, tokenizer):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    scores = clip_text_image_scores(model, processor, images, CAPTIONS[:3])
    assert scores.shape == (3,) and scores.dtype == torch.float32 and not scores.requires_grad
    ids = tokenizer(CAPTIONS[:3], padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(clip_text_image_scores(model, processor, images, ids), scores)
    # Cosine similarity times exp(logit_scale) = 1 / 0.07 at initialization.
    assert scores.abs().max() <= 1 / 0.07 + 1e-3
    one = clip_text_image_scores(model, processor, images[:1], "a red circle")
    torch.testing.assert_close(one, scores[:1])

    same = clip_image_image_scores(model, processor, images, images)
    torch.testing.assert_close(same, torch.full((3,), model.logit_scale.exp().item()))
    broadcast = clip_image_image_scores(model, processor, images, images[:1])
    assert broadcast.shape == (3,)
    torch.testing.assert_close(broadcast[0], same[0])


def test_score_functions_validate(model, processor):
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="one text per image"):
        clip_text_image_scores(model, processor, images, ["a red circle"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clip_text_image_scores(model, processor, images[0], ["a", "b"])
    with pytest.raises(ValueError, match="float"):
        clip_text_image_scores(model, processor, (images * 255).to(torch.uint8), ["a", "b"])
    with pytest.raises(ValueError, match="LongTensor"):
        clip_text_image_scores(model, processor, images, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="reference_images"):
        clip_image_image_scores(model, processor, images, torch.rand(3, 3, 32, 32))
