"""Tests for the shapes world (`dalle_hf.data.shapes`)."""

import inspect
import itertools
import random
import re

import numpy as np
import pytest
import torch

from dalle_hf.data.shapes import (
    COLORS,
    EVAL_TASKS,
    HELD_OUT_PAIRS,
    NOVEL_TASK,
    RELATIONS,
    SHAPES,
    SIZE_RANGES,
    TASKS,
    EvalPrompt,
    Scene,
    ShapeObject,
    ShapesDataset,
    all_captions,
    caption_holds,
    captions_for_clip_negatives,
    corrupt_caption,
    evaluation_prompts,
    format_caption,
    parse_caption,
    relation_holds,
    render_scene,
    sample_example,
    scene_from_caption,
)

SAMPLES_PER_TASK = 150


def _scenes(task, n=SAMPLES_PER_TASK, seed=0):
    rng = random.Random(f"{task}/{seed}")
    return [sample_example(rng, task) for _ in range(n)]


def _pairs(scene):
    return {(o.color, o.shape) for o in scene.objects}


def test_world_constants():
    assert COLORS == {
        "red": (220, 30, 30),
        "orange": (245, 140, 20),
        "yellow": (235, 205, 20),
        "green": (40, 160, 60),
        "cyan": (30, 190, 210),
        "blue": (40, 70, 220),
        "purple": (130, 50, 190),
        "pink": (240, 110, 180),
    }
    assert SHAPES == ("circle", "square", "triangle", "diamond")
    assert SIZE_RANGES == {"small": (12, 16), "large": (24, 30)}
    assert HELD_OUT_PAIRS == {("purple", "triangle"), ("green", "circle"), ("orange", "diamond"), ("cyan", "square")}
    assert TASKS == ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    assert NOVEL_TASK == "novel"
    assert RELATIONS == ("left of", "right of", "above", "below")


def test_render_scene_pixels():
    square = ShapeObject("square", "blue", "large", 20.0, 20.0, 24)
    circle = ShapeObject("circle", "red", "large", 45.0, 45.0, 28)
    image = render_scene(Scene((square, circle), "a blue square and a red circle", "color_attr"))
    assert image.size == (64, 64) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # white background
    assert tuple(pixels[20, 20]) == COLORS["blue"]  # flat fill
    assert tuple(pixels[45, 45]) == COLORS["red"]
    assert (pixels[8:32, 8:32] == COLORS["blue"]).all()  # the square covers exactly its bounding box
    assert (pixels[7, 8:32] == 255).all() and (pixels[32, 8:32] == 255).all()
    # the circle's edge is anti-aliased: blends between red and white exist
    green_channel = pixels[31:59, 31:59, 1]
    assert ((green_channel > COLORS["red"][1]) & (green_channel < 255)).any()


def test_render_scene_rejects_objects_outside_the_canvas():
    outside = ShapeObject("circle", "red", "small", 2.0, 30.0, 12)
    with pytest.raises(ValueError, match="inside"):
        render_scene(Scene((outside,), "a circle", "single_object"))
    with pytest.raises(ValueError, match="shape"):
        ShapeObject("star", "red", "small", 30.0, 30.0, 12)


@pytest.mark.parametrize("task", EVAL_TASKS)
def test_sampled_scenes_follow_the_world_rules(task):
    for image, caption, scene in _scenes(task):
        assert image.size == (64, 64) and scene.caption == caption and scene.task == task
        assert caption == caption.lower() and caption_holds(caption, scene.objects)
        for obj in scene.objects:
            low, high = SIZE_RANGES[obj.size_name]
            assert low <= obj.size_px <= high
            x0, y0, x1, y1 = obj.bbox
            assert x0 >= 1 and y0 >= 1 and x1 <= 63 and y1 <= 63  # fully inside, with a 1 px margin
        for a, b in itertools.combinations(scene.objects, 2):  # never overlapping, at least 2 px apart
            ax0, ay0, ax1, ay1 = a.bbox
            bx0, by0, bx1, by1 = b.bbox
            assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= 2
        if task == NOVEL_TASK:
            assert _pairs(scene) <= HELD_OUT_PAIRS
        else:
            assert not _pairs(scene) & HELD_OUT_PAIRS


