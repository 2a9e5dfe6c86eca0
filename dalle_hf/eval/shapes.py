"""ShapesEval: a GenEval-style benchmark for the shapes world, scored by reading pixels.

The checker never sees the scene. It classifies every pixel by the palette color whose blend with
white explains it best (anti-aliased and blurry edges are such blends), groups foreground pixels into
connected components, drops specks, reads each component's color (majority vote), shape (3- and 4-fold
harmonic moments of its ink, which an isotropic blur leaves unchanged), size (from its ink area) and
bounding-box center, and then applies the task rule of `dalle_hf.data.shapes.caption_holds` to the
objects it found. On clean renders it is exact; blurred and noisy renders mostly pass (see
`benchmarks/checker_accuracy.py`).

`evaluate_pipeline` runs a text-to-image pipeline on the fixed evaluation prompts of the six GenEval
tasks (Ghosh et al. 2023) plus `novel` (held-out color/shape pairs) and writes `report.json` and sample
sheets; `evaluate_vae_fidelity` measures how often a dVAE round trip keeps an image's caption true.

Example:

```python
>>> import random
>>> from dalle_hf.data.shapes import sample_example
>>> from dalle_hf.eval.shapes import check, detect_objects
>>> image, caption, scene = sample_example(random.Random(0), "colors")
>>> check(image, caption), [(o.color, o.shape) for o in detect_objects(image)]
(True, [('pink', 'diamond')])
```
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..data.shapes import (
    COLORS,
    EVAL_TASKS,
    IMAGE_SIZE,
    NOVEL_TASK,
    SHAPES,
    SIZE_THRESHOLD_PX,
    TASKS,
    EvalPrompt,
    caption_holds,
    evaluation_prompts,
    parse_caption,
    sample_example,
)

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


@lru_cache(maxsize=4096)
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


# ----------------------------------------------------------------------------------------------------
# Evaluating a pipeline

EVAL_PROMPT_SEED = 0  # the benchmark's prompts are fixed; `seed` only changes the samples
_SHEET_PROMPTS = 8  # rows of each task's sample sheet
_SHEET_SCALE = 2  # 64 px samples are shown at 128 px
_SHEET_BORDER = 4  # px of the green (pass) / red (fail) frame
_PASS_RGB, _FAIL_RGB = (40, 170, 60), (220, 30, 30)


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


def _call_seed(seed: int, task: str, batch_index: int, stage: str) -> int:
    """A distinct, reproducible generator seed per (seed, task, batch, stage)."""
    return (seed * 1_000_003 + EVAL_TASKS.index(task) * 10_007 + batch_index * 101 + (stage == "rerank")) % 2**63


def _plan_calls(
    tasks: Sequence[str], stages: Sequence[tuple[str, int]], prompts_per_task: int, prompt_seed: int, batch_size: int
) -> list[tuple[str, str, int, list[EvalPrompt]]]:
    """
    Every pipeline call of an evaluation, in order: `(task, stage, batch_index, prompts)`.

    Each stage `(name, samples_per_prompt)` splits a task's prompts into calls of at most `batch_size` samples
    (at least one prompt); with `_call_seed`, the batch index fixes what a call draws.
    """
    plan = []
    for task in tasks:
        prompts = evaluation_prompts(task, prompts_per_task, seed=prompt_seed)
        for stage, per_prompt in stages:
            step = max(1, batch_size // per_prompt)
            for batch_index, start in enumerate(range(0, len(prompts), step)):
                plan.append((task, stage, batch_index, prompts[start : start + step]))
    return plan


def _generate(
    pipe, prompts: list[str], per_prompt: int, keep: int, seed: int, sampling: dict
) -> tuple[list, torch.Tensor | None]:
    output = pipe(
        prompt=prompts,
        num_images_per_prompt=per_prompt,
        num_images_to_keep=keep,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
        **sampling,
    )
    images = output.images if hasattr(output, "images") else output[0]
    if len(images) != len(prompts) * keep:
        raise ValueError(f"pipeline returned {len(images)} images for {len(prompts)} prompts x {keep} kept")
    return list(images), getattr(output, "clip_scores", None)


def _frame(image: Image.Image, passed: bool) -> Image.Image:
    side = IMAGE_SIZE * _SHEET_SCALE
    framed = Image.new("RGB", (side + 2 * _SHEET_BORDER,) * 2, _PASS_RGB if passed else _FAIL_RGB)
    framed.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (_SHEET_BORDER, _SHEET_BORDER))
    return framed


def _save_sheet(path: str, rows: list[tuple[str, list[tuple[Image.Image, bool]]]], title: str) -> None:
    """A PNG grid: one row per prompt (caption above), each sample framed green (pass) or red (fail)."""
    cell, gap, caption_height = IMAGE_SIZE * _SHEET_SCALE + 2 * _SHEET_BORDER, 6, 14
    columns = max(len(images) for _, images in rows)
    width = gap + columns * (cell + gap)
    height = caption_height + gap + len(rows) * (caption_height + cell + gap)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 2), title, fill=(0, 0, 0))
    y = caption_height + gap
    for prompt, images in rows:
        draw.text((gap, y), prompt, fill=(0, 0, 0))
        for i, (image, passed) in enumerate(images):
            sheet.paste(_frame(image, passed), (gap + i * (cell + gap), y + caption_height))
        y += caption_height + cell + gap
    sheet.save(path)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def evaluate_pipeline(
    pipe,
    out_dir: str,
    *,
    images_per_prompt: int = 4,
    candidates: int = 1,
    seed: int = 0,
    prompts_per_task: int = 100,
    tasks: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    prompt_seed: int = EVAL_PROMPT_SEED,
    sampling: dict | None = None,
) -> dict:
    """
    Score a text-to-image pipeline on ShapesEval and write `report.json` and sample sheets to `out_dir`.

    For every evaluation prompt (`evaluation_prompts(task, prompts_per_task)`) the pipeline draws
    `images_per_prompt` samples, each of which is checked. With `candidates > 1` a second pass draws
    `candidates` samples per prompt, all returned in the pipeline's order (CLIP-best first, as in DALL-E;
    without a CLIP model, as drawn): the first is the reranked pick, and checking all of them tells whether
    the reranker or the generator limits the score.

    Report keys: `accuracy` (per task, mean pass over all images), `shapes_eval` (mean accuracy of the
    six GenEval tasks evaluated), `novel`, `any_of_k` (per task, a prompt passes if any of its samples
    does) and `shapes_eval_any_of_k`; with `candidates > 1` also `reranked_accuracy` (per task),
    `shapes_eval_reranked`, `novel_reranked`, `reranked_by_clip` (whether the pipeline returned CLIP
    scores), `best_of_n_oracle` (per task, a prompt passes if any of its `candidates` samples does: what a
    perfect reranker would reach) and `shapes_eval_best_of_n_oracle`; plus `config`. Per-prompt results go
    to `results.jsonl`, sheets to `samples_{task}.png`.

    Args:
        pipe (`DallePipeline`): any callable obeying the pipeline call contract of docs/design.md.
        out_dir (`str`): where to write `report.json`, `results.jsonl` and `samples_{task}.png`.
        images_per_prompt (`int`, *optional*, defaults to 4): samples checked per prompt.
        candidates (`int`, *optional*, defaults to 1): samples reranked per prompt in the best-of-N pass;
            1 skips that pass.
        seed (`int`, *optional*, defaults to 0): seeds the generators; the same seed gives the same report.
        prompts_per_task (`int`, *optional*, defaults to 100): prompts per task.
        tasks (`Sequence[str]`, *optional*, defaults to `None`): tasks to run; `None` runs the six GenEval
            tasks and `novel`.
        batch_size (`int`, *optional*, defaults to 16): most samples drawn per pipeline call (at least one
            prompt per call).
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar.
        prompt_seed (`int`, *optional*, defaults to 0): selects the prompts (`EVAL_PROMPT_SEED`). Reported numbers
            use the default; tune sampling settings on another seed (a dev split) so they are not fitted
            to the reported prompts.
        sampling (`dict`, *optional*, defaults to `None`): extra pipeline arguments for every call, e.g.
            `{"guidance_scale": 3.0, "top_k": 64}`; `None` uses the pipeline's defaults. Recorded in the report.

    Returns:
        `dict`: the report written to `out_dir/report.json`.

    Example:

    ```python
    >>> report = evaluate_pipeline(pipe, "outputs/eval", images_per_prompt=4, candidates=8)
    >>> report["shapes_eval"], report["novel"], report["shapes_eval_reranked"]
    ```
    """
    # 1. Check inputs.
    _validate_positive_int("images_per_prompt", images_per_prompt)
    _validate_positive_int("candidates", candidates)
    _validate_positive_int("prompts_per_task", prompts_per_task)
    _validate_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    tasks = _validate_tasks(tasks)
    if isinstance(prompt_seed, bool) or not isinstance(prompt_seed, int):
        raise ValueError(f"prompt_seed must be an int, got {prompt_seed!r}")
    sampling = dict(sampling or {})
    reserved = {"prompt", "num_images_per_prompt", "num_images_to_keep", "generator", "output_type"}
    if reserved & set(sampling):
        raise ValueError(f"sampling must not set {sorted(reserved & set(sampling))}: the evaluation controls them")
    os.makedirs(out_dir, exist_ok=True)

    # 2. Plan every pipeline call: the sampling pass, then (candidates > 1) the reranked best-of-N pass.
    stages = [("sample", images_per_prompt)] + ([("rerank", candidates)] if candidates > 1 else [])
    plan = _plan_calls(tasks, stages, prompts_per_task, prompt_seed, batch_size)

    # 3. Generate and check every image.
    passes = {task: {"sample": [], "rerank": []} for task in tasks}  # per prompt: list of bools
    sheet_rows = {task: [] for task in tasks}
    reranked_by_clip = None
    records = []
    for task, stage, batch_index, batch in tqdm(plan, desc="ShapesEval", disable=not progress):
        per_prompt = keep = images_per_prompt if stage == "sample" else candidates
        call_seed = _call_seed(seed, task, batch_index, stage)
        images, clip_scores = _generate(pipe, [p.prompt for p in batch], per_prompt, keep, call_seed, sampling)
        if stage == "rerank":
            reranked_by_clip = clip_scores is not None
        for i, eval_prompt in enumerate(batch):
            prompt_images = images[i * keep : (i + 1) * keep]
            results = [check(image, eval_prompt) for image in prompt_images]
            prompt_index = len(passes[task][stage])
            passes[task][stage].append(results)
            record = {
                "task": task,
                "stage": stage,
                "prompt_index": prompt_index,
                "prompt": eval_prompt.prompt,
                "passed": results,
            }
            if clip_scores is not None:
                record["clip_scores"] = [float(score) for score in clip_scores[i]]
            records.append(record)
            if prompt_index < _SHEET_PROMPTS:
                if stage == "sample":
                    sheet_rows[task].append((eval_prompt.prompt, list(zip(prompt_images, results))))
                elif prompt_index < len(sheet_rows[task]):  # the reranked pick (first), as the last column
                    sheet_rows[task][prompt_index][1].append((prompt_images[0], results[0]))

    # 4. Score and write the report, per-prompt results and sample sheets.
    accuracy = {t: _mean([r for prompt in passes[t]["sample"] for r in prompt]) for t in tasks}
    any_of_k = {t: _mean([any(prompt) for prompt in passes[t]["sample"]]) for t in tasks}
    geneval_tasks = [t for t in tasks if t in TASKS]
    report = {
        "shapes_eval": _mean([accuracy[t] for t in geneval_tasks]) if geneval_tasks else None,
        "novel": accuracy.get(NOVEL_TASK),
        "accuracy": accuracy,
        "any_of_k": any_of_k,
        "shapes_eval_any_of_k": _mean([any_of_k[t] for t in geneval_tasks]) if geneval_tasks else None,
    }
    if candidates > 1:
        reranked = {t: _mean([prompt[0] for prompt in passes[t]["rerank"]]) for t in tasks}
        report["reranked_accuracy"] = reranked
        report["shapes_eval_reranked"] = _mean([reranked[t] for t in geneval_tasks]) if geneval_tasks else None
        report["novel_reranked"] = reranked.get(NOVEL_TASK)
        report["reranked_by_clip"] = reranked_by_clip
        oracle = {t: _mean([any(prompt) for prompt in passes[t]["rerank"]]) for t in tasks}
        report["best_of_n_oracle"] = oracle
        report["shapes_eval_best_of_n_oracle"] = _mean([oracle[t] for t in geneval_tasks]) if geneval_tasks else None
    report["config"] = {
        "images_per_prompt": images_per_prompt,
        "candidates": candidates,
        "seed": seed,
        "prompts_per_task": prompts_per_task,
        "prompt_seed": prompt_seed,
        "sampling": sampling,
        # What a call without guidance_scale uses (a DallePipeline's, from its model_index.json).
        "pipeline_default_guidance_scale": getattr(getattr(pipe, "config", None), "default_guidance_scale", None),
        "tasks": list(tasks),
        "batch_size": batch_size,
    }
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    for task in tasks:
        title = f"{task}: accuracy {accuracy[task]:.3f}"
        if candidates > 1:
            title += f" (last column: the pick of {candidates} candidates)"
        _save_sheet(os.path.join(out_dir, f"samples_{task}.png"), sheet_rows[task], title)
    return report


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
