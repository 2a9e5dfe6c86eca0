"""Tests for dalle_hf.clip (tiny CLIP, processor round trip, score functions) and dalle_hf.train_clip."""

import inspect
import json
import math
import os
import random

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
    from dalle_hf.train_clip import evaluate_clip_caption_ranking

    for fn in (make_clip_config, make_clip_processor, evaluate_clip_caption_ranking):
        doc = inspect.getdoc(fn)
        for name, param in inspect.signature(fn).parameters.items():
            if param.default is not inspect.Parameter.empty:
                documented = doc.split(f"{name} (`")[1].split("\n")[0]
                assert f"defaults to {param.default}" in documented.replace("`", ""), (fn.__name__, name)


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


# ----------------------------------------------------------------------------- train_clip


def test_contrastive_loss_masks_false_negatives():
    from dalle_hf.train_clip import contrastive_loss

    logits = torch.tensor([[5.0, 5.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])  # (B=2, B + B*K with K=1)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    unmasked = contrastive_loss(logits, mask)
    mask[0, 1] = True  # caption 1 is also true of image 0: it leaves image 0's softmax (and caption 1's)
    masked = contrastive_loss(logits, mask)
    assert masked < unmasked
    inf = float("inf")
    i2t = torch.nn.functional.cross_entropy(torch.tensor([[5.0, -inf, 0, 0], [0, 5.0, 0, 0]]), torch.arange(2))
    t2i = torch.nn.functional.cross_entropy(torch.tensor([[5.0, 0.0], [-inf, 5.0]]), torch.arange(2))
    torch.testing.assert_close(masked, (i2t + t2i) / 2)


def test_collate_marks_captions_true_of_other_images(tokenizer):
    from dalle_hf.data.shapes import ShapeObject
    from dalle_hf.data.world import load_world
    from dalle_hf.train_clip import collate_contrastive

    red_circle = (ShapeObject("circle", "red", "large", 32.0, 32.0, 26),)
    blue_square = (ShapeObject("square", "blue", "large", 32.0, 32.0, 26),)
    pixels = torch.zeros(3, 32, 32)
    examples = [
        {"pixel_values": pixels, "text": "a red circle", "negatives": ["a blue circle"], "objects": red_circle},
        {"pixel_values": pixels, "text": "a circle", "negatives": ["a square"], "objects": red_circle},
        {"pixel_values": pixels, "text": "a square", "negatives": ["a circle"], "objects": blue_square},
    ]
    batch = collate_contrastive(examples, tokenizer, load_world("shapes"))
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["input_ids"].shape == (6, 8)
    # columns: a red circle, a circle, a square | a blue circle, a square, a circle
    expected = torch.tensor(
        [[0, 1, 0, 0, 0, 1], [1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0]], dtype=torch.bool
    )  # image 2's own negative "a circle" is false for it; "a square" (image 1's negative) is true of it
    torch.testing.assert_close(batch["false_negative_mask"], expected)


def test_structure_negatives():
    from dalle_hf.data.shapes import Scene, ShapeObject, caption_holds, structure_negatives

    left = ShapeObject("circle", "red", "large", 16.0, 32.0, 20)
    right = ShapeObject("square", "blue", "large", 48.0, 32.0, 20)
    scene = Scene((left, right), "a red circle left of a blue square", "position", "left of")
    negatives = structure_negatives(scene)
    assert negatives == [
        "a red circle right of a blue square", "a red circle above a blue square", "a red circle below a blue square",
        "a blue square left of a red circle", "a blue circle left of a red square",
    ]  # fmt: skip
    assert not any(caption_holds(n, scene.objects) for n in negatives)
    # A colour swap that would name a held-out pair (purple triangle) is left out.
    triangle = ShapeObject("triangle", "red", "large", 16.0, 32.0, 20)
    circle = ShapeObject("circle", "purple", "large", 48.0, 32.0, 20)
    scene = Scene((triangle, circle), "a red triangle and a purple circle", "color_attr")
    assert structure_negatives(scene) == []
    assert structure_negatives(Scene((circle,), "a purple circle", "colors")) == []


def test_optimizer_decays_only_matrices(model):
    from dalle_hf.train_clip import make_optimizer, parse_args

    optimizer = make_optimizer(model, parse_args(["--output_dir", "x"]))
    decay, no_decay = ({id(p) for p in group["params"]} for group in optimizer.param_groups)
    assert id(model.visual_projection.weight) in decay and id(model.logit_scale) in no_decay
    assert optimizer.param_groups[0]["weight_decay"] == 0.2 and optimizer.param_groups[1]["weight_decay"] == 0.0


def test_caption_ranking_set_is_fixed_and_hard():
    from dalle_hf.data.shapes import TASKS, caption_ranking_set

    ranking = caption_ranking_set(n_images=12, n_captions=32, seed=3)
    pixels, candidates, tasks = ranking.pixel_values, ranking.candidates, ranking.groups
    again = caption_ranking_set(n_images=12, n_captions=32, seed=3)
    assert pixels.shape == (12, 3, 64, 64) and 0 <= pixels.min() and pixels.max() <= 1
    torch.testing.assert_close(pixels, again.pixel_values)
    assert candidates == again.candidates and tasks == list(TASKS) * 2
    assert all(len(c) == 32 and len(set(c)) == 32 for c in candidates)


def test_evaluate_clip_caption_ranking(tokenizer, model, processor):
    from dalle_hf.train_clip import evaluate_clip_caption_ranking

    # The tiny model sees 64x64 renders resized to 32x32; untrained it is near chance (1/8).
    accuracy, per_task = evaluate_clip_caption_ranking(model, processor, n_images=12, n_captions=8, seed=0,
                                                       return_per_task=True)  # fmt: skip
    assert 0.0 <= accuracy <= 1.0 and set(per_task) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"
    }  # fmt: skip
    assert model.training is False
    assert evaluate_clip_caption_ranking(model, processor, n_images=12, n_captions=8, seed=0) == accuracy


