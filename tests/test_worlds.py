"""The world interface (dalle_hf/data/world.py): every world behind it, the emoji world's captions and hard negatives,
and the three training scripts on a tiny emoji cache written here (no network, no real cache)."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from dalle_hf.data.emoji import (
    CACHE_IMAGES,
    CACHE_METADATA,
    STYLE_ALIASES,
    is_held_out,
    plain_prompt,
    style_prompt,
    true_captions,
)
from dalle_hf.data.world import World, load_world, world_names

# Six concepts in two subgroups, drawn in five styles: 30 pairs, three held out by the real rule.
CONCEPTS = {
    "1f34e": ("red apple", "food-fruit"),
    "1f350": ("pear", "food-fruit"),
    "1f34c": ("banana", "food-fruit"),
    "1f431": ("cat face", "animal-mammal"),
    "1f98a": ("fox", "animal-mammal"),  # held out in fluent 3d
    "1f43d": ("pig nose", "animal-mammal"),  # held out in noto and twemoji
}
TINY_STYLES = ("noto", "twemoji", "fluent 3d", "noto mono", "symbola")


def write_tiny_cache(folder) -> str:
    """An emoji cache in the layout `build_emoji_cache` writes: every concept in every tiny style, each image a
    flat colour per concept with a style-dependent box."""
    os.makedirs(folder, exist_ok=True)
    images, keys, labels, styles, held = [], [], [], [], []
    for c, (key, (label, _)) in enumerate(CONCEPTS.items()):
        for s, style in enumerate(TINY_STYLES):
            image = np.full((64, 64, 3), 255, np.uint8)
            image[8 + 4 * s : 56 - 4 * s, 8:56] = (40 * c, 200 - 30 * s, 100)
            images.append(image)
            keys.append(key)
            labels.append(label)
            styles.append(style)
            held.append(is_held_out(key, style))
    np.savez_compressed(os.path.join(folder, CACHE_IMAGES), images=np.stack(images), keys=np.array(keys),
                        labels=np.array(labels), styles=np.array(styles), held_out=np.array(held))  # fmt: skip
    concepts = {key: {"emoji": "?", "label": label, "tags": [], "group": subgroup.split("-")[0], "subgroup": subgroup,
                      "unicode_name": ""} for key, (label, subgroup) in CONCEPTS.items()}  # fmt: skip
    summary = {"concepts": len(CONCEPTS), "images": len(images), "held_out_pairs": int(sum(held)),
               "per_style": {style: {} for style in TINY_STYLES}}  # fmt: skip
    with open(os.path.join(folder, CACHE_METADATA), "w") as f:
        json.dump({"concepts": concepts, "packages": {}, "summary": summary}, f)
    return str(folder)


@pytest.fixture
def cache(tmp_path):
    return write_tiny_cache(tmp_path / "emoji-cache")


def test_the_held_out_rule_holds_out_some_tiny_pairs():
    held = [(key, style) for key in CONCEPTS for style in TINY_STYLES if is_held_out(key, style)]
    assert 0 < len(held) < len(CONCEPTS) * len(TINY_STYLES)  # the fixture exercises both kinds of pair


def test_worlds_say_whether_they_have_held_out_examples():
    """`has_held_out_examples` (the --held_out_images default and check) matches what each world implements."""
    from dalle_hf.data.world import _world_class

    for name in world_names():
        cls = _world_class(name)
        assert cls.has_held_out_examples == (cls.held_out_examples is not World.held_out_examples), name
    assert _world_class("emoji").has_held_out_examples and not _world_class("imagefolder").has_held_out_examples


def test_world_names_and_errors(tmp_path):
    assert {"shapes", "emoji", "imagefolder"} <= set(world_names())
    with pytest.raises(ValueError, match=r"one of \[.*'emoji'.*\], got 'pictures'"):
        load_world("pictures")
    with pytest.raises(ValueError, match="needs --train_data_dir .*dalle-hf data emoji"):
        load_world("emoji")
    with pytest.raises(ValueError, match="expected emoji.npz and emoji.json"):
        load_world("emoji", str(tmp_path))
    with pytest.raises(ValueError, match="takes no --train_data_dir"):
        load_world("shapes", str(tmp_path))
    with pytest.raises(ValueError, match="takes none of the options"):
        load_world("emoji", str(tmp_path), task_weights="colors=2")


def test_a_third_world_is_one_file(tmp_path, monkeypatch):
    """A module dropped into dalle_hf.data's search path, defining a World, is a `--dataset` at once."""
    import dalle_hf.data

    (tmp_path / "flatcolors.py").write_text('''
import torch
from torch.utils.data import Dataset
from dalle_hf.data.world import World

class Flat(Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return {"pixel_values": torch.full((3, 8, 8), i / 4), "text": f"grey {i}"}

class FlatColorsWorld(World):
    name = "flatcolors"
    def train_dataset(self, image_size, seed):
        return Flat()
    def tokenizer_captions(self, seed=0):
        return [f"grey {i}" for i in range(4)]
''')
    monkeypatch.setattr(dalle_hf.data, "__path__", [*dalle_hf.data.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "dalle_hf.data.flatcolors", raising=False)
    assert "flatcolors" in world_names()
    world = load_world("flatcolors")
    assert isinstance(world, World) and world.train_dataset(8, 0)[1]["text"] == "grey 1"
    assert not world.has_ranking_set and world.caption_is_true("grey 1", {"text": "grey 1"})
    with pytest.raises(ValueError, match="candidate_bank"):
        world.candidate_bank(["bank"])


def test_emoji_training_data_never_shows_a_held_out_pair(cache):
    world = load_world("emoji", cache)
    dataset = world.train_dataset(image_size=64, seed=0)
    seen = {(dataset[i]["key"], dataset[i]["style"]) for i in range(len(dataset))}
    expected = {(k, s) for k in CONCEPTS for s in TINY_STYLES if not is_held_out(k, s)}
    assert seen == expected
    # captions, negatives and the tokenizer's corpus never name a held-out pair in its canonical form either
    held_captions = {style_prompt(CONCEPTS[k][0], s) for k in CONCEPTS for s in TINY_STYLES if is_held_out(k, s)}
    clip = world.clip_dataset(64, seed=0, num_negatives=6)
    texts = [t for _ in range(5) for i in range(len(clip)) for t in (clip[i]["text"], *clip[i]["negatives"])]
    assert held_captions and not held_captions & set(texts)
    assert not held_captions & set(world.tokenizer_captions())


def test_emoji_caption_mix_and_resizing(cache):
    world = load_world("emoji", cache)
    dataset = world.train_dataset(image_size=32, seed=0)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 32, 32) and 0 <= item["pixel_values"].min() <= 1
    label, style = item["label"], item["style"]
    dataset = world.train_dataset(image_size=32, seed=0)
    texts = [dataset.text(0) for _ in range(400)]
    assert set(texts) <= true_captions(label, style)
    assert texts.count(style_prompt(label, style)) > 200  # 70% styled
    assert plain_prompt(label) in texts and any(style_prompt(label, a) in texts for a in STYLE_ALIASES[style])
    again = world.train_dataset(image_size=32, seed=0)
    assert [again.text(0) for _ in range(400)] == texts  # seeded