def test_scenes_show_exactly_what_the_caption_describes():
    for _, caption, scene in _scenes("counting"):
        spec = parse_caption(caption)
        assert len(scene.objects) == spec["count"] and {o.shape for o in scene.objects} == {spec["objects"][0]["shape"]}
    for task in ("two_object", "position", "color_attr"):
        for _, caption, scene in _scenes(task):
            named = [o["shape"] for o in parse_caption(caption)["objects"]]
            assert len(scene.objects) == 2 and sorted(o.shape for o in scene.objects) == sorted(named)
            assert len(set(named)) == 2
    for _, caption, scene in _scenes("color_attr"):
        assert len({o.color for o in scene.objects}) == 2


def test_position_scenes_hold_with_a_clear_margin():
    for _, caption, scene in _scenes("position", n=300):
        a, b = scene.objects
        dx, dy = b.cx - a.cx, b.cy - a.cy
        main, cross = (dx, dy) if scene.relation in ("left of", "right of") else (dy, dx)
        assert abs(main) >= (a.size_px + b.size_px) / 2 + 2  # boxes disjoint along the relation's axis
        assert abs(cross) <= 0.5 * abs(main)
        assert [r for r in RELATIONS if relation_holds(a, b, r)] == [scene.relation]


def test_relation_rule():
    a = ShapeObject("circle", "red", "small", 20.0, 30.0, 12)
    assert relation_holds(a, ShapeObject("square", "red", "small", 22.5, 30.0, 12), "left of")  # 2.5 > 0.1 * 24
    assert not relation_holds(a, ShapeObject("square", "red", "small", 22.0, 30.0, 12), "left of")  # 2.0 < 2.4
    assert not relation_holds(a, ShapeObject("square", "red", "small", 30.0, 41.0, 12), "left of")  # |dy| > |dx|
    assert relation_holds(a, ShapeObject("square", "red", "small", 30.0, 41.0, 12), "above")
    with pytest.raises(ValueError, match="relation"):
        relation_holds(a, a, "near")


def test_sample_example_is_deterministic_and_validates():
    first = [(np.asarray(im), cap) for im, cap, _ in (sample_example(random.Random(7), t) for t in EVAL_TASKS)]
    second = [(np.asarray(im), cap) for im, cap, _ in (sample_example(random.Random(7), t) for t in EVAL_TASKS)]
    assert all((a == c).all() and b == d for (a, b), (c, d) in zip(first, second))
    with pytest.raises(ValueError, match="task"):
        sample_example(random.Random(0), "spelling")
    with pytest.raises(ValueError, match="random.Random"):
        sample_example(np.random.default_rng(0), "colors")


def test_training_captions_use_the_optional_forms():
    captions = [c for t in TASKS for _, c, _ in _scenes(t, n=200)]
    assert any(" small " in f" {c} " or " large " in f" {c} " for c in captions)
    assert any("to the left of" in c or "to the right of" in c for c in captions)
    assert any(re.fullmatch(r"an? \w+ \w+ (left of|right of|above|below) an? \w+ \w+", c) for c in captions)


def test_parse_and_format_caption_round_trip():
    spec = parse_caption("A small red circle to the left of a blue square.")
    assert spec == {
        "task": "position",
        "objects": [
            {"shape": "circle", "color": "red", "size": "small"},
            {"shape": "square", "color": "blue", "size": None},
        ],
        "count": None,
        "relation": "left of",
    }
    assert format_caption(spec) == "a small red circle left of a blue square"
    assert format_caption(spec, long_relation=True) == "a small red circle to the left of a blue square"
    assert parse_caption("three diamonds")["count"] == 3
    assert parse_caption("an orange diamond and a red circle")["task"] == "color_attr"
    assert parse_caption("a circle and a square")["task"] == "two_object"
    for caption in (c for t in EVAL_TASKS for _, c, _ in _scenes(t, n=30)):
        assert format_caption(parse_caption(caption), long_relation=" to the " in caption) == caption
    for bad in ("", "a star", "five circles", "a circle near a square", "a red circle and", 42):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_caption_rules():
    red_circle = ShapeObject("circle", "red", "large", 16.0, 32.0, 24)
    blue_square = ShapeObject("square", "blue", "small", 48.0, 32.0, 14)
    objects = [red_circle, blue_square]
    assert caption_holds("a circle and a square", objects)
    assert not caption_holds("a circle", objects)  # exactly one object
    assert caption_holds("a red circle and a blue square", objects)
    assert not caption_holds("a blue circle and a red square", objects)  # binding
    assert caption_holds("a large red circle left of a small square", objects)
    assert not caption_holds("a small red circle left of a square", objects)  # size
    assert not caption_holds("a circle right of a square", objects)
    assert caption_holds("two circles", [red_circle, ShapeObject("circle", "blue", "small", 48.0, 32.0, 14)])
    assert not caption_holds("three circles", [red_circle, ShapeObject("circle", "blue", "small", 48.0, 32.0, 14)])


