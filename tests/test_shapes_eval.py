"""Tests for the ShapesEval checker and evaluation loops (`dalle_hf.eval.shapes`)."""

import inspect
import json
import random
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dalle_hf.data.shapes import (
    EVAL_TASKS,
    NOVEL_TASK,
    TASKS,
    Scene,
    ShapeObject,
    corrupt_caption,
    evaluation_prompts,
    render_scene,
    sample_example,
    scene_from_caption,
)
from dalle_hf.data.world import load_world
from dalle_hf.eval.shapes import (
    ShapesEval,
    check,
    check_caption,
    detect_objects,
    evaluate_pipeline,
    evaluate_vae_fidelity,
)

CHECKS_PER_TASK = 200


@pytest.mark.parametrize("task", EVAL_TASKS)
def test_checker_is_exact_on_clean_renders(task):
    rng = random.Random(f"checker/{task}")
    accepted = rejected = 0
    for _ in range(CHECKS_PER_TASK):
        image, caption, scene = sample_example(rng, task)
        accepted += check(image, caption)
        rejected += not check(image, corrupt_caption(scene, rng))
    assert accepted / CHECKS_PER_TASK >= 0.99
    assert rejected / CHECKS_PER_TASK >= 0.99


def test_detect_objects_measures_a_known_scene():
    scene = Scene(
        (
            ShapeObject("triangle", "purple", "large", 16.0, 16.0, 26),
            ShapeObject("diamond", "orange", "small", 48.0, 14.0, 12),
            ShapeObject("circle", "cyan", "small", 14.0, 48.0, 15),
            ShapeObject("square", "yellow", "large", 46.0, 46.0, 28),
        ),
        "unused",
        "counting",
    )
    found = detect_objects(render_scene(scene))
    assert [(o.shape, o.color, o.size_name) for o in found] == [
        ("diamond", "orange", "small"),
        ("triangle", "purple", "large"),
        ("square", "yellow", "large"),
        ("circle", "cyan", "small"),
    ]
    truth = {o.shape: o for o in scene.objects}
    for obj in found:
        assert abs(obj.cx - truth[obj.shape].cx) <= 1 and abs(obj.cy - truth[obj.shape].cy) <= 1
        assert abs(obj.size_px - truth[obj.shape].size_px) <= 1
    square = next(o for o in found if o.shape == "square")
    assert square.bbox == (32, 32, 60, 60) and square.fill_ratio == 1.0
    assert square.harmonic4 == pytest.approx(-1 / 60, abs=1e-3)


def test_image_formats_agree():
    image, caption, _ = sample_example(random.Random(3), "color_attr")
    as_uint8 = np.asarray(image)
    as_float = as_uint8.astype(np.float32) / 255
    as_tensor = torch.from_numpy(as_float).permute(2, 0, 1)  # (3, 64, 64) in [0, 1]
    as_large = image.resize((128, 128), Image.NEAREST)
    reference = detect_objects(image)
    for other in (as_uint8, as_float, as_tensor, as_large):
        assert [(o.shape, o.color, o.size_name) for o in detect_objects(other)] == [
            (o.shape, o.color, o.size_name) for o in reference
        ]
        assert check(other, caption)
    with pytest.raises(ValueError, match="image"):
        detect_objects(np.zeros((64, 64)))


def test_blank_and_noise_images_pass_nothing():
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    assert detect_objects(blank) == []
    for task in EVAL_TASKS:
        for prompt in evaluation_prompts(task, n=8):
            assert not check(blank, prompt) and not check(noise, prompt)


def test_check_accepts_prompts_specs_and_captions():
    prompt = evaluation_prompts("position", n=1)[0]
    image = render_scene(scene_from_caption(prompt.prompt, random.Random(0)))
    assert check(image, prompt) and check(image, prompt.spec) and check(image, prompt.prompt)
    assert check_caption(image, prompt.prompt)
    with pytest.raises(ValueError, match="prompt must be"):
        check(image, 3)
    with pytest.raises(ValueError, match="caption"):
        check_caption(image, prompt)


def test_touching_objects_of_two_colors_are_split():
    red = ShapeObject("square", "red", "large", 20.0, 32.0, 24)
    blue = ShapeObject("square", "blue", "large", 44.0, 32.0, 24)  # shares the edge x = 32
    found = detect_objects(render_scene(Scene((red, blue), "unused", "two_object")))
    assert sorted((o.color, o.shape) for o in found) == [("blue", "square"), ("red", "square")]