def test_emoji_training_crops_at_the_render_resolution(cache):
    from dalle_hf.data.world import random_square_crop

    dataset = load_world("emoji", cache).train_dataset(image_size=32, seed=0)
    # the whole render as the "crop" is the training image itself: the same resize
    assert torch.equal(dataset.augmented_pixel_values(3, 1, 1.0, seed=0), dataset[3]["pixel_values"])
    crop = dataset.augmented_pixel_values(3, 1, 0.5, seed=0)
    assert crop.shape == (3, 32, 32) and 0 <= crop.min() and crop.max() <= 1
    assert torch.equal(crop, dataset.augmented_pixel_values(3, 1, 0.5, seed=0))  # deterministic
    assert not torch.equal(crop, dataset[3]["pixel_values"])
    # the crop is taken from the 64 px render, then resized
    left, top, side = random_square_crop(64, 3, 1, 0.5, 0)
    render = dataset.renders[3]["pixel_values"][:, top : top + side, left : left + side]
    expected = torch.nn.functional.interpolate(render[None], size=32, mode="bicubic", antialias=True)[0].clamp(0, 1)
    assert torch.equal(crop, expected)
    boxes = {random_square_crop(64, i, v, 0.85, 0) for i in range(50) for v in range(1, 4)}  # sides 54 .. 64
    assert len(boxes) > 100 and all(54 <= s <= 64 and 0 <= x <= 64 - s and 0 <= y <= 64 - s for x, y, s in boxes)


