"""The shapes world: a tiny, exactly checkable text-to-image domain.

Every image is a 64 x 64 RGB canvas on white showing a few flat-colored shapes (8 colors x 4 shapes x
2 sizes) that never overlap, and its caption names exactly the objects drawn. Captions follow the six
GenEval task forms (Ghosh et al. 2023: single object, two objects, counting, colors, position, color
attribution) plus `novel`, which asks for color/shape pairs that are never drawn in training
(`HELD_OUT_PAIRS`) to measure compositional generalization.

The world's language and its meaning live here together: `parse_caption` turns a caption into a
spec, `caption_holds` decides whether a list of objects satisfies it, and `corrupt_caption` edits one
attribute, count or relation so that the caption becomes false (a hard negative).

So does the checker, which reads those objects from pixels (`ShapesEval`, `check`, `detect_objects`). It never
sees the scene. It classifies every pixel by the palette color whose blend with white explains it best
(anti-aliased and blurry edges are such blends), groups foreground pixels into connected components, drops specks,
reads each component's color (majority vote), shape (3- and 4-fold harmonic moments of its ink, which an isotropic
blur leaves unchanged), size (from its ink area) and bounding-box center, and then applies `caption_holds` to the
objects it found. On clean renders it is exact; blurred and noisy renders mostly pass (see
`benchmarks/checker_accuracy.py`). The world uses it itself (`evaluate_vae_fidelity`, candidate banks without
held-out pairs); the benchmark that runs a pipeline over the evaluation prompts is `dalle_hf.eval.shapes`.

Example:

```python
>>> import random
>>> from dalle_hf.data.shapes import sample_example, corrupt_caption, caption_holds
>>> rng = random.Random(0)
>>> image, caption, scene = sample_example(rng, "color_attr")
>>> caption_holds(caption, scene.objects), caption_holds(corrupt_caption(scene, rng), scene.objects)
(True, False)
```
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import IterableDataset

from .world import RankingSet, World

# ----------------------------------------------------------------------------------------------------
# The world's constants. Reports and checkpoints depend on these values: do not change them.

IMAGE_SIZE = 64  # canvas side in px; small enough to stream on a laptop CPU, 8x8 or 16x16 dVAE grids
BACKGROUND = (255, 255, 255)  # white; the checker treats "close to white" as empty canvas
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 20),
    "green": (40, 160, 60),
    "cyan": (30, 190, 210),
    "blue": (40, 70, 220),
    "purple": (130, 50, 190),
    "pink": (240, 110, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")  # triangle apex up; diamond = square at 45 deg
SIZE_NAMES: tuple[str, ...] = ("small", "large")
# Bounding-box side in px. The 17-23 px gap keeps the two classes apart for the checker (threshold 20).
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (12, 16), "large": (24, 30)}
SIZE_THRESHOLD_PX = 20  # a measured bounding box side below this is "small", otherwise "large"
# Never drawn in a training image; they appear only in the `novel` evaluation task.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("green", "circle"), ("orange", "diamond"), ("cyan", "square")}
)
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NOVEL_TASK = "novel"
EVAL_TASKS: tuple[str, ...] = TASKS + (NOVEL_TASK,)
# One showcase prompt per task, in TASKS order: validation sheets during training and the app's examples.
SHOWCASE_PROMPTS: tuple[str, ...] = (
    "a circle",
    "a square and a triangle",
    "three diamonds",
    "a red circle",
    "a circle left of a square",
    "a blue square and a yellow triangle",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}

MIN_GAP_PX = 2  # empty px between any two bounding boxes, so objects never touch or overlap
CANVAS_MARGIN_PX = 1  # keeps anti-aliased edges inside the canvas
SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges whose pixels blend color and white
# "A left of B" holds when cx(B) - cx(A) > RELATION_MARGIN * (wA + wB) and |dx| >= |dy|.
RELATION_MARGIN = 0.1
# Training scenes for position captions hold the relation with a clear margin: the bounding boxes are
# disjoint along the relation's axis and the cross-axis offset is at most this fraction of the main one.
POSITION_CROSS_AXIS_RATIO = 0.5

# How often training captions use the optional forms (evaluation prompts never do).
SIZE_WORD_PROB = 0.2  # "a small red circle": teaches the size words without making them the norm
POSITION_COLOR_PROB = 0.3  # "a red circle left of a blue square"
LONG_RELATION_PROB = 0.3  # paraphrase "to the left of" / "to the right of"

_PLACEMENT_ATTEMPTS = 64  # random restarts before a crowded scene shrinks one of its large objects
_OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_WORD_TO_COUNT = {word: count for count, word in COUNT_WORDS.items()}
_PLURAL_TO_SHAPE = {shape + "s": shape for shape in SHAPES}


def _colors_for_shape(shape: str, allow_held_out: bool) -> tuple[str, ...]:
    return tuple(c for c in COLORS if allow_held_out or (c, shape) not in HELD_OUT_PAIRS)


_TRAINING_COLORS = {shape: _colors_for_shape(shape, allow_held_out=False) for shape in SHAPES}
_ALL_COLORS = {shape: tuple(COLORS) for shape in SHAPES}
_TRAINING_PAIRS = tuple((c, s) for s in SHAPES for c in COLORS if (c, s) not in HELD_OUT_PAIRS)
_HELD_OUT_LIST = tuple(sorted(HELD_OUT_PAIRS))


# ----------------------------------------------------------------------------------------------------
# Scenes and rendering


@dataclass(frozen=True)
class ShapeObject:
    """
    One flat-colored shape on the canvas.

    Args:
        shape (`str`): one of `SHAPES`.
        color (`str`): one of `COLORS`.
        size_name (`str`): `"small"` or `"large"`.
        cx (`float`): x of the bounding-box center in px (pixel `i` spans `[i, i + 1)`).
        cy (`float`): y of the bounding-box center in px (y grows downwards).
        size_px (`int`): side of the square bounding box in px.
    """

    shape: str
    color: str
    size_name: str
    cx: float
    cy: float
    size_px: int

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)}, got {self.color!r}")
        if self.size_name not in SIZE_NAMES:
            raise ValueError(f"size_name must be one of {SIZE_NAMES}, got {self.size_name!r}")
        if not self.size_px > 0:
            raise ValueError(f"size_px must be positive, got {self.size_px!r}")

    @property
    def width(self) -> float:
        return float(self.size_px)

    @property
    def height(self) -> float:
        return float(self.size_px)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """`(x0, y0, x1, y1)` with exclusive `x1`, `y1`."""
        half = self.size_px / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass(frozen=True)
class Scene:
    """
    What an image shows and the caption that describes it.

    Args:
        objects (`tuple[ShapeObject, ...]`): everything drawn; for position scenes `(A, B)` of "A rel B".
        caption (`str`): the caption, true for these objects.
        task (`str`): one of `EVAL_TASKS`.
        relation (`str`, *optional*, defaults to `None`): the relation of a position caption.
    """

    objects: tuple[ShapeObject, ...]
    caption: str
    task: str
    relation: str | None = None


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, scale: int) -> None:
    x0, y0, x1, y1 = (round(v * scale) for v in obj.bbox)
    # PIL's drawing coordinates are inclusive, so the last covered supersampled pixel is x1 - 1.
    right, bottom = x1 - 1, y1 - 1
    mid_x, mid_y = (x0 + right) / 2, (y0 + bottom) / 2
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse([x0, y0, right, bottom], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, right, bottom], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(mid_x, y0), (right, bottom), (x0, bottom)], fill=fill)
    else:  # diamond
        draw.polygon([(mid_x, y0), (right, mid_y), (mid_x, bottom), (x0, mid_y)], fill=fill)


def render_scene(scene: Scene) -> Image.Image:
    """
    Draw a scene on a white 64 x 64 RGB canvas with anti-aliased edges.

    Shapes are drawn at `SUPERSAMPLE` x resolution and box-downsampled, so an edge pixel is an exact
    blend of the object's color and white (the checker relies on that).

    Args:
        scene (`Scene`): what to draw; every bounding box must lie inside the canvas.

    Returns:
        `PIL.Image.Image`: a 64 x 64 RGB image.

    Example:

    ```python
    >>> scene = Scene((ShapeObject("circle", "red", "large", 32.0, 32.0, 28),), "a red circle", "colors")
    >>> render_scene(scene).size
    (64, 64)
    ```
    """
    canvas = Image.new("RGB", (IMAGE_SIZE * SUPERSAMPLE, IMAGE_SIZE * SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        if x0 < 0 or y0 < 0 or x1 > IMAGE_SIZE or y1 > IMAGE_SIZE:
            raise ValueError(f"object {obj} does not lie inside the {IMAGE_SIZE}x{IMAGE_SIZE} canvas")
        _draw_object(draw, obj, SUPERSAMPLE)
    return canvas.reduce(SUPERSAMPLE)


# ----------------------------------------------------------------------------------------------------
# The caption language. A spec is a plain (JSON-friendly) dict:
#   {"task": str, "objects": [{"shape": str, "color": str | None, "size": str | None}, ...],
#    "count": int | None (counting only), "relation": str | None (position only)}


def _object_spec(shape: str, color: str | None = None, size: str | None = None) -> dict:
    return {"shape": shape, "color": color, "size": size}


def _make_spec(task: str, objects: list[dict], count: int | None = None, relation: str | None = None) -> dict:
    return {"task": task, "objects": objects, "count": count, "relation": relation}


def _noun_phrase(obj: dict) -> str:
    words = [w for w in (obj["size"], obj["color"], obj["shape"]) if w]
    article = "an" if words[0][0] in "aeiou" else "a"  # "an orange circle"
    return " ".join([article] + words)


def format_caption(spec: dict, long_relation: bool = False) -> str:
    """
    Write the caption of a spec (the inverse of `parse_caption`).

    Args:
        spec (`dict`): a caption spec as returned by `parse_caption`.
        long_relation (`bool`, *optional*, defaults to `False`): say "to the left of" / "to the right of"
            instead of "left of" / "right of".

    Returns:
        `str`: the lower-case caption, e.g. `"a red circle left of a blue square"`.
    """
    objects = spec["objects"]
    if spec.get("count") is not None:
        obj = objects[0]
        words = [COUNT_WORDS[spec["count"]]] + [w for w in (obj["size"], obj["color"]) if w]
        return " ".join(words + [obj["shape"] + "s"])
    if spec.get("relation") is not None:
        relation = spec["relation"]
        if long_relation and relation in ("left of", "right of"):
            relation = "to the " + relation
        return f"{_noun_phrase(objects[0])} {relation} {_noun_phrase(objects[1])}"
    return " and ".join(_noun_phrase(obj) for obj in objects)


def _parse_error(caption: str, expected: str) -> ValueError:
    return ValueError(f"cannot parse caption {caption!r}: expected {expected}")


def _parse_attributes(words: list[str], i: int) -> tuple[str | None, str | None, int]:
    size = color = None
    if i < len(words) and words[i] in SIZE_NAMES:
        size, i = words[i], i + 1
    if i < len(words) and words[i] in COLORS:
        color, i = words[i], i + 1
    return size, color, i


def _parse_noun_phrase(caption: str, words: list[str], i: int) -> tuple[dict, int]:
    if i >= len(words) or words[i] not in ("a", "an"):
        raise _parse_error(caption, f"'a' or 'an' at word {i}")
    size, color, i = _parse_attributes(words, i + 1)
    if i >= len(words) or words[i] not in SHAPES:
        raise _parse_error(caption, f"a shape {SHAPES} at word {i}")
    return _object_spec(words[i], color, size), i + 1


def _parse_relation(words: list[str], i: int) -> tuple[str | None, int]:
    for relation in RELATIONS:
        for phrase in (relation, "to the " + relation):
            n = len(phrase.split())
            if words[i : i + n] == phrase.split():
                return relation, i + n
    return None, i


def parse_caption(caption: str) -> dict:
    """
    Parse a caption of the shapes world into a spec.

    The grammar: `COUNT [size] [color] SHAPEs` | `NP` | `NP and NP` | `NP RELATION NP`, where
    `NP = a|an [size] [color] SHAPE` and RELATION is one of `RELATIONS` (or "to the left of" / "to the
    right of"). Case and a trailing period are ignored.

    Args:
        caption (`str`): e.g. `"a small red circle to the left of a blue square"`.

    Returns:
        `dict`: `{"task", "objects", "count", "relation"}`; the task is inferred from the form
        (`colors`/`color_attr` when every object has a color, `single_object`/`two_object` otherwise).

    Raises:
        `ValueError`: when the caption is not in the language.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    words = caption.strip().lower().rstrip(".").split()
    if not words:
        raise _parse_error(caption, "a non-empty caption")
    if words[0] in _WORD_TO_COUNT:
        size, color, i = _parse_attributes(words, 1)
        if i != len(words) - 1 or words[i] not in _PLURAL_TO_SHAPE:
            raise _parse_error(caption, "'COUNT [size] [color] SHAPEs', e.g. 'three circles'")
        obj = _object_spec(_PLURAL_TO_SHAPE[words[i]], color, size)
        return _make_spec("counting", [obj], count=_WORD_TO_COUNT[words[0]])
    first, i = _parse_noun_phrase(caption, words, 0)
    if i == len(words):
        return _make_spec("colors" if first["color"] else "single_object", [first])
    if words[i] == "and":
        second, i = _parse_noun_phrase(caption, words, i + 1)
        task = "color_attr" if first["color"] and second["color"] else "two_object"
        spec = _make_spec(task, [first, second])
    else:
        relation, i = _parse_relation(words, i)
        if relation is None:
            raise _parse_error(caption, f"'and' or a relation {RELATIONS} at word {i}")
        second, i = _parse_noun_phrase(caption, words, i)
        spec = _make_spec("position", [first, second], relation=relation)
    if i != len(words):
        raise _parse_error(caption, f"the end of the caption at word {i}")
    return spec


# ----------------------------------------------------------------------------------------------------
# The meaning of a caption. `objects` are anything with shape, color, size_name, cx, cy, width, height:
# a scene's `ShapeObject`s or the `DetectedObject`s the checker finds in pixels.


def relation_holds(a, b, relation: str) -> bool:
    """
    Whether "a `relation` b" holds: "A left of B" when `cx(B) - cx(A) > 0.1 * (wA + wB)` and
    `|dx| >= |dy|`; likewise right of, above (y grows downwards) and below, with heights on the y axis.
    """
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if relation == "left of":
        return dx > RELATION_MARGIN * (a.width + b.width) and abs(dx) >= abs(dy)
    if relation == "right of":
        return -dx > RELATION_MARGIN * (a.width + b.width) and abs(dx) >= abs(dy)
    if relation == "above":
        return dy > RELATION_MARGIN * (a.height + b.height) and abs(dy) >= abs(dx)
    if relation == "below":
        return -dy > RELATION_MARGIN * (a.height + b.height) and abs(dy) >= abs(dx)
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def _matches(obj, object_spec: dict) -> bool:
    return (
        obj.shape == object_spec["shape"]
        and (object_spec["color"] is None or obj.color == object_spec["color"])
        and (object_spec["size"] is None or obj.size_name == object_spec["size"])
    )


def _rule(spec: dict) -> str:
    task = spec["task"]
    if task == NOVEL_TASK:  # novel prompts use the colors or the color_attr form
        return "colors" if len(spec["objects"]) == 1 else "color_attr"
    return task


def caption_holds(caption_or_spec, objects: Sequence) -> bool:
    """
    Whether a caption is true of a list of objects, by the ShapesEval task rules.

    | task | passes when |
    |---|---|
    | single_object, colors | exactly one object, matching (shape, and color/size when named) |
    | two_object | exactly two objects, matching the two phrases in some order |
    | counting | exactly N objects, all matching |
    | position | a matching A and a different matching B with "A rel B" holding |
    | color_attr | a matching A and a different matching B (extra objects allowed) |
    | novel | as colors (one phrase) or color_attr (two phrases) |

    Args:
        caption_or_spec (`str` or `dict`): a caption, or a spec from `parse_caption`/`EvalPrompt.spec`.
        objects (`Sequence`): objects with `shape`, `color`, `size_name`, `cx`, `cy`, `width`, `height`.

    Returns:
        `bool`: whether the caption holds.
    """
    spec = parse_caption(caption_or_spec) if isinstance(caption_or_spec, str) else caption_or_spec
    rule, specs = _rule(spec), spec["objects"]
    if rule in ("single_object", "colors"):
        return len(objects) == 1 and _matches(objects[0], specs[0])
    if rule == "counting":
        return len(objects) == spec["count"] and all(_matches(o, specs[0]) for o in objects)
    if rule == "two_object":
        if len(objects) != 2:
            return False
        a, b = objects
        return (_matches(a, specs[0]) and _matches(b, specs[1])) or (_matches(b, specs[0]) and _matches(a, specs[1]))
    if rule in ("position", "color_attr"):
        for i, a in enumerate(objects):
            if not _matches(a, specs[0]):
                continue
            for j, b in enumerate(objects):
                if i != j and _matches(b, specs[1]):
                    if rule == "color_attr" or relation_holds(a, b, spec["relation"]):
                        return True
        return False
    raise ValueError(f"spec task must be one of {EVAL_TASKS}, got {spec['task']!r}")


# ----------------------------------------------------------------------------------------------------
# Sampling captions and scenes


def _check_rng(rng) -> None:
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")


def _check_task(task: str, allowed: tuple[str, ...] = EVAL_TASKS) -> None:
    if task not in allowed:
        raise ValueError(f"task must be one of {allowed}, got {task!r}")


def _maybe_size(rng: random.Random, prob: float) -> str | None:
    return rng.choice(SIZE_NAMES) if rng.random() < prob else None


def _sample_spec(rng: random.Random, task: str) -> tuple[dict, bool]:
    """A random training-style caption spec for a task, and whether to use the long relation form."""
    if task == "single_object":
        return _make_spec(task, [_object_spec(rng.choice(SHAPES), size=_maybe_size(rng, SIZE_WORD_PROB))]), False
    if task == "two_object":
        shapes = rng.sample(SHAPES, 2)
        return _make_spec(task, [_object_spec(s, size=_maybe_size(rng, SIZE_WORD_PROB)) for s in shapes]), False
    if task == "counting":
        return _make_spec(task, [_object_spec(rng.choice(SHAPES))], count=rng.choice(tuple(COUNT_WORDS))), False
    if task == "colors":
        color, shape = rng.choice(_TRAINING_PAIRS)
        return _make_spec(task, [_object_spec(shape, color, _maybe_size(rng, SIZE_WORD_PROB))]), False
    if task == "position":
        shapes = rng.sample(SHAPES, 2)
        with_colors = rng.random() < POSITION_COLOR_PROB
        objects = [
            _object_spec(s, rng.choice(_TRAINING_COLORS[s]) if with_colors else None, _maybe_size(rng, SIZE_WORD_PROB))
            for s in shapes
        ]
        return _make_spec(task, objects, relation=rng.choice(RELATIONS)), rng.random() < LONG_RELATION_PROB
    if task == "color_attr":
        first = rng.choice(_TRAINING_PAIRS)
        second = rng.choice([p for p in _TRAINING_PAIRS if p[0] != first[0] and p[1] != first[1]])
        objects = [_object_spec(s, c, _maybe_size(rng, SIZE_WORD_PROB)) for c, s in (first, second)]
        return _make_spec(task, objects), False
    # novel: the colors or the color_attr form, built only from held-out pairs (always distinct colors and shapes)
    pairs = rng.sample(_HELD_OUT_LIST, rng.choice((1, 2)))
    return _make_spec(NOVEL_TASK, [_object_spec(s, c) for c, s in pairs]), False


def _free_starts(size: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Boolean grid `[y0, x0]` of top-left corners where a `size` box keeps `MIN_GAP_PX` from `boxes`."""
    lo = CANVAS_MARGIN_PX
    n = IMAGE_SIZE - 2 * CANVAS_MARGIN_PX - size + 1  # valid starts lo .. lo + n - 1 on each axis
    free = np.ones((n, n), dtype=bool)
    for bx0, by0, bx1, by1 in boxes:
        # [x0, x0 + size) meets [bx0 - gap, bx1 + gap) iff bx0 - gap - size < x0 < bx1 + gap
        x_from, x_to = max(bx0 - MIN_GAP_PX - size + 1 - lo, 0), min(bx1 + MIN_GAP_PX - 1 - lo, n - 1)
        y_from, y_to = max(by0 - MIN_GAP_PX - size + 1 - lo, 0), min(by1 + MIN_GAP_PX - 1 - lo, n - 1)
        if x_from <= x_to and y_from <= y_to:
            free[y_from : y_to + 1, x_from : x_to + 1] = False
    return free


def _place_boxes(rng: random.Random, sizes: list[int]) -> list[tuple[int, int]] | None:
    """Top-left corners for boxes of `sizes` (largest placed first), or None when this attempt got stuck."""
    order = sorted(range(len(sizes)), key=lambda k: -sizes[k])
    boxes: list[tuple[int, int, int, int]] = []
    corners: dict[int, tuple[int, int]] = {}
    for k in order:
        free = np.flatnonzero(_free_starts(sizes[k], boxes))
        if free.size == 0:
            return None
        n = IMAGE_SIZE - 2 * CANVAS_MARGIN_PX - sizes[k] + 1
        y_index, x_index = divmod(int(free[rng.randrange(free.size)]), n)
        x0, y0 = x_index + CANVAS_MARGIN_PX, y_index + CANVAS_MARGIN_PX
        corners[k] = (x0, y0)
        boxes.append((x0, y0, x0 + sizes[k], y0 + sizes[k]))
    return [corners[k] for k in range(len(sizes))]


def _place_pair(rng: random.Random, size_a: int, size_b: int, relation: str) -> list[tuple[int, int]]:
    """Top-left corners of A and B such that "A relation B" holds with a clear margin."""
    first_is_a = relation in ("left of", "above")  # the object with the smaller main-axis coordinate
    s1, s2 = (size_a, size_b) if first_is_a else (size_b, size_a)
    lo, hi = CANVAS_MARGIN_PX, IMAGE_SIZE - CANVAS_MARGIN_PX
    while True:
        # Main axis: the boxes are disjoint with at least MIN_GAP_PX between them.
        p1 = rng.randint(lo, hi - s1 - MIN_GAP_PX - s2)
        p2 = rng.randint(p1 + s1 + MIN_GAP_PX, hi - s2)
        main_offset = (p2 + s2 / 2) - (p1 + s1 / 2)
        # Cross axis: center offset at most POSITION_CROSS_AXIS_RATIO of the main-axis offset.
        q1 = rng.randint(lo, hi - s1)
        max_cross = POSITION_CROSS_AXIS_RATIO * main_offset
        q2_from = max(lo, math.ceil(q1 + (s1 - s2) / 2 - max_cross))
        q2_to = min(hi - s2, math.floor(q1 + (s1 - s2) / 2 + max_cross))
        if q2_from <= q2_to:
            break
    q2 = rng.randint(q2_from, q2_to)
    horizontal = relation in ("left of", "right of")
    corner1, corner2 = ((p1, q1), (p2, q2)) if horizontal else ((q1, p1), (q2, p2))
    return [corner1, corner2] if first_is_a else [corner2, corner1]


def _build_objects(rng: random.Random, spec: dict, allow_held_out: bool) -> tuple[ShapeObject, ...]:
    """Objects that satisfy `spec` exactly; unnamed attributes are random (held-out pairs only if allowed)."""
    specs = spec["objects"] * (spec["count"] or 1)
    colors_for = _ALL_COLORS if allow_held_out else _TRAINING_COLORS
    colors, size_names = [], []
    for obj in specs:
        color = obj["color"] or rng.choice(colors_for[obj["shape"]])
        if not allow_held_out and (color, obj["shape"]) in HELD_OUT_PAIRS:
            raise ValueError(f"{color} {obj['shape']} is a held-out pair, never drawn in training scenes")
        colors.append(color)
        size_names.append(obj["size"] or rng.choice(SIZE_NAMES))
    sizes = [rng.randint(*SIZE_RANGES[name]) for name in size_names]
    if spec["relation"] is not None:
        corners = _place_pair(rng, sizes[0], sizes[1], spec["relation"])
    else:
        corners = None
        while corners is None:
            for _ in range(_PLACEMENT_ATTEMPTS):
                corners = _place_boxes(rng, sizes)
                if corners is not None:
                    break
            else:  # too crowded: shrink the largest object whose size the caption does not name
                shrinkable = [k for k, obj in enumerate(specs) if obj["size"] is None and size_names[k] == "large"]
                if not shrinkable:
                    raise ValueError(f"cannot fit the objects of {format_caption(spec)!r} on the canvas")
                k = max(shrinkable, key=lambda j: sizes[j])
                size_names[k], sizes[k] = "small", rng.randint(*SIZE_RANGES["small"])
    return tuple(
        ShapeObject(obj["shape"], color, name, x0 + size / 2, y0 + size / 2, size)
        for obj, color, name, size, (x0, y0) in zip(specs, colors, size_names, sizes, corners)
    )


def scene_from_caption(caption: str, rng: random.Random, allow_held_out: bool = True) -> Scene:
    """
    Sample a scene that shows exactly what a caption describes (unnamed attributes random).

    Args:
        caption (`str`): a caption in the world's language (see `parse_caption`).
        rng (`random.Random`): the source of randomness.
        allow_held_out (`bool`, *optional*, defaults to `True`): whether unnamed colors may form a
            held-out pair (and whether named held-out pairs are accepted).

    Returns:
        `Scene`: a scene whose `caption` is `caption`; render it with `render_scene`.
    """
    _check_rng(rng)
    spec = parse_caption(caption)
    objects = _build_objects(rng, spec, allow_held_out)
    return Scene(objects, caption, spec["task"], spec["relation"])


def sample_example(rng: random.Random, task: str) -> tuple[Image.Image, str, Scene]:
    """
    Sample a training-style (image, caption, scene) for one task.

    Captions of the six training tasks may carry optional size words, colors in position captions and
    the "to the left of" paraphrase; their scenes never contain a held-out pair. `task="novel"` builds
    scenes from held-out pairs only (for evaluation, never for training).

    Args:
        rng (`random.Random`): the source of randomness.
        task (`str`): one of `EVAL_TASKS`.

    Returns:
        `tuple[PIL.Image.Image, str, Scene]`: the 64 x 64 RGB image, its caption and the scene.

    Example:

    ```python
    >>> image, caption, scene = sample_example(random.Random(0), "counting")
    >>> caption
    'three diamonds'
    ```
    """
    _check_rng(rng)
    _check_task(task)
    spec, long_relation = _sample_spec(rng, task)
    objects = _build_objects(rng, spec, allow_held_out=task == NOVEL_TASK)
    scene = Scene(objects, format_caption(spec, long_relation), task, spec["relation"])
    return render_scene(scene), scene.caption, scene


# ----------------------------------------------------------------------------------------------------
# Hard negatives


def _is_well_formed(spec: dict, allow_held_out: bool) -> bool:
    """Whether a spec is a caption the world would write (distinct shapes/colors in pairs, held-out rule)."""
    objects = spec["objects"]
    if not allow_held_out and any((o["color"], o["shape"]) in HELD_OUT_PAIRS for o in objects):
        return False
    if len(objects) == 2:
        first, second = objects
        if first["shape"] == second["shape"]:
            return False
        if first["color"] and second["color"] and first["color"] == second["color"] and spec["task"] != "position":
            return False
    return True


def _single_edits(spec: dict) -> dict[str, list[dict]]:
    """Every spec that differs from `spec` in one attribute, count, relation or color binding, by kind."""
    edits: dict[str, list[dict]] = {"shape": [], "color": [], "size": [], "count": [], "relation": [], "binding": []}

    def edited(index: int | None = None, **changes) -> dict:
        new = {**spec, "objects": [dict(o) for o in spec["objects"]]}
        if index is None:
            new.update(changes)
        else:
            new["objects"][index].update(changes)
        return new

    for i, obj in enumerate(spec["objects"]):
        edits["shape"] += [edited(i, shape=s) for s in SHAPES if s != obj["shape"]]
        if obj["color"]:
            edits["color"] += [edited(i, color=c) for c in COLORS if c != obj["color"]]
        if obj["size"]:
            edits["size"] += [edited(i, size=s) for s in SIZE_NAMES if s != obj["size"]]
    if spec["count"] is not None:
        edits["count"] += [edited(count=n) for n in COUNT_WORDS if n != spec["count"]]
    if spec["relation"] is not None:
        edits["relation"] += [edited(relation=r) for r in RELATIONS if r != spec["relation"]]
    objects = spec["objects"]
    if len(objects) == 2 and objects[0]["color"] and objects[1]["color"] and objects[0]["color"] != objects[1]["color"]:
        swapped = edited()
        swapped["objects"][0]["color"], swapped["objects"][1]["color"] = objects[1]["color"], objects[0]["color"]
        edits["binding"].append(swapped)
    return edits


def _false_single_edits(scene: Scene) -> dict[str, list[dict]]:
    spec = parse_caption(scene.caption)
    spec["task"] = scene.task if scene.task == NOVEL_TASK else spec["task"]
    allow_held_out = scene.task == NOVEL_TASK
    return {
        kind: [s for s in specs if _is_well_formed(s, allow_held_out) and not caption_holds(s, scene.objects)]
        for kind, specs in _single_edits(spec).items()
    }


def corrupt_caption(scene: Scene, rng: random.Random) -> str:
    """
    The scene's caption with one attribute, count or relation changed so that it is false for the scene.

    The kind of edit (shape, color, size word, count, relation, or swapping the colors of two objects)
    is drawn uniformly among the kinds that apply, then the edit itself. The result stays in the
    world's language (and out of the held-out pairs unless the scene is a novel one), keeping the
    original's phrasing of the relation.

    Args:
        scene (`Scene`): a scene whose caption is true.
        rng (`random.Random`): the source of randomness.

    Returns:
        `str`: a caption that is false for `scene`.

    Example:

    ```python
    >>> image, caption, scene = sample_example(random.Random(1), "position")
    >>> caption, corrupt_caption(scene, random.Random(0))
    ('a square below a triangle', 'a square below a diamond')
    ```
    """
    _check_rng(rng)
    candidates = {kind: specs for kind, specs in _false_single_edits(scene).items() if specs}
    if not candidates:
        raise ValueError(f"no single edit makes {scene.caption!r} false for its scene")
    kind = rng.choice(sorted(candidates))
    return format_caption(rng.choice(candidates[kind]), long_relation=" to the " in scene.caption)


def captions_for_clip_negatives(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """
    `n` distinct captions that are false for a scene: hard negatives for CLIP training.

    Single edits of the true caption come first (same shapes with a swapped color, count or relation,
    in random order); when there are fewer than `n` of them, random training-style captions that are
    false for the scene fill the rest.

    Args:
        scene (`Scene`): a scene whose caption is true.
        rng (`random.Random`): the source of randomness.
        n (`int`): how many captions to return.

    Returns:
        `list[str]`: `n` distinct false captions, none equal to the scene's caption.
    """
    _check_rng(rng)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    long_relation = " to the " in scene.caption
    edits = [format_caption(s, long_relation) for specs in _false_single_edits(scene).values() for s in specs]
    rng.shuffle(edits)
    negatives = list(dict.fromkeys(edits))[:n]
    seen = set(negatives) | {scene.caption}
    while len(negatives) < n:
        spec, long_relation = _sample_spec(rng, rng.choice(TASKS))
        caption = format_caption(spec, long_relation)
        if caption not in seen and not caption_holds(spec, scene.objects):
            seen.add(caption)
            negatives.append(caption)
    return negatives


# ----------------------------------------------------------------------------------------------------
# Evaluation prompts and tokenizer captions


@dataclass(frozen=True)
class EvalPrompt:
    """
    One evaluation prompt.

    Args:
        prompt (`str`): the caption in its canonical form, e.g. `"a circle left of a square"`.
        task (`str`): one of `EVAL_TASKS`.
        spec (`dict`): the parsed caption with `spec["task"] == task`; what the checker verifies.
    """

    prompt: str
    task: str
    spec: dict


def _canonical_prompts(task: str) -> list[str]:
    """Every distinct evaluation prompt of a task, in the exact forms of the task table."""
    if task == "single_object":
        return [f"a {s}" for s in SHAPES]
    if task == "two_object":
        return [f"a {a} and a {b}" for a in SHAPES for b in SHAPES if a != b]
    if task == "counting":
        return [f"{word} {s}s" for word in COUNT_WORDS.values() for s in SHAPES]
    if task == "colors":
        return [format_caption(_make_spec(task, [_object_spec(s, c)])) for c, s in _TRAINING_PAIRS]
    if task == "position":
        return [f"a {a} {r} a {b}" for a in SHAPES for b in SHAPES if a != b for r in RELATIONS]
    if task == "color_attr":
        return [
            format_caption(_make_spec(task, [_object_spec(s1, c1), _object_spec(s2, c2)]))
            for c1, s1 in _TRAINING_PAIRS
            for c2, s2 in _TRAINING_PAIRS
            if c1 != c2 and s1 != s2
        ]
    raise AssertionError(task)


def _cycle(rng: random.Random, items: list[str], n: int) -> list[str]:
    """`n` items taken from shuffled passes over `items`, so every item appears n // len(items) times or more."""
    out: list[str] = []
    while len(out) < n:
        shuffled = list(items)
        rng.shuffle(shuffled)
        out += shuffled
    return out[:n]


def evaluation_prompts(task: str, n: int = 100, seed: int = 0) -> list[EvalPrompt]:
    """
    The fixed evaluation prompts of one task (deterministic for a seed).

    Prompts use exactly the forms of the task table (no size words, no paraphrases) and are drawn in
    shuffled passes over all distinct prompts of the task, so small tasks (4 single-object prompts) are
    balanced. The six tasks never mention a held-out pair; `novel` alternates its colors form (4
    prompts) and its color_attr form (12 prompts), built only from held-out pairs.

    Args:
        task (`str`): one of `EVAL_TASKS`.
        n (`int`, *optional*, defaults to 100): the number of prompts.
        seed (`int`, *optional*, defaults to 0): selects the prompts and their order.

    Returns:
        `list[EvalPrompt]`: `n` prompts.

    Example:

    ```python
    >>> [p.prompt for p in evaluation_prompts("counting", n=2)]
    ['four triangles', 'two circles']
    ```
    """
    _check_task(task)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(f"shapes-eval/{task}/{seed}")
    if task == NOVEL_TASK:
        one = [format_caption(_make_spec(task, [_object_spec(s, c)])) for c, s in _HELD_OUT_LIST]
        two = [
            format_caption(_make_spec(task, [_object_spec(s1, c1), _object_spec(s2, c2)]))
            for c1, s1 in _HELD_OUT_LIST
            for c2, s2 in _HELD_OUT_LIST
            if (c1, s1) != (c2, s2)
        ]
        ones, twos = _cycle(rng, one, (n + 1) // 2), _cycle(rng, two, n // 2)
        prompts = [ones[i // 2] if i % 2 == 0 else twos[i // 2] for i in range(n)]
    else:
        prompts = _cycle(rng, _canonical_prompts(task), n)
    return [EvalPrompt(prompt, task, {**parse_caption(prompt), "task": task}) for prompt in prompts]


def all_captions(n: int = 10_000, seed: int = 0) -> Iterator[str]:
    """
    Training-style captions of all six tasks (uniformly mixed), e.g. for training the BPE tokenizer.

    Args:
        n (`int`, *optional*, defaults to 10000): how many captions to yield.
        seed (`int`, *optional*, defaults to 0): seeds the captions.

    Returns:
        `Iterator[str]`: `n` captions (with repeats), covering every word of the language.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(f"shapes-captions/{seed}")
    for _ in range(n):
        spec, long_relation = _sample_spec(rng, rng.choice(TASKS))
        yield format_caption(spec, long_relation)


# ----------------------------------------------------------------------------------------------------
# The streaming dataset


def _validate_task_weights(task_weights: dict | None) -> dict[str, float]:
    if task_weights is None:
        return {task: 1.0 for task in TASKS}
    if not isinstance(task_weights, dict) or not task_weights:
        raise ValueError(f"task_weights must be a non-empty dict task -> weight, got {task_weights!r}")
    for task, weight in task_weights.items():
        if task not in TASKS:
            raise ValueError(f"task_weights keys must be training tasks {TASKS}, got {task!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"task_weights[{task!r}] must be a finite number >= 0, got {weight!r}")
    if sum(task_weights.values()) <= 0:
        raise ValueError("task_weights must have a positive total weight")
    return {task: float(weight) for task, weight in task_weights.items() if weight > 0}


class ShapesDataset(torch.utils.data.IterableDataset):
    """
    An infinite stream of freshly rendered training examples of the shapes world.

    Each dataloader worker and each distributed rank draws its own stream, seeded from
    `(seed, rank, worker id)`, so no two workers ever yield the same sequence. Held-out pairs never appear.

    Args:
        seed (`int`, *optional*, defaults to 0): seeds every stream.
        task_weights (`dict[str, float]`, *optional*, defaults to `None`): relative frequency of each
            training task (missing tasks are never drawn); `None` draws the six tasks uniformly.
        image_size (`int`, *optional*, defaults to 64): side of the yielded images; the world is drawn at
            64 px and resized when this differs.

    Yields:
        `dict`: `{"pixel_values": FloatTensor (3, image_size, image_size) in [0, 1], "text": str, "task": str}`.

    Example:

    ```python
    >>> example = next(iter(ShapesDataset(seed=0, task_weights={"colors": 1.0})))
    >>> example["pixel_values"].shape, example["task"]
    (torch.Size([3, 64, 64]), 'colors')
    ```
    """

    def __init__(self, seed: int = 0, task_weights: dict | None = None, image_size: int = 64):
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        self.seed = seed
        self.task_weights = _validate_task_weights(task_weights)
        self.image_size = image_size

    def _stream_rng(self) -> random.Random:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        return random.Random(f"shapes-dataset/{self.seed}/rank{rank}/worker{worker_id}")

    def __iter__(self) -> Iterator[dict]:
        rng = self._stream_rng()
        tasks, weights = list(self.task_weights), list(self.task_weights.values())
        while True:
            task = rng.choices(tasks, weights)[0]
            image, caption, _ = sample_example(rng, task)
            if self.image_size != IMAGE_SIZE:
                image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
            yield {"pixel_values": pixels.float().div_(255.0).contiguous(), "text": caption, "task": task}
# ----------------------------------------------------------------------------------------------------
# The checker: objects read from pixels (ShapesEval)

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
UNKNOWN = len(COLOR_NAMES)  # label of foreground pixels no palette color explains; its objects have color None
_BACKGROUND = -1
_INK = 255.0 - np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # (8, 3) white -> color
_INK_NORM2 = (_INK**2).sum(axis=1)  # (8,)


@dataclass(frozen=True)
class DetectedObject:
    """
    An object found in an image by the checker.

    Args:
        shape (`str` or `None`): one of `SHAPES`, or `None` when the component fits no ideal shape.
        color (`str` or `None`): the majority palette color, or `None` when it is off the palette.
        size_name (`str`): `"small"` when `size_px` is below 20, else `"large"`.
        size_px (`float`): bounding-box side of the ideal `shape` with the component's ink area (blur does
            not change the ink area); the bounding box side when `shape` is `None`.
        cx (`float`): x of the bounding-box center in px (pixel `i` spans `[i, i + 1)`).
        cy (`float`): y of the bounding-box center in px.
        width (`int`): bounding box width in px.
        height (`int`): bounding box height in px.
        area (`int`): pixels in the component (at least half ink).
        fill_ratio (`float`): area / bounding-box area (circle ~0.785, square ~1, triangle and diamond ~0.5).
        harmonic3 (`float`): `|sum w z^3| / A^2.5`, the 3-fold moment of the ink `w` about its centroid
            (`z = x + iy`): ~0.068 for a triangle, ~0 for the centrally symmetric shapes.
        harmonic4 (`float`): `Re(sum w z^4) / A^3`: +1/60 for a diamond, -1/60 for a square, ~0 for a circle.
        shape_score (`float`): intersection-over-union with the ideal `shape` drawn in the same bounding box.
        bbox (`tuple[int, int, int, int]`): `(x0, y0, x1, y1)`, exclusive `x1`, `y1`.
    """

    shape: str | None
    color: str | None
    size_name: str
    size_px: float
    cx: float
    cy: float
    width: int
    height: int
    area: int
    fill_ratio: float
    harmonic3: float
    harmonic4: float
    shape_score: float
    bbox: tuple[int, int, int, int]


# ----------------------------------------------------------------------------------------------------
# Reading pixels


def _to_rgb_array(image) -> np.ndarray:
    """A (64, 64, 3) float32 array in [0, 255] from PIL, (H, W, 3) arrays or (3, H, W) tensors/arrays."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        return np.asarray(image, dtype=np.float32)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError(
            "image must be a PIL image, an (H, W, 3) array or a (3, H, W) array/tensor, "
            f"got {type(image).__name__} with shape {getattr(image, 'shape', None)}"
        )
    if image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if image.shape[-1] != 3:
        raise ValueError(f"image must have 3 channels, got shape {image.shape}")
    # uint8 arrays are in [0, 255]; float arrays in [0, 1] (the package convention for tensors)
    array = image.astype(np.float32) if image.dtype == np.uint8 else np.clip(image.astype(np.float32), 0, 1) * 255
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        pil = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8))
        array = np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32)
    return array


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: union-find over horizontal runs. Returns (labels, count)."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past its end
    run_rows, run_starts = np.nonzero(edges == 1)
    _, run_ends = np.nonzero(edges == -1)  # row-major order pairs each start with its end
    parent = list(range(len(run_rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows, starts, ends = run_rows.tolist(), run_starts.tolist(), run_ends.tolist()
    row_first = np.searchsorted(run_rows, np.arange(height + 1)).tolist()  # runs of row y: row_first[y]:row_first[y+1]
    for y in range(height - 1):
        i, i_end, j, j_end = row_first[y], row_first[y + 1], row_first[y + 1], row_first[y + 2]
        while i < i_end and j < j_end:  # two pointers over the sorted runs of rows y and y + 1
            if starts[i] < ends[j] and starts[j] < ends[i]:
                root_i, root_j = find(i), find(j)
                if root_i != root_j:
                    parent[root_j] = root_i
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    labels = np.zeros((height, width), dtype=np.int32)
    component_of_root: dict[int, int] = {}
    for k in range(len(rows)):
        component = component_of_root.setdefault(find(k), len(component_of_root) + 1)
        labels[rows[k], starts[k] : ends[k]] = component
    return labels, len(component_of_root)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a boolean mask by `steps` px (8-neighborhood)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        vertical = grown.copy()
        grown[:, 1:] |= vertical[:, :-1]
        grown[:, :-1] |= vertical[:, 1:]
        out = grown
    return out


@functools.lru_cache(maxsize=4096)
def _shape_templates(height: int, width: int) -> np.ndarray:
    """(4, height, width) boolean masks of the ideal shapes filling a bounding box, in `SHAPES` order."""
    v = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height  # pixel centers in [0, 1]
    u = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
    du, dv = np.abs(u - 0.5), np.abs(v - 0.5)
    templates = {
        "circle": du**2 + dv**2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": du <= v / 2,  # apex at the top center, base at the bottom
        "diamond": du + dv <= 0.5,
    }
    return np.stack([templates[s] for s in SHAPES])


# Area of each ideal shape relative to its square bounding box.
_IDEAL_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}


class ShapesEval:
    """
    The ShapesEval checker: finds the objects in an image and decides whether a caption holds.

    Pixels: each pixel `p` is compared with every segment white -> palette color `c`; its ink weight is
    `alpha = clip(<255 - p, 255 - c> / |255 - c|^2, 0, 1)` and its residual the distance to the blend
    `255 - alpha * (255 - c)`. The color with the smallest residual labels the pixel, which is foreground
    when `alpha >= min_coverage`. Anti-aliased and blurred edges are such blends, so they keep their color.

    Shapes: from the harmonic moments of the ink (alpha) around each component, which an isotropic blur
    leaves unchanged (mean value property): a triangle has a strong 3-fold moment; among the centrally
    symmetric shapes the 4-fold moment is -1/60 (square), 0 (circle) or +1/60 (diamond).

    Args:
        residual_threshold (`float`, *optional*, defaults to 60.0): largest RGB distance between a pixel and
            the nearest color-white blend for it to take that color; farther pixels with ink are of unknown
            color. Generated colors are off by ~20; blends of two palette colors at half coverage lie >= 38
            apart, and the nearest blend decides anyway.
        min_coverage (`float`, *optional*, defaults to 0.5): a pixel is foreground when at least this
            fraction of it is ink; 0.5 keeps bounding boxes true to the drawn shape.
        unknown_ink (`float`, *optional*, defaults to 100.0): RGB distance from white above which an
            off-palette pixel is foreground (about half the ink of a palette color).
        min_area (`int`, *optional*, defaults to 22): components with fewer pixels are specks; the smallest
            object (a 12 px diamond) covers ~70 px, so 22 px (0.15 * 12 ** 2) is far below it.
        min_side (`int`, *optional*, defaults to 6): components with a bounding box side below this (half
            the smallest object) are specks or streaks.
        max_aspect (`float`, *optional*, defaults to 1.5): every shape has a square bounding box; more
            elongated components get shape `None`.
        max_side (`int`, *optional*, defaults to 40): components with a longer bounding box side get shape
            `None`; the largest object is 30 px and blur adds a few (a canvas of noise is no square).
        max_unknown_spread (`float`, *optional*, defaults to 30.0): an off-palette component whose RGB
            standard deviation exceeds this is texture or noise, not a flat object, and gets shape `None`.
        min_shape_score (`float`, *optional*, defaults to 0.5): components whose IoU with their ideal shape
            in the same bounding box is below this get shape `None` (clean renders score >= 0.85).
        min_split_fraction (`float`, *optional*, defaults to 0.2): a component is split by color when a
            second color has at least this fraction (and `min_area` px) of it: two touching objects.
        halo_px (`int`, *optional*, defaults to 3): the ink of a component is summed over the component
            grown by this many px, which holds the blurred edge of an object blurred by sigma <= 1.5 px.
        min_halo_ink (`float`, *optional*, defaults to 0.2): ink weights below this are dropped as noise (the
            4th moment weighs far pixels by r^4).
        triangle_threshold (`float`, *optional*, defaults to 0.035): `harmonic3` above this is a triangle
            (triangles ~0.068, other shapes < 0.015 even when blurred).
        square_threshold (`float`, *optional*, defaults to -0.008): `harmonic4` below this is a square (-1/60).
        diamond_threshold (`float`, *optional*, defaults to 0.006): `harmonic4` above this is a diamond
            (+1/60); in between is a circle (0). Asymmetric because blur rounds a small diamond's tips first.
    """

    def __init__(
        self,
        residual_threshold: float = 60.0,
        min_coverage: float = 0.5,
        unknown_ink: float = 100.0,
        min_area: int = 22,
        min_side: int = 6,
        max_aspect: float = 1.5,
        max_side: int = 40,
        max_unknown_spread: float = 30.0,
        min_shape_score: float = 0.5,
        min_split_fraction: float = 0.2,
        halo_px: int = 3,
        min_halo_ink: float = 0.2,
        triangle_threshold: float = 0.035,
        square_threshold: float = -0.008,
        diamond_threshold: float = 0.006,
    ):
        if not 0 < min_coverage < 1:
            raise ValueError(f"min_coverage must be in (0, 1), got {min_coverage}")
        if residual_threshold <= 0 or unknown_ink <= 0:
            raise ValueError("residual_threshold and unknown_ink must be positive")
        if min_area < 1 or min_side < 1 or max_aspect < 1 or halo_px < 0:
            raise ValueError("min_area and min_side must be >= 1, max_aspect >= 1 and halo_px >= 0")
        if not square_threshold < 0 < diamond_threshold:
            raise ValueError("square_threshold must be < 0 < diamond_threshold")
        self.residual_threshold = residual_threshold
        self.min_coverage = min_coverage
        self.unknown_ink = unknown_ink
        self.min_area = min_area
        self.min_side = min_side
        self.max_aspect = max_aspect
        self.max_side = max_side
        self.max_unknown_spread = max_unknown_spread
        self.min_shape_score = min_shape_score
        self.min_split_fraction = min_split_fraction
        self.halo_px = halo_px
        self.min_halo_ink = min_halo_ink
        self.triangle_threshold = triangle_threshold
        self.square_threshold = square_threshold
        self.diamond_threshold = diamond_threshold

    def _read_pixels(self, image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-pixel labels (H, W), ink weight of every palette color (H, W, 8) and the RGB array (H, W, 3)."""
        rgb = _to_rgb_array(image)
        ink = (255.0 - rgb).reshape(-1, 3)  # (N, 3)
        dots = ink @ _INK.T  # (N, 8)
        alpha = np.clip(dots / _INK_NORM2, 0.0, 1.0)
        ink_norm2 = (ink**2).sum(axis=1, keepdims=True)  # (N, 1)
        residual2 = np.maximum(ink_norm2 - 2 * alpha * dots + alpha**2 * _INK_NORM2, 0.0)
        best = residual2.argmin(axis=1)
        rows = np.arange(len(best))
        on_palette = residual2[rows, best] <= self.residual_threshold**2
        colored = on_palette & (alpha[rows, best] >= self.min_coverage)
        unknown = ~on_palette & (ink_norm2[:, 0] >= self.unknown_ink**2)
        labels = np.full(len(best), _BACKGROUND, dtype=np.int64)
        labels[colored] = best[colored]
        labels[unknown] = UNKNOWN
        height, width = rgb.shape[:2]
        return labels.reshape(height, width), alpha.reshape(height, width, len(COLOR_NAMES)), rgb

    def classify_pixels(self, image) -> np.ndarray:
        """Label every pixel: -1 background, `i` for `COLOR_NAMES[i]`, `UNKNOWN` for off-palette ink."""
        return self._read_pixels(image)[0]

    def _classify_shape(self, weights: np.ndarray) -> tuple[str, float, float, float]:
        """(shape, harmonic3, harmonic4, ink area) from the ink weights around one component."""
        area = float(weights.sum())
        ys, xs = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]]
        z = (xs - (weights * xs).sum() / area) + 1j * (ys - (weights * ys).sum() / area)  # about the centroid
        z2 = z * z
        harmonic3 = float(abs((weights * z2 * z).sum())) / area**2.5
        harmonic4 = float((weights * z2 * z2).sum().real) / area**3
        if harmonic3 >= self.triangle_threshold:
            shape = "triangle"
        elif harmonic4 <= self.square_threshold:
            shape = "square"
        elif harmonic4 >= self.diamond_threshold:
            shape = "diamond"
        else:
            shape = "circle"
        return shape, harmonic3, harmonic4, area

    def _describe(self, mask: np.ndarray, color_label: int, labels: np.ndarray, alpha: np.ndarray, rgb: np.ndarray):
        """Measure one object given its full-size mask; None for specks."""
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        height, width, area = y1 - y0, x1 - x0, len(ys)
        if area < self.min_area or min(height, width) < self.min_side:
            return None
        # The ink around the object: its pixels plus the blurred edge (background-labeled pixels nearby).
        wy0, wy1 = max(y0 - self.halo_px, 0), min(y1 + self.halo_px, mask.shape[0])
        wx0, wx1 = max(x0 - self.halo_px, 0), min(x1 + self.halo_px, mask.shape[1])
        window = mask[wy0:wy1, wx0:wx1]
        if color_label == UNKNOWN:
            weights = window.astype(np.float64)
        else:
            region = _dilate(window, self.halo_px) & (window | (labels[wy0:wy1, wx0:wx1] == _BACKGROUND))
            ink = alpha[wy0:wy1, wx0:wx1, color_label]
            weights = np.where(region & (ink >= self.min_halo_ink), ink, 0.0).astype(np.float64)
        shape, harmonic3, harmonic4, ink_area = self._classify_shape(weights)
        templates = _shape_templates(height, width)
        crop = mask[y0:y1, x0:x1]
        template = templates[SHAPES.index(shape)]
        shape_score = float((template & crop).sum() / (template | crop).sum())
        fits = (
            shape_score >= self.min_shape_score
            and max(height, width) <= self.max_aspect * min(height, width)
            and max(height, width) <= self.max_side
            and (color_label != UNKNOWN or float(rgb[mask].std(axis=0).mean()) <= self.max_unknown_spread)
        )
        size_px = math.sqrt(ink_area / _IDEAL_FILL[shape]) if fits else float(max(height, width))
        return DetectedObject(
            shape=shape if fits else None,
            color=COLOR_NAMES[color_label] if color_label != UNKNOWN else None,
            size_name="small" if size_px < SIZE_THRESHOLD_PX else "large",
            size_px=size_px,
            cx=x0 + width / 2,
            cy=y0 + height / 2,
            width=width,
            height=height,
            area=area,
            fill_ratio=area / (height * width),
            harmonic3=harmonic3,
            harmonic4=harmonic4,
            shape_score=shape_score,
            bbox=(x0, y0, x1, y1),
        )

    def _objects_in_component(self, mask: np.ndarray, labels: np.ndarray, alpha: np.ndarray, rgb: np.ndarray) -> list:
        """One object per component, or one per color when two solid colors touch (blurry generations)."""
        counts = np.bincount(labels[mask], minlength=UNKNOWN + 1)
        area = int(counts.sum())
        # Off-palette pixels never form an object of their own inside a component: they are noise in it.
        major = [
            int(c) for c in np.argsort(-counts[:UNKNOWN])
            if counts[c] >= max(self.min_area, self.min_split_fraction * area)
        ]
        if len(major) <= 1:
            found = self._describe(mask, int(counts.argmax()), labels, alpha, rgb)
            return [found] if found is not None else []
        objects = []
        for color_label in major:
            sub_labels, n = _label_components(mask & (labels == color_label))
            for k in range(1, n + 1):
                found = self._describe(sub_labels == k, color_label, labels, alpha, rgb)
                if found is not None:
                    objects.append(found)
        return objects

    def detect_objects(self, image) -> list[DetectedObject]:
        """
        Find the objects in an image.

        Args:
            image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`): RGB, as PIL, an (H, W, 3) uint8 array
                or a (3, H, W) / (H, W, 3) float array or tensor in [0, 1]; resized to 64 x 64 if needed.

        Returns:
            `list[DetectedObject]`: the objects, sorted top to bottom then left to right.
        """
        labels, alpha, rgb = self._read_pixels(image)
        components, count = _label_components(labels != _BACKGROUND)
        areas = np.bincount(components.ravel(), minlength=count + 1)
        objects = []
        for k in np.flatnonzero(areas[1:] >= self.min_area) + 1:
            objects += self._objects_in_component(components == k, labels, alpha, rgb)
        return sorted(objects, key=lambda o: (o.cy, o.cx))

    def check(self, image, prompt) -> bool:
        """
        Whether an image passes a prompt.

        Args:
            image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`): see `detect_objects`.
            prompt (`EvalPrompt`, `dict` or `str`): an evaluation prompt, a caption spec, or a caption
                string in the world's language (e.g. a `corrupt_caption` output).

        Returns:
            `bool`: whether the task rule holds for the detected objects.
        """
        return caption_holds(_to_spec(prompt), self.detect_objects(image))


def _to_spec(prompt) -> dict:
    if isinstance(prompt, EvalPrompt):
        return prompt.spec
    if isinstance(prompt, str):
        return parse_caption(prompt)
    if isinstance(prompt, dict) and {"task", "objects"} <= set(prompt):
        return prompt
    raise ValueError(f"prompt must be an EvalPrompt, a caption spec dict or a caption str, got {type(prompt).__name__}")


_DEFAULT_CHECKER = ShapesEval()


def detect_objects(image) -> list[DetectedObject]:
    """`ShapesEval().detect_objects(image)` with the default thresholds."""
    return _DEFAULT_CHECKER.detect_objects(image)


def check(image, prompt) -> bool:
    """`ShapesEval().check(image, prompt)` with the default thresholds; `prompt` may be a caption string."""
    return _DEFAULT_CHECKER.check(image, prompt)


def check_caption(image, caption: str) -> bool:
    """Whether a caption string (any form of the world's language) is true of an image."""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    return _DEFAULT_CHECKER.check(image, caption)



def _validate_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _validate_tasks(tasks) -> tuple[str, ...]:
    if tasks is None:
        return EVAL_TASKS
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of {EVAL_TASKS}, got {tasks!r}")
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown:
        raise ValueError(f"tasks must be among {EVAL_TASKS}, got {unknown}")
    return tuple(dict.fromkeys(tasks))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


# ----------------------------------------------------------------------------------------------------
# dVAE fidelity


def _module_device(module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    parameters = getattr(module, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_vae_fidelity(
    vae, n_per_task: int = 100, seed: int = 0, batch_size: int = 64, tasks: Sequence[str] | None = None
) -> dict:
    """
    How often a dVAE round trip keeps an image's true caption true for the checker.

    Renders fresh scenes (`sample_example`), reconstructs them with
    `vae.decode_code(vae.get_codebook_indices(pixel_values))` and checks each reconstruction against
    its scene's caption.

    Args:
        vae (`DalleVAE`): anything with `get_codebook_indices` and `decode_code` on (B, 3, 64, 64) [0, 1] images.
        n_per_task (`int`, *optional*, defaults to 100): scenes per task.
        seed (`int`, *optional*, defaults to 0): seeds the scenes.
        batch_size (`int`, *optional*, defaults to 64): images per dVAE call.
        tasks (`Sequence[str]`, *optional*, defaults to `None`): tasks to render; `None` means the six
            GenEval tasks and `novel`.

    Returns:
        `dict`: `{"fidelity": fraction over all scenes, "per_task": {task: fraction}, "mse": mean squared
        error in [0, 1] pixel units, "clean_accuracy": the checker on the original renders (1.0 expected),
        "n_per_task": n_per_task}`.

    Example:

    ```python
    >>> evaluate_vae_fidelity(DalleVAE.from_pretrained("checkpoints/shapes/vae"), n_per_task=50)["fidelity"]
    ```
    """
    _validate_positive_int("n_per_task", n_per_task)
    _validate_positive_int("batch_size", batch_size)
    tasks = _validate_tasks(tasks)
    rng = random.Random(f"shapes-vae-fidelity/{seed}")
    examples = [(task, *sample_example(rng, task)) for task in tasks for _ in range(n_per_task)]
    device = _module_device(vae)
    passed, clean, squared_errors = [], [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([np.array(image) for _, image, _, _ in batch]))  # (B, H, W, 3)
        pixel_values = pixels.permute(0, 3, 1, 2).float().div(255.0)  # (B, 3, H, W)
        codes = vae.get_codebook_indices(pixel_values.to(device))
        reconstructions = vae.decode_code(codes).float().clamp(0, 1).cpu()
        if reconstructions.shape != pixel_values.shape:
            raise ValueError(
                f"decode_code returned {tuple(reconstructions.shape)}, expected {tuple(pixel_values.shape)}"
            )
        squared_errors.append(((reconstructions - pixel_values) ** 2).mean(dim=(1, 2, 3)))
        for (task, image, caption, _), reconstruction in zip(batch, reconstructions):
            passed.append((task, check(reconstruction, caption)))
            clean.append(check(image, caption))
    per_task = {t: _mean([ok for task, ok in passed if task == t]) for t in tasks}
    return {
        "fidelity": _mean([ok for _, ok in passed]),
        "per_task": per_task,
        "mse": float(torch.cat(squared_errors).mean()),
        "clean_accuracy": _mean(clean),
        "n_per_task": n_per_task,
    }




# ----------------------------------------------------------------------------------------------------
# The world interface (`dalle_hf.data.world`): CLIP's hard negatives, caption ranking, candidate banks.

# CLIP draws relation and colour-binding scenes twice as often: they are the slow features to learn (with uniform
# tasks and random single edits as negatives, relation-only accuracy stayed at chance for 1000 steps). The
# transformer and the dVAE draw the six tasks uniformly. Evaluation stays uniform over tasks.
CLIP_TASK_WEIGHTS = {"single_object": 1.0, "two_object": 1.0, "counting": 1.0, "colors": 1.0, "position": 2.0,
                     "color_attr": 2.0}  # fmt: skip
UNIFORM_TASK_WEIGHTS = {task: 1.0 for task in TASKS}
EVALUATION_PROMPT_SEEDS = (0, 1)  # ShapesEval's reported (0) and dev (1) prompts: never training data
TOKENIZER_CAPTIONS = 10_000  # shapes captions the BPE is trained on: every word of the language appears


def parse_task_weights(text: str | None, defaults: dict[str, float]) -> dict[str, float]:
    """
    Parse `--task_weights`: `'position=4,color_attr=2'` -> `defaults` with those entries replaced.

    Args:
        text (`str`, *optional*): comma-separated `TASK=WEIGHT` items; `None` or `""` keeps `defaults`.
        defaults (`dict[str, float]`): every shapes task with its default relative frequency.

    Returns:
        `dict[str, float]`: a weight (>= 0) for every task of `defaults`, not all zero.
    """
    weights = dict(defaults)
    for item in (text or "").split(","):
        if not item.strip():
            continue
        task, sep, value = item.partition("=")
        task = task.strip()
        try:
            weight = float(value) if sep else None
        except ValueError:
            weight = None
        if task not in defaults or weight is None or not 0 <= weight < math.inf:
            raise ValueError(f"--task_weights expects comma-separated TASK=WEIGHT (TASK in {list(defaults)}, "
                             f"WEIGHT >= 0), got {item!r}")  # fmt: skip
        weights[task] = weight
    if not sum(weights.values()) > 0:
        raise ValueError(f"--task_weights leaves every task at weight 0: {text!r}")
    return weights


class ShapesCaptionsWithNegatives(IterableDataset):
    """
    An infinite stream of shapes renders, each with its caption, false captions of the same scene and the
    scene's objects (to tell which other captions in a batch are true of it).

    Args:
        seed (`int`): seeds the stream; each dataloader worker and distributed rank draws its own.
        num_negatives (`int`): hard negatives per image (`captions_for_clip_negatives`: single edits first).

    Yields:
        `dict`: `pixel_values` `(3, 64, 64)` in `[0, 1]`, `text`, `negatives` (`list[str]`), `objects`, `task`.
    """

    def __init__(self, seed: int, num_negatives: int, task_weights: dict[str, float] | None = None):
        super().__init__()
        self.seed = seed
        self.num_negatives = num_negatives
        self.task_weights = dict(CLIP_TASK_WEIGHTS if task_weights is None else task_weights)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        rng = random.Random(f"shapes-clip/{self.seed}/rank{rank}/worker{worker_id}")
        tasks, weights = list(self.task_weights), list(self.task_weights.values())
        while True:
            task = rng.choices(tasks, weights)[0]
            image, caption, scene = sample_example(rng, task)
            pixel_values = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (H, W, 3) -> (3, H, W)
            negatives = structure_negatives(scene) + captions_for_clip_negatives(scene, rng, self.num_negatives)
            yield {
                "pixel_values": pixel_values,
                "text": caption,
                "negatives": list(dict.fromkeys(negatives))[: self.num_negatives],
                "objects": scene.objects,
                "task": task,
            }


def structure_negatives(scene) -> list[str]:
    """
    False captions that reuse the true caption's words in another structure: for "A rel B" the three other
    relations and "B rel A"; for two coloured objects, the colours swapped between them.

    Only where objects are or which colour goes with which shape tells these apart from the truth, the two
    things a bag of words cannot do; random single edits rarely hit them (`captions_for_clip_negatives`).
    """
    spec = parse_caption(scene.caption)
    objects = spec["objects"]
    variants = []
    if spec["relation"] is not None:
        variants += [{**spec, "relation": r} for r in RELATIONS if r != spec["relation"]]
        variants.append({**spec, "objects": objects[::-1]})
    colors = [o["color"] for o in objects]
    if len(objects) == 2 and all(colors) and colors[0] != colors[1]:
        swapped = [{**objects[0], "color": objects[1]["color"]}, {**objects[1], "color": objects[0]["color"]}]
        variants.append({**spec, "objects": swapped})
    # Like `corrupt_caption`, never name a held-out pair: those stay unseen, as text too, for the novel task.
    variants = [v for v in variants if not any((o["color"], o["shape"]) in HELD_OUT_PAIRS for o in v["objects"])]
    long_relation = " to the " in scene.caption
    return [format_caption(v, long_relation) for v in variants if not caption_holds(v, scene.objects)]


def caption_ranking_set(n_images: int = 300, n_captions: int = 32, seed: int = 0, tasks=TASKS) -> RankingSet:
    """
    Fixed held-out shapes renders, each with `n_captions` candidates: the true caption first, then false
    captions of the same scene (all single edits, shuffled, then random false captions of the world).

    Returns:
        `RankingSet`: `pixel_values` `(N, 3, 64, 64)` in `[0, 1]`, `candidates`, and the tasks as `groups`.
    """
    if n_images < 1 or n_captions < 2:
        raise ValueError(f"need n_images >= 1 and n_captions >= 2, got {n_images} and {n_captions}")
    # A string seed: these scenes come from their own stream, never the training streams ("shapes-clip/...").
    rng = random.Random(f"clip-caption-ranking/{seed}")
    images, candidates, image_tasks = [], [], []
    for i in range(n_images):
        task = tasks[i % len(tasks)]  # balanced over tasks
        image, caption, scene = sample_example(rng, task)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)  # (3, H, W)
        candidates.append([caption] + captions_for_clip_negatives(scene, rng, n_captions - 1))
        image_tasks.append(task)
    return RankingSet(torch.stack(images), candidates, image_tasks)


class CandidateBank:
    """
    Generated candidates and the checker's verdicts on them (`benchmarks/rerank_bank.py build`): the reranking
    task itself. CLIP's renders-and-captions objective never shows it the transformer's typical failures (a
    fifth diamond for "four diamonds", two objects side by side for "above"), which is where its pick falls
    behind the checker's (report: counting 0.71 against 1.0). Only prompts with both passing and failing
    candidates are kept: the others carry no ranking signal. So are only prompts none of whose candidates shows
    a held-out colour/shape pair (as the checker detects it; the transformer sometimes draws one unasked): CLIP
    must never see those, for the `novel` task to measure generalization.

    Args:
        paths (`list[str]`): bank folders (`bank.npz` with `images` `(P, N, H, W, 3)` uint8 and `passed` `(P, N)`,
            `bank.json` with `prompts`, `tasks` and the build `config`).

    Raises:
        `ValueError`: a bank of `novel` prompts (its images would draw held-out pairs), one built on the
            evaluation's prompt seeds (0 reported, 1 dev), or no prompt with both verdicts.
    """

    def __init__(self, paths: list[str]):
        images, passed, prompts = [], [], []
        for path in paths:
            with open(os.path.join(path, "bank.json")) as f:
                meta = json.load(f)
            unknown = sorted(set(meta["tasks"]) - set(TASKS))
            if unknown:
                raise ValueError(f"{path} has prompts of {unknown}: a candidate bank takes only the training tasks "
                                 f"{list(TASKS)} (novel candidates draw held-out pairs).")
            prompt_seed = meta["config"].get("prompt_seed")
            if prompt_seed in EVALUATION_PROMPT_SEEDS:
                raise ValueError(f"{path} was built on prompt seed {prompt_seed}, one the evaluation uses "
                                 f"{EVALUATION_PROMPT_SEEDS}: build the training bank on another.")
            with np.load(os.path.join(path, "bank.npz")) as data:  # each key access decompresses: read once
                bank_images, bank_passed = data["images"], data["passed"]
            mixed = bank_passed.any(axis=1) & ~bank_passed.all(axis=1)  # (P,)
            keep = np.array([m and not shows_held_out_pair(group) for m, group in zip(mixed, bank_images)])
            images.append(bank_images[keep])
            passed.append(bank_passed[keep])
            prompts += [p for p, k in zip(meta["prompts"], keep) if k]
        if not prompts:
            raise ValueError(f"no prompt in {paths} has both passing and failing candidates and no held-out pair.")
        self.images = np.concatenate(images)  # (P, N, H, W, 3) uint8
        self.passed = torch.from_numpy(np.concatenate(passed))  # (P, N) bool
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, k: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """`k` random prompts: pixel values `(k * N, 3, H, W)` in `[0, 1]`, their prompts, `passed` `(k, N)`."""
        index = torch.randint(len(self), (k,), generator=generator)
        pixels = torch.from_numpy(self.images[index.numpy()])  # (k, N, H, W, 3)
        pixels = pixels.flatten(0, 1).permute(0, 3, 1, 2).float() / 255
        return pixels, [self.prompts[i] for i in index.tolist()], self.passed[index]


def shows_held_out_pair(images: np.ndarray) -> bool:
    """Whether any of `images` `(N, H, W, 3)` uint8 has an object of a held-out colour/shape pair (the checker's
    detector)."""
    return any((o.color, o.shape) in HELD_OUT_PAIRS for image in images for o in detect_objects(image))



class ShapesWorld(World):
    """
    The shapes world behind the `World` interface (`--dataset shapes`; the images are generated, no data folder).

    Args:
        task_weights (`str`, *optional*): `--task_weights`, e.g. `"color_attr=2,counting=1.5"`: tasks drawn more or
            less often than the defaults (uniform for the dVAE and transformer, `CLIP_TASK_WEIGHTS` for CLIP).
    """

    name = "shapes"
    native_image_size = IMAGE_SIZE
    has_hard_negatives = True
    has_ranking_set = True
    has_held_out_examples = True
    hard_negatives_description = "single edits of its own scene: a swapped colour, shape, size, count or relation"

    def __init__(self, data_dir: str | None = None, task_weights: str | None = None):
        super().__init__(data_dir)
        self.train_task_weights = parse_task_weights(task_weights, UNIFORM_TASK_WEIGHTS)
        self.clip_task_weights = parse_task_weights(task_weights, CLIP_TASK_WEIGHTS)

    def describe(self, for_clip: bool = False) -> str:
        if for_clip:
            return ("the procedural shapes world (`dalle_hf.data.shapes`): fresh renders of the six training tasks "
                    "(held-out colour/shape pairs never drawn), each with its true caption and false captions of the "
                    "same scene (`captions_for_clip_negatives`)")  # fmt: skip
        return "the procedural shapes world (`dalle_hf.data.shapes.ShapesDataset`), a fresh stream of rendered scenes"

    def train_dataset(self, image_size: int, seed: int) -> ShapesDataset:
        return ShapesDataset(seed=seed, task_weights=self.train_task_weights, image_size=image_size)

    def clip_dataset(self, image_size: int, seed: int, num_negatives: int) -> ShapesCaptionsWithNegatives:
        """64 px renders (`image_size` is ignored: CLIP resizes them) with `num_negatives` false captions each."""
        return ShapesCaptionsWithNegatives(seed, num_negatives, self.clip_task_weights)

    def caption_is_true(self, text: str, example: dict) -> bool:
        return caption_holds(_parsed_caption(text), example["objects"])

    def tokenizer_captions(self, seed: int = 0) -> Iterator[str]:
        return all_captions(TOKENIZER_CAPTIONS, seed=seed)

    def caption_ranking_set(self, n_images: int, n_captions: int, seed: int = 0) -> RankingSet:
        return caption_ranking_set(n_images, n_captions, seed)

    def held_out_examples(self, n: int, seed: int = 0) -> list[tuple[str, Image.Image, str]]:
        """`n` fresh renders cycling over the seven eval tasks, grouped by task, from their own stream (never a
        training stream; its name dates from the compression benchmark and is kept so its results reproduce)."""
        rng = random.Random(f"shapes-compression/{seed}")
        tasks = [EVAL_TASKS[i % len(EVAL_TASKS)] for i in range(n)]
        return [(task, *sample_example(rng, task)[:2]) for task in tasks]

    def hyperparameters(self, for_clip: bool = False) -> dict:
        weights = self.clip_task_weights if for_clip else self.train_task_weights
        return {"task weights": ", ".join(f"{t}={w:g}" for t, w in weights.items())}

    def candidate_bank(self, paths: list[str]) -> CandidateBank:
        return CandidateBank(paths)

    def evaluate_vae(self, vae, n: int, seed: int) -> dict:
        if n <= 0 or vae.config.image_size != IMAGE_SIZE:
            return {}
        fidelity = evaluate_vae_fidelity(vae, n_per_task=n, seed=seed)
        return {"fidelity": fidelity["fidelity"], "reconstruction_mse": fidelity["mse"],
                **{f"fidelity/{task}": value for task, value in fidelity["per_task"].items()}}  # fmt: skip

    def validation_prompts(self) -> list[str]:
        return list(SHOWCASE_PROMPTS)


@functools.lru_cache(maxsize=4096)
def _parsed_caption(text: str) -> dict:
    return parse_caption(text)