TRAIN_ARGS = [
    "--max_train_steps", "4", "--train_batch_size", "4", "--num_hard_negatives", "2", "--image_size", "32",
    "--vision_width", "32", "--text_width", "32", "--num_layers", "2", "--vocab_size", "300",
    "--text_seq_len", "16", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--logging_steps", "2",
    "--validation_steps", "2", "--num_validation_images", "6", "--lr_warmup_steps", "1",
]  # fmt: skip


def test_parse_args_validates():
    from dalle_hf.train_clip import parse_args

    with pytest.raises(ValueError, match="num_hard_negatives"):
        parse_args(["--output_dir", "x", "--num_hard_negatives", "-1"])
    with pytest.raises(ValueError, match="train_data_dir"):
        parse_args(["--output_dir", "x", "--dataset", "imagefolder"])
    args = parse_args(["--output_dir", "x"])
    assert args.dataset == "shapes" and args.num_hard_negatives == 8 and args.train_batch_size == 64


@pytest.mark.latest
def test_train_clip_end_to_end_and_resume(tmp_path):
    from dalle_hf import train_clip
    from dalle_hf.training_utils import world_from_args

    out = str(tmp_path / "clip")
    result = train_clip.main(train_clip.parse_args(["--output_dir", out, *TRAIN_ARGS]))
    assert [h["step"] for h in result["history"]] == [2, 4]
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    assert [v["step"] for v in result["validations"]] == [2, 4] and result["images_seen"] == 16
    assert sorted(os.listdir(out)) == ["checkpoint-2", "clip_model", "clip_processor", "tokenizer"]
    model = CLIPModel.from_pretrained(os.path.join(out, "clip_model"))
    processor = CLIPProcessor.from_pretrained(os.path.join(out, "clip_processor"))
    assert model.config.text_config.eos_token_id == 1 and model.config.vision_config.image_size == 32
    assert processor.tokenizer.model_max_length == 16 and processor.image_processor.crop_size["height"] == 32
    card = open(os.path.join(out, "clip_model", "README.md")).read()
    assert "python -m dalle_hf.train_clip" in card and "caption top-1" in card
    scores = clip_text_image_scores(model, processor, torch.rand(2, 3, 64, 64), ["a red circle", "three squares"])
    assert scores.shape == (2,)

    # Resume from the step-2 checkpoint and train to step 6: the state and the tokenizer are reloaded.
    args = train_clip.parse_args(["--output_dir", out, *TRAIN_ARGS, "--max_train_steps", "6",
                                  "--resume_from_checkpoint", "latest"])  # fmt: skip
    resumed = train_clip.main(args)
    assert [h["step"] for h in resumed["history"]] == [4, 6] and resumed["images_seen"] == 24
    with open(os.path.join(out, "checkpoint-4", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 4
    assert not os.path.exists(os.path.join(out, "checkpoint-2"))  # rotated: --checkpoints_total_limit 1

    # Start a new run from the trained model (found in the clip_model/ subfolder): at a learning rate of 1e-9 the
    # saved weights are (within 1e-6) the starting ones, so they were loaded, not re-initialized.
    finetuned = str(tmp_path / "clip-ft")
    args = train_clip.parse_args([
        "--output_dir", finetuned, *TRAIN_ARGS, "--max_train_steps", "2", "--learning_rate", "1e-9",
        "--pretrained_model_name_or_path", out, "--tokenizer_name_or_path", os.path.join(out, "tokenizer"),
        "--task_weights", "position=5,single_object=0", "--seed", "7",
    ])  # fmt: skip
    weights = world_from_args(args).clip_task_weights
    assert weights["position"] == 5.0 and weights["single_object"] == 0.0
    train_clip.main(args)
    start = CLIPModel.from_pretrained(os.path.join(out, "clip_model")).state_dict()
    end = CLIPModel.from_pretrained(os.path.join(finetuned, "clip_model")).state_dict()
    assert start.keys() == end.keys()
    for key in start:
        torch.testing.assert_close(end[key], start[key], atol=1e-6, rtol=0)
    card = open(os.path.join(finetuned, "clip_model", "README.md")).read()
    assert "position=5" in card and out in card
    assert "validation images, seed 0)" in card  # validated on the default set whatever --seed


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--task_weights", "drawing=2"], "TASK=WEIGHT"),
        (["--task_weights", "position=-1"], "TASK=WEIGHT"),
        (["--task_weights", "position"], "TASK=WEIGHT"),
        (["--task_weights", ",".join(f"{t}=0" for t in ("single_object", "two_object", "counting", "colors",
                                                        "position", "color_attr"))], "weight 0"),  # fmt: skip
        (["--pretrained_model_name_or_path", "some/clip"], "tokenizer_name_or_path"),
        (["--vae_roundtrip_prob", "0.5"], "vae_name_or_path"),
        (["--vae_roundtrip_prob", "1.5", "--vae_name_or_path", "some/vae"], r"\[0, 1\]"),
        (["--vae_roundtrip_prob", "-0.1", "--vae_name_or_path", "some/vae"], r"\[0, 1\]"),
        (["--data_image_size", "4"], "at least 8"),
    ],
)
def test_parse_args_rejects_bad_finetuning_flags(flags, match):
    from dalle_hf.train_clip import parse_args

    with pytest.raises(ValueError, match=match):
        parse_args(["--output_dir", "x", *flags])