def _degrade(image, rng):
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    noisy = blurred + np.random.default_rng(rng.randrange(2**31)).normal(0, 10, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_checker_tolerates_blur_and_noise():
    rng = random.Random(0)
    accepted = rejected = total = 0
    for task in EVAL_TASKS:
        for _ in range(30):
            image, caption, scene = sample_example(rng, task)
            degraded = _degrade(image, rng)
            accepted += check(degraded, caption)
            rejected += not check(degraded, corrupt_caption(scene, rng))
            total += 1
    assert accepted / total >= 0.95 and rejected / total >= 0.97


def test_checker_validates_thresholds():
    with pytest.raises(ValueError, match="min_coverage"):
        ShapesEval(min_coverage=1.5)
    with pytest.raises(ValueError, match="square_threshold"):
        ShapesEval(square_threshold=0.01)


# ----------------------------------------------------------------------------------------------------
# evaluate_pipeline with a fake pipeline that obeys the pipeline call contract of docs/design.md


@dataclass
class _FakeOutput:
    images: list
    clip_scores: torch.Tensor | None
    image_tokens: torch.Tensor | None = None


class _FakePipeline:
    """Draws the prompt's scene as sample `good_index` of each prompt and a blank or noise image otherwise.

    With `rank=True` it sorts every prompt's samples good first (as a CLIP reranker would) and returns scores.
    """

    def __init__(self, good_index=0, rank=False):
        self.good_index, self.rank, self.calls = good_index, rank, []

    def __call__(self, prompt, num_images_per_prompt=1, num_images_to_keep=None, generator=None, output_type="pil"):
        assert output_type == "pil" and isinstance(generator, torch.Generator)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        keep = num_images_to_keep or num_images_per_prompt
        self.calls.append((len(prompts), num_images_per_prompt, keep))
        rng = random.Random(generator.initial_seed())
        images, scores = [], []
        for text in prompts:
            samples = []
            for i in range(num_images_per_prompt):
                if i == self.good_index:
                    samples.append((1.0, render_scene(scene_from_caption(text, rng))))
                elif i % 2:
                    noise = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (64, 64, 3))
                    samples.append((0.0, Image.fromarray(noise.astype(np.uint8))))
                else:
                    samples.append((0.0, Image.new("RGB", (64, 64), (255, 255, 255))))
            if self.rank:
                samples.sort(key=lambda s: -s[0])
            images += [image for _, image in samples[:keep]]
            scores.append([score for score, _ in samples[:keep]])
        return _FakeOutput(images, torch.tensor(scores) if self.rank else None)


def test_evaluate_pipeline_accounts_for_every_image(tmp_path):
    pipe = _FakePipeline(good_index=1)
    report = evaluate_pipeline(
        pipe, str(tmp_path), images_per_prompt=4, prompts_per_task=3, batch_size=8, progress=False
    )
    assert report["accuracy"] == {task: 0.25 for task in EVAL_TASKS}  # one good sample in four
    assert report["any_of_k"] == {task: 1.0 for task in EVAL_TASKS}
    assert report["shapes_eval"] == 0.25 and report["novel"] == 0.25 and report["shapes_eval_any_of_k"] == 1.0
    assert "reranked_accuracy" not in report and "best_of_n_oracle" not in report
    assert all(call == (2, 4, 4) or call == (1, 4, 4) for call in pipe.calls)  # batch_size 8 = 2 prompts x 4
    assert json.loads((tmp_path / "report.json").read_text()) == report
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 * len(EVAL_TASKS) and json.loads(lines[0])["passed"] == [False, True, False, False]
    for task in EVAL_TASKS:
        with Image.open(tmp_path / f"samples_{task}.png") as sheet:
            assert sheet.width > 4 * 128 and sheet.height > 3 * 128


def test_train_dalle_finds_the_worlds_benchmark(tmp_path):
    from dalle_hf.data.world import World
    from dalle_hf.eval import evaluate_during_training

    class Unbenchmarked(World):  # a world with no benchmark of its own
        name = "unbenchmarked"

        def train_dataset(self, image_size, seed):
            return []

        def tokenizer_captions(self, seed=0):
            return []

    # sample 0 of each prompt draws its scene: best-of-1 passes everything
    results = evaluate_during_training(load_world("shapes"), _FakePipeline(good_index=0), str(tmp_path), 2)
    assert results == {"ShapesEval (best-of-1)": 1.0, "novel": 1.0}
    assert json.loads((tmp_path / "report.json").read_text())["config"]["prompts_per_task"] == 2
    assert evaluate_during_training(Unbenchmarked(), _FakePipeline(), str(tmp_path / "none"), 2) == {}