def test_emoji_hard_negatives_are_false_and_of_both_kinds(cache):
    world = load_world("emoji", cache)
    import random

    rng = random.Random(0)
    negatives = world.hard_negatives("1f34e", "noto", "red apple in noto style", 4, rng)
    assert negatives and all(n not in true_captions("red apple", "noto") for n in negatives)
    assert any(n.startswith("red apple in ") for n in negatives)  # the same concept in another style
    assert any(n in ("pear in noto style", "banana in noto style") for n in negatives)  # its subgroup, this style
    assert not any(n.startswith(("cat face", "fox", "pig nose")) for n in negatives)  # never another subgroup
    # an alias caption's concept negatives keep the alias; a plain caption's are plain labels
    alias = world.hard_negatives("1f34e", "noto", "red apple in google style", 4, rng)
    assert all(n.endswith(" google style") or n.startswith("red apple in ") for n in alias)
    assert set(world.hard_negatives("1f34e", "noto", "red apple", 4, rng)) <= {"pear", "banana"}


def test_emoji_false_negative_mask(cache, tmp_path):
    from dalle_hf.tokenization import train_text_tokenizer
    from dalle_hf.train_clip import collate_contrastive

    world = load_world("emoji", cache)
    tokenizer = train_text_tokenizer(list(world.tokenizer_captions()), 300, 12)
    pixels = torch.zeros(3, 64, 64)
    examples = [
        {"pixel_values": pixels, "text": "red apple in noto style", "negatives": ["red apple in twemoji style"],
         "label": "red apple", "style": "noto"},
        {"pixel_values": pixels, "text": "red apple", "negatives": ["pear"], "label": "red apple", "style": "twemoji"},
    ]  # fmt: skip
    mask = collate_contrastive(examples, tokenizer, world)["false_negative_mask"]
    # columns: "red apple in noto style", "red apple" | "red apple in twemoji style", "pear"
    expected = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(mask, expected)  # the plain label is true of both; twemoji only of the twemoji one


def test_emoji_caption_ranking_set(cache):
    world = load_world("emoji", cache)
    ranking = world.caption_ranking_set(n_images=6, n_captions=8, seed=1)
    again = world.caption_ranking_set(n_images=6, n_captions=8, seed=1)
    assert ranking.pixel_values.shape == (6, 3, 64, 64) and ranking.candidates == again.candidates
    for candidates, group in zip(ranking.candidates, ranking.groups):
        assert len(candidates) == len(set(candidates)) == 8 and candidates[0].endswith(f" in {group} style")
        label = candidates[0][: -len(f" in {group} style")]
        assert not set(candidates[1:]) & true_captions(label, group)
    with pytest.raises(ValueError, match="n_captions >= 2"):
        world.caption_ranking_set(n_images=2, n_captions=1)


def test_emoji_evaluate_vae_reports_psnr_on_held_out_renders(cache):
    from dalle_hf import DalleVAE, DalleVAEConfig

    vae = DalleVAE(DalleVAEConfig(image_size=64, num_groups=3, n_hid=8, n_blk_per_group=1, vocab_size=16)).eval()
    report = load_world("emoji", cache).evaluate_vae(vae, n=4, seed=0)
    assert 0 < report["psnr_held_out"] < 60 and report["reconstruction_mse"] > 0
    assert load_world("emoji", cache).evaluate_vae(vae, n=0, seed=0) == {}