def test_train_clip_imagefolder(tmp_path):
    from dalle_hf import train_clip

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, (color, caption) in enumerate([((255, 0, 0), "a red square"), ((0, 0, 255), "a blue square")] * 3):
        Image.new("RGB", (40, 48), color).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="num_hard_negatives"):
        train_clip.parse_args(["--output_dir", "x", "--dataset", "imagefolder", "--train_data_dir", str(folder),
                               "--num_hard_negatives", "2"])  # fmt: skip
    argv = ["--output_dir", str(tmp_path / "clip"), "--dataset", "imagefolder", "--train_data_dir", str(folder)]
    k = TRAIN_ARGS.index("--num_hard_negatives")
    argv += TRAIN_ARGS[:k] + TRAIN_ARGS[k + 2 :]
    args = train_clip.parse_args(argv)
    assert args.num_hard_negatives == 0
    result = train_clip.main(args)
    assert result["validations"] == [] and result["eval"] == {} and len(result["history"]) == 2
    tokenizer = CLIPProcessor.from_pretrained(str(tmp_path / "clip" / "clip_processor")).tokenizer
    assert tokenizer.tokenize("a red square") == ["a", "Ġred", "Ġsquare"]  # trained on the folder's captions


def _tiny_vae(image_size: int):
    from dalle_hf import DalleVAE, DalleVAEConfig

    torch.manual_seed(0)
    config = DalleVAEConfig(image_size=image_size, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32)
    return DalleVAE(config).eval()