@pytest.mark.parametrize("task", EVAL_TASKS)
def test_corrupt_caption_is_false_and_one_edit_away(task):
    rng = random.Random(1)
    kinds = set()
    for _, caption, scene in _scenes(task, n=100):
        corrupted = corrupt_caption(scene, rng)
        assert corrupted != caption and not caption_holds(corrupted, scene.objects)
        true_spec, false_spec = parse_caption(caption), parse_caption(corrupted)
        assert len(true_spec["objects"]) == len(false_spec["objects"])
        if task != NOVEL_TASK:
            assert not {(o["color"], o["shape"]) for o in false_spec["objects"]} & HELD_OUT_PAIRS
        if false_spec["relation"] in ("left of", "right of") and (" to the " in caption) != (" to the " in corrupted):
            pytest.fail(f"phrasing changed: {caption!r} -> {corrupted!r}")
        kinds.add("relation" if true_spec["relation"] != false_spec["relation"] else "other")
    if task == "position":
        assert kinds == {"relation", "other"}


def test_captions_for_clip_negatives():
    rng = random.Random(0)
    for task in TASKS:
        _, caption, scene = sample_example(rng, task)
        negatives = captions_for_clip_negatives(scene, rng, 24)  # more than single edits of "a circle"
        assert len(negatives) == len(set(negatives)) == 24 and caption not in negatives
        assert not any(caption_holds(n, scene.objects) for n in negatives)
    with pytest.raises(ValueError, match="n must be"):
        captions_for_clip_negatives(scene, rng, -1)


def test_scene_from_caption():
    rng = random.Random(0)
    for caption in ("a purple triangle and a green circle", "four diamonds", "a large square below a small circle"):
        scene = scene_from_caption(caption, rng)
        assert caption_holds(caption, scene.objects)
        render_scene(scene)
    with pytest.raises(ValueError, match="held-out"):
        scene_from_caption("a purple triangle", rng, allow_held_out=False)


_PROMPT_FORMS = {
    "single_object": r"a (circle|square|triangle|diamond)",
    "two_object": r"a (\w+) and a (\w+)",
    "counting": r"(two|three|four) (circles|squares|triangles|diamonds)",
    "colors": r"an? (\w+) (\w+)",
    "position": r"a (\w+) (left of|right of|above|below) a (\w+)",
    "color_attr": r"an? (\w+) (\w+) and an? (\w+) (\w+)",
    "novel": r"an? (\w+) (\w+)( and an? (\w+) (\w+))?",
}


@pytest.mark.parametrize("task", EVAL_TASKS)
def test_evaluation_prompts(task):
    prompts = evaluation_prompts(task)
    assert len(prompts) == 100 and all(isinstance(p, EvalPrompt) and p.task == task for p in prompts)
    assert [p.prompt for p in prompts] == [p.prompt for p in evaluation_prompts(task, n=100, seed=0)]
    assert [p.prompt for p in prompts] != [p.prompt for p in evaluation_prompts(task, n=100, seed=1)]
    for p in prompts:
        assert re.fullmatch(_PROMPT_FORMS[task], p.prompt), p.prompt
        assert p.spec["task"] == task and all(o["size"] is None for o in p.spec["objects"])
        pairs = {(o["color"], o["shape"]) for o in p.spec["objects"] if o["color"]}
        assert pairs <= HELD_OUT_PAIRS if task == NOVEL_TASK else not pairs & HELD_OUT_PAIRS
        if len(p.spec["objects"]) == 2:
            assert p.spec["objects"][0]["shape"] != p.spec["objects"][1]["shape"]
    distinct = {p.prompt for p in prompts}
    assert len(distinct) == {"single_object": 4, "two_object": 12, "counting": 12, "novel": 16}.get(task, len(distinct))
    if task == NOVEL_TASK:  # the colors form and the color_attr form alternate
        assert [len(p.spec["objects"]) for p in prompts[:4]] == [1, 2, 1, 2]