def test_three_training_scripts_on_the_emoji_world(cache, tmp_path):
    """dVAE -> CLIP (trains the tokenizer) -> transformer on the tiny cache, as the shipped emoji model was made."""
    from dalle_hf import train_clip, train_dalle, train_dvae

    world_flags = ["--dataset", "emoji", "--train_data_dir", cache]
    vae_dir = str(tmp_path / "dvae")
    vae_result = train_dvae.main(train_dvae.parse_args([
        "--output_dir", vae_dir, *world_flags, "--max_train_steps", "2", "--train_batch_size", "4", "--n_hid", "8",
        "--n_blk_per_group", "1", "--vocab_size", "16", "--eval_n_per_task", "3", "--logging_steps", "1",
    ]))  # fmt: skip
    assert vae_result["eval"]["psnr_held_out"] > 0 and vae_result["eval"]["codes_in_use"] >= 1
    card = open(os.path.join(vae_dir, "vae", "README.md")).read()
    assert "the emoji world" in card and "psnr_held_out" in card

    clip_dir = str(tmp_path / "clip")
    clip_result = train_clip.main(train_clip.parse_args([
        "--output_dir", clip_dir, *world_flags, "--max_train_steps", "2", "--train_batch_size", "4",
        "--num_hard_negatives", "2", "--image_size", "32", "--vision_width", "32", "--text_width", "32",
        "--num_layers", "1", "--vocab_size", "300", "--text_seq_len", "12", "--validation_steps", "2",
        "--num_validation_images", "5", "--logging_steps", "1",
    ]))  # fmt: skip
    assert [v["step"] for v in clip_result["validations"]] == [2]
    card = open(os.path.join(clip_dir, "clip_model", "README.md")).read()
    assert "the emoji world" in card and "other concepts of its subgroup" in card

    dalle_dir = str(tmp_path / "dalle")
    result = train_dalle.main(train_dalle.parse_args([
        "--output_dir", dalle_dir, *world_flags, "--vae_name_or_path", os.path.join(vae_dir, "vae"),
        "--tokenizer_name_or_path", os.path.join(clip_dir, "tokenizer"), "--text_seq_len", "12", "--n_layer", "1",
        "--n_head", "2", "--n_embd", "32", "--max_train_steps", "2", "--train_batch_size", "4",
        "--logging_steps", "1", "--validation_steps", "100",
    ]))  # fmt: skip
    assert len(result["history"]) == 2 and all(np.isfinite(h["loss"]) for h in result["history"])
    assert os.path.isfile(os.path.join(dalle_dir, "samples", "step-0000002.png"))  # the world's validation prompts
    assert "the emoji world" in open(os.path.join(dalle_dir, "README.md")).read()


def test_world_file_carries_examples_styles_and_words(cache, tmp_path):
    from dalle_hf.data.world import caption_words, read_world_file, write_world_file

    assert caption_words("A Cat-face, in 3D!") == ["a", "cat", "face", "in", "3d"]
    shapes = load_world("shapes").metadata()
    assert shapes["world"] == "shapes" and "triangle" in shapes["words"] and "hat" not in shapes["words"]
    assert "styles" not in shapes and shapes["examples"][0] == "a circle"
    write_world_file(load_world("emoji", cache), str(tmp_path))
    emoji = read_world_file(str(tmp_path))
    assert emoji["styles"] == ["noto", "noto mono", "twemoji", "fluent 3d", "symbola"]  # the table's order
    assert emoji["style_prompt"] == "{label} in {style} style"
    assert {"apple", "pear", "twemoji", "monochrome", "style"} <= set(emoji["words"])
    assert emoji["style_aliases"]["noto mono"] == list(STYLE_ALIASES["noto mono"])
    assert read_world_file(str(tmp_path / "nowhere")) is None