def test_vae_roundtrip_replaces_the_chosen_share():
    from dalle_hf.train_clip import vae_roundtrip

    vae = _tiny_vae(16)
    images = torch.rand(64, 3, 16, 16)
    original = images.clone()
    reconstructed = vae.decode_code(vae.get_codebook_indices(images))
    assert not torch.allclose(reconstructed, images, atol=1e-3)  # a random dVAE changes every image

    assert torch.equal(vae_roundtrip(vae, images, 0.0, torch.Generator().manual_seed(0)), images)
    torch.testing.assert_close(vae_roundtrip(vae, images, 1.0, torch.Generator().manual_seed(0)), reconstructed)
    half = vae_roundtrip(vae, images, 0.5, torch.Generator().manual_seed(0))
    kept = (half == images).flatten(1).all(1)
    replaced = torch.isclose(half, reconstructed, atol=1e-6).flatten(1).all(1)
    assert torch.equal(kept, ~replaced)  # every image is either untouched or its reconstruction
    assert 16 < int(replaced.sum()) < 48
    again = vae_roundtrip(vae, images, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(half, again)  # the generator decides which
    assert torch.equal(images, original)  # the input is not modified in place


def test_train_clip_on_vae_roundtrips(tmp_path):
    from dalle_hf import train_clip
    from dalle_hf.data.shapes import TASKS

    vae_dir = str(tmp_path / "vae")
    _tiny_vae(64).save_pretrained(vae_dir)  # shapes renders are 64 px
    out = str(tmp_path / "clip")
    argv = ["--output_dir", out, *TRAIN_ARGS, "--max_train_steps", "2", "--vae_name_or_path", vae_dir,
            "--vae_roundtrip_prob", "0.5"]  # fmt: skip
    result = train_clip.main(train_clip.parse_args(argv))
    final = result["validations"][-1]
    tasks = {key for key in final if key in TASKS}
    assert 0.0 <= final["roundtrip_caption_top1"] <= 1.0 and tasks and set(final["roundtrip"]) == tasks
    assert "caption top-1 among 32, the same renders after a dVAE round trip" in result["eval"]
    card = open(os.path.join(out, "clip_model", "README.md")).read()
    assert f"| dVAE round-trip share | 0.5 ({vae_dir}) |" in card

    small_vae = str(tmp_path / "vae16")
    _tiny_vae(16).save_pretrained(small_vae)
    argv = ["--output_dir", str(tmp_path / "clip2"), *TRAIN_ARGS, "--vae_name_or_path", small_vae,
            "--vae_roundtrip_prob", "0.5"]  # fmt: skip
    with pytest.raises(ValueError, match="16px images, the training images are 64px"):
        train_clip.main(train_clip.parse_args(argv))


def test_train_clip_at_a_smaller_data_size(tmp_path, monkeypatch):
    """--data_image_size: a 32 px CLIP trains and validates on 16 px images (as a 64 px CLIP is fine-tuned for a
    32 px generator), so a 16 px dVAE's round trips fit them."""
    from dalle_hf import train_clip

    sides = []
    ranking_hits = train_clip.caption_ranking_hits

    def spy(clip_model, clip_processor, pixel_values, candidates):
        sides.append(pixel_values.shape[-1])
        return ranking_hits(clip_model, clip_processor, pixel_values, candidates)

    monkeypatch.setattr(train_clip, "caption_ranking_hits", spy)
    vae_dir = str(tmp_path / "vae16")
    _tiny_vae(16).save_pretrained(vae_dir)
    out = str(tmp_path / "clip")
    argv = ["--output_dir", out, *TRAIN_ARGS, "--max_train_steps", "2", "--data_image_size", "16",
            "--vae_name_or_path", vae_dir, "--vae_roundtrip_prob", "0.5"]  # fmt: skip
    result = train_clip.main(train_clip.parse_args(argv))
    assert sides == [16, 16]  # the validation renders and their round trips, at step 2
    assert len(result["history"]) == 1 and math.isfinite(result["history"][0]["loss"])
    assert CLIPModel.from_pretrained(os.path.join(out, "clip_model")).config.vision_config.image_size == 32
    card = open(os.path.join(out, "clip_model", "README.md")).read()
    assert "| training image side (px, before CLIP's resize) | 16 |" in card


def test_pretrained_clip_stored_in_bfloat16_trains_in_float32(tokenizer, tmp_path):
    from dalle_hf.train_clip import load_pretrained_clip

    stored = CLIPModel(make_clip_config(len(tokenizer), **TINY)).to(torch.bfloat16)  # as the shipped ones are
    stored.save_pretrained(tmp_path / "pipe" / "clip_model")
    loaded = load_pretrained_clip(str(tmp_path / "pipe"))
    assert loaded.dtype == torch.float32
    for key, value in stored.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.float())