def test_evaluate_pipeline_reranking(tmp_path):
    tasks = ["colors", "position", NOVEL_TASK]
    ranked = evaluate_pipeline(
        _FakePipeline(good_index=2, rank=True), str(tmp_path / "ranked"),
        images_per_prompt=2, candidates=3, prompts_per_task=4, tasks=tasks, progress=False,
    )
    assert ranked["accuracy"] == {task: 0.0 for task in tasks}  # sample 2 is never drawn with 2 per prompt
    assert ranked["reranked_accuracy"] == {task: 1.0 for task in tasks}  # the best of 3 is kept
    assert ranked["shapes_eval_reranked"] == 1.0 and ranked["novel_reranked"] == 1.0 and ranked["reranked_by_clip"]
    assert ranked["shapes_eval"] == 0.0 and set(ranked["any_of_k"]) == set(tasks)
    assert ranked["best_of_n_oracle"] == {task: 1.0 for task in tasks} and ranked["shapes_eval_best_of_n_oracle"] == 1.0
    records = [json.loads(line) for line in (tmp_path / "ranked" / "results.jsonl").read_text().splitlines()]
    reranks = [r for r in records if r["stage"] == "rerank"]
    assert len(reranks) == 4 * len(tasks) and all(r["passed"] == [True, False, False] for r in reranks)
    assert all(r["clip_scores"] == [1.0, 0.0, 0.0] for r in reranks)  # every candidate, best first
    unranked_pipe = _FakePipeline(good_index=2)
    unranked = evaluate_pipeline(
        unranked_pipe, str(tmp_path / "unranked"),
        images_per_prompt=2, candidates=3, prompts_per_task=4, tasks=tasks, progress=False,
    )
    assert unranked["reranked_accuracy"] == {task: 0.0 for task in tasks}  # keeps the first of 3 without CLIP
    # a good one was among the 3: the ranker failed
    assert unranked["best_of_n_oracle"] == {task: 1.0 for task in tasks}
    assert unranked["reranked_by_clip"] is False
    assert {call for call in unranked_pipe.calls} == {(4, 2, 2), (4, 3, 3)}  # batch 16: 4 prompts x 2, 4 x 3


def test_evaluate_pipeline_is_deterministic_and_validates(tmp_path):
    kwargs = dict(images_per_prompt=2, prompts_per_task=2, tasks=["counting"], seed=5, progress=False)
    first = evaluate_pipeline(_FakePipeline(), str(tmp_path / "a"), **kwargs)
    second = evaluate_pipeline(_FakePipeline(), str(tmp_path / "b"), **kwargs)
    assert first == second
    assert (tmp_path / "a" / "results.jsonl").read_text() == (tmp_path / "b" / "results.jsonl").read_text()
    for bad in (dict(images_per_prompt=0), dict(candidates=0), dict(tasks=["drawing"]), dict(batch_size=-1)):
        with pytest.raises(ValueError):
            evaluate_pipeline(_FakePipeline(), str(tmp_path / "c"), **{**kwargs, **bad})


# ----------------------------------------------------------------------------------------------------
# evaluate_vae_fidelity with fake dVAEs that obey the DalleVAE contract


class _IdentityVAE(torch.nn.Module):
    """Codes are the quantized pixels, so the round trip is exact."""

    def get_codebook_indices(self, pixel_values):
        return (pixel_values * 255).round().long().flatten(1)  # (B, 3 * 64 * 64)

    def decode_code(self, ids):
        return ids.view(-1, 3, 64, 64).float() / 255


class _BlankVAE(_IdentityVAE):
    def decode_code(self, ids):
        return torch.ones(ids.shape[0], 3, 64, 64)


def test_evaluate_vae_fidelity():
    exact = evaluate_vae_fidelity(_IdentityVAE(), n_per_task=6, seed=0, batch_size=16)
    assert exact["fidelity"] == 1.0 and exact["clean_accuracy"] == 1.0 and exact["mse"] == 0.0
    assert set(exact["per_task"]) == set(EVAL_TASKS)
    blank = evaluate_vae_fidelity(_BlankVAE(), n_per_task=4, seed=0, tasks=TASKS)
    assert blank["fidelity"] == 0.0 and blank["per_task"] == {task: 0.0 for task in TASKS} and blank["mse"] > 0
    with pytest.raises(ValueError, match="n_per_task"):
        evaluate_vae_fidelity(_IdentityVAE(), n_per_task=0)


_DEFAULT_RE = re.compile(r"^\s+(\w+) \(`[^`]+`(?: or `[^`]+`)?, \*optional\*, defaults to (.+?)\):", re.M)


@pytest.mark.parametrize("obj", [ShapesEval, evaluate_pipeline, evaluate_vae_fidelity])
def test_documented_defaults_match_signatures(obj):
    documented = dict(_DEFAULT_RE.findall(inspect.getdoc(obj)))
    signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    assert documented
    for name, text in documented.items():
        assert text.strip("`") == str(signature.parameters[name].default), (obj.__name__, name)