def test_evaluation_prompts_validate():
    with pytest.raises(ValueError, match="task"):
        evaluation_prompts("drawing")
    with pytest.raises(ValueError, match="n must"):
        evaluation_prompts("colors", n=0)


def test_all_captions_cover_the_language():
    captions = list(all_captions(2000, seed=3))
    assert len(captions) == 2000 and captions == list(all_captions(2000, seed=3))
    words = {w for c in captions for w in c.split()}
    assert set(COLORS) | {"two", "three", "four", "small", "large", "and", "left", "right", "above", "below"} <= words
    assert {s + "s" for s in SHAPES} | set(SHAPES) <= words
    assert all(c == c.lower() and len(c.split()) <= 14 for c in captions)
    for caption in captions[:300]:
        parse_caption(caption)


def test_dataset_yields_examples():
    dataset = ShapesDataset(seed=0)
    examples = list(itertools.islice(iter(dataset), 12))
    for example in examples:
        assert set(example) == {"pixel_values", "text", "task"}
        pixels = example["pixel_values"]
        assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and example["task"] in TASKS
    again = list(itertools.islice(iter(ShapesDataset(seed=0)), 12))
    assert [e["text"] for e in examples] == [e["text"] for e in again]
    assert torch.equal(examples[3]["pixel_values"], again[3]["pixel_values"])
    other = list(itertools.islice(iter(ShapesDataset(seed=1)), 12))
    assert [e["text"] for e in examples] != [e["text"] for e in other]


def test_dataset_task_weights_and_image_size():
    dataset = ShapesDataset(seed=0, task_weights={"counting": 1.0, "colors": 0.0}, image_size=32)
    examples = list(itertools.islice(iter(dataset), 8))
    assert {e["task"] for e in examples} == {"counting"}
    assert examples[0]["pixel_values"].shape == (3, 32, 32)
    for bad in ({}, {"novel": 1.0}, {"colors": -1.0}, {"colors": float("nan")}, {"colors": 0.0}, {"colors": "1"}):
        with pytest.raises(ValueError, match="task_weights"):
            ShapesDataset(task_weights=bad)
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(image_size=0)


class _FakeWorkerInfo:
    def __init__(self, worker_id):
        self.id, self.num_workers = worker_id, 2


def _first_captions(dataset, n=10):
    return [e["text"] for e in itertools.islice(iter(dataset), n)]


def test_dataset_streams_differ_per_worker_and_rank(monkeypatch):
    dataset = ShapesDataset(seed=0)
    streams = {}
    for worker_id, rank in ((None, 0), (0, 0), (1, 0), (0, 1)):
        worker_info = None if worker_id is None else _FakeWorkerInfo(worker_id)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=worker_info: info)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda r=rank: r > 0)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=rank: r)
        streams[(worker_id, rank)] = _first_captions(dataset)
    assert streams[(None, 0)] == streams[(0, 0)]  # the main process is worker 0 of rank 0
    assert len({tuple(s) for s in streams.values()}) == 3


def test_dataset_works_with_dataloader_workers():
    loader = torch.utils.data.DataLoader(ShapesDataset(seed=0), batch_size=4, num_workers=2)
    batches = list(itertools.islice(iter(loader), 2))  # worker 0 fills batch 0, worker 1 batch 1
    assert batches[0]["pixel_values"].shape == (4, 3, 64, 64)
    assert batches[0]["text"] != batches[1]["text"]


_DEFAULT_RE = re.compile(r"^\s+(\w+) \(`[^`]+`(?: or `[^`]+`)?, \*optional\*, defaults to (.+?)\):", re.M)


@pytest.mark.parametrize(
    "obj",
    [format_caption, scene_from_caption, evaluation_prompts, all_captions, ShapesDataset, Scene],
)
def test_documented_defaults_match_signatures(obj):
    documented = dict(_DEFAULT_RE.findall(inspect.getdoc(obj)))
    signature = inspect.signature(obj.__init__ if inspect.isclass(obj) and obj is not Scene else obj)
    assert documented, f"{obj.__name__} documents no defaults"
    for name, text in documented.items():
        default = signature.parameters[name].default
        assert text.strip("`").replace("_", "") == str(default).replace("_", ""), (obj.__name__, name)