def _write_bank(path, tasks, passed, prompt_seed=2, size=64):
    """A bank in `benchmarks/rerank_bank.py build`'s format: blank canvases with a random dot, the given verdicts."""
    os.makedirs(path)
    passed = np.array(passed, dtype=bool)  # (P, N)
    images = np.full((*passed.shape, size, size, 3), 255, dtype=np.uint8)
    images[..., size // 2, size // 2, :] = np.random.default_rng(0).integers(0, 256, (*passed.shape, 3))
    np.savez_compressed(os.path.join(path, "bank.npz"), images=images, passed=passed)
    prompts = ["two circles", "three circles", "three squares", "four circles"][: len(passed)]
    with open(os.path.join(path, "bank.json"), "w") as f:
        json.dump({"prompts": prompts, "tasks": tasks, "config": {"prompt_seed": prompt_seed}}, f)
    return str(path)


def test_candidate_ranking_loss():
    from dalle_hf.train_clip import candidate_ranking_loss

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    passed = torch.tensor([[True, False, False], [False, True, True]])
    expected = -(logits.log_softmax(-1)[0, 0] + torch.log(logits.softmax(-1)[1, 1:].sum())) / 2
    torch.testing.assert_close(candidate_ranking_loss(logits, passed), expected)
    # the gradient raises the passing candidates and lowers the failing ones
    logits.requires_grad_(True)
    candidate_ranking_loss(logits, passed).backward()
    assert (logits.grad[passed] < 0).all() and (logits.grad[~passed] > 0).all()


def test_candidate_bank_keeps_mixed_prompts_and_refuses_evaluation_data(tmp_path):
    from dalle_hf.data.shapes import render_scene, scene_from_caption
    from dalle_hf.data.shapes import CandidateBank

    verdicts = [[True, False, True, False], [True] * 4, [False] * 4, [False, False, False, True]]
    bank = CandidateBank([_write_bank(tmp_path / "ok", ["counting"] * 4, verdicts)])
    assert len(bank) == 2 and bank.prompts == ["two circles", "four circles"]  # all-pass and all-fail dropped
    pixels, prompts, passed = bank.sample(3, torch.Generator().manual_seed(0))
    assert pixels.shape == (12, 3, 64, 64) and 0 <= pixels.min() and pixels.max() <= 1 and len(prompts) == 3
    assert passed.shape == (3, 4) and all(passed[i].tolist() == verdicts[[0, 3][bank.prompts.index(p)]]
                                          for i, p in enumerate(prompts))  # fmt: skip
    # a candidate showing a held-out pair (drawn unasked) takes its prompt out of the bank
    path = _write_bank(tmp_path / "held-out", ["counting"] * 4, verdicts)
    data = dict(np.load(os.path.join(path, "bank.npz")))
    green_circle = render_scene(scene_from_caption("a green circle", random.Random(0)))
    data["images"][3, 1] = np.asarray(green_circle.convert("RGB"))
    np.savez_compressed(os.path.join(path, "bank.npz"), **data)
    assert CandidateBank([path]).prompts == ["two circles"]
    with pytest.raises(ValueError, match="novel"):
        CandidateBank([_write_bank(tmp_path / "novel", ["novel"] * 4, verdicts)])
    with pytest.raises(ValueError, match="prompt seed 1, one the evaluation uses"):
        CandidateBank([_write_bank(tmp_path / "dev", ["counting"] * 4, verdicts, prompt_seed=1)])
    with pytest.raises(ValueError, match="both passing and failing"):
        CandidateBank([_write_bank(tmp_path / "flat", ["counting"] * 2, [[True] * 4, [False] * 4])])


def test_train_clip_with_a_candidate_bank(tmp_path):
    from dalle_hf import train_clip

    bank = _write_bank(tmp_path / "bank", ["counting"] * 3, [[True, False, False, True]] * 3)
    out = str(tmp_path / "clip")
    argv = ["--output_dir", out, *TRAIN_ARGS, "--max_train_steps", "2", "--candidate_bank", bank,
            "--candidate_prompts_per_step", "2", "--candidate_bank_weight", "0.5"]  # fmt: skip
    result = train_clip.main(train_clip.parse_args(argv))
    last = result["history"][-1]
    assert math.isfinite(last["rank_loss"]) and 0.0 <= last["rank_pick"] <= 1.0
    assert result["images_seen"] == 8  # counts the contrastive batch, not the bank's candidates
    card = open(os.path.join(out, "clip_model", "README.md")).read()
    assert f"{bank}: 3 prompts with both verdicts; 2 per update, loss weight 0.5" in card
    small = _write_bank(tmp_path / "small", ["counting"], [[True, False]], size=32)
    with pytest.raises(ValueError, match="holds 32px images, the training images are 64px"):
        train_clip.main(train_clip.parse_args([*argv[:-6], "--candidate_bank", small]))
    with pytest.raises(ValueError, match="candidate_prompts_per_step"):
        train_clip.parse_args(["--output_dir", out, "--candidate_prompts_per_step", "0"])


def test_clip_pixel_values_resizes_bfloat16(processor):
    """PyTorch's CPU antialiased resize has no bf16 kernel: a bf16 pipeline whose images are not CLIP's size (the
    large config of benchmarks/gpu_check.py) failed there."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = clip_pixel_values(images.to(torch.bfloat16), processor)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out.float(), clip_pixel_values(images, processor), atol=0.05, rtol=0.02)
