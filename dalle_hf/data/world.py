"""Worlds: the one interface every training and evaluation dataset implements.

A *world* is a source of captioned 64 x 64 images together with what training and evaluation need to know about its
language: the captions a tokenizer learns, the hard negatives CLIP is shown beside each true caption, which captions
are true of an image (so that a true caption elsewhere in the batch is not counted as a negative), a caption-ranking
set to validate CLIP on, and the prompts an evaluation samples. `train_dvae.py`, `train_dalle.py`, `train_clip.py`
and `dalle-hf eval` pick a world with `--dataset NAME` and hold no world-specific code.

A world is one file: a module `dalle_hf/data/NAME.py` that defines a subclass of `World` with `name = "NAME"`.
`load_world("NAME", data_dir)` imports it; nothing else needs to change to add a third world.

Example:

```python
>>> from dalle_hf.data.world import load_world
>>> world = load_world("shapes")
>>> example = next(iter(world.train_dataset(image_size=64, seed=0)))
>>> example["pixel_values"].shape, isinstance(example["text"], str)
(torch.Size([3, 64, 64]), True)
```
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Iterable

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

IMAGE_SIZE = 64  # every world draws 64 x 64 RGB on white; other sizes are resized by the world


@dataclass
class RankingSet:
    """
    Images with candidate captions, the true one first: what CLIP's caption ranking is measured on.

    Args:
        pixel_values (`torch.Tensor`): `(N, 3, H, W)` in `[0, 1]`.
        candidates (`list[list[str]]`): `N` lists of captions; element 0 is true of the image, the others are not.
        groups (`list[str]`): a group name per image (a shapes task, an emoji style) for per-group accuracy.
    """

    pixel_values: torch.Tensor
    candidates: list[list[str]]
    groups: list[str] = field(default_factory=list)


class World(ABC):
    """
    The interface of a world (see the module docstring).

    Args:
        data_dir (`str`, *optional*): where the world's data lives (an imagefolder, the emoji cache); worlds that
            generate their images (shapes) take none.

    Class attributes:
        name (`str`): the `--dataset` name, and the module name under `dalle_hf.data`.
        needs_data_dir (`bool`): whether `data_dir` is required.
        native_image_size (`int` or `None`): the side the world draws at (its `clip_dataset` yields that size and
            CLIP resizes); `None`: images come at the size asked for.
        has_hard_negatives (`bool`): whether `clip_dataset` can give each image false captions.
        hard_negatives_description (`str`): what those are, for CLIP's model card.
        has_ranking_set (`bool`): whether `caption_ranking_set` is implemented (CLIP's validation).
        has_held_out_examples (`bool`): whether `held_out_examples` is implemented (the transformer's held-out loss).
    """

    name: ClassVar[str] = ""
    needs_data_dir: ClassVar[bool] = False
    native_image_size: ClassVar[int | None] = None
    has_hard_negatives: ClassVar[bool] = False
    hard_negatives_description: ClassVar[str] = ""
    has_ranking_set: ClassVar[bool] = False
    has_held_out_examples: ClassVar[bool] = False

    def __init__(self, data_dir: str | None = None):
        if self.needs_data_dir and not data_dir:
            raise ValueError(f"--dataset {self.name} needs --train_data_dir ({self.data_dir_help()}).")
        if not self.needs_data_dir and data_dir:
            raise ValueError(f"--dataset {self.name} takes no --train_data_dir (its images are generated).")
        self.data_dir = data_dir

    @classmethod
    def data_dir_help(cls) -> str:
        """What `--train_data_dir` must hold, for error messages."""
        return "a data folder"

    # ------------------------------------------------------------------------------------- training data

    @abstractmethod
    def train_dataset(self, image_size: int, seed: int) -> Dataset | IterableDataset:
        """
        The dataset the dVAE and the transformer train on.

        Args:
            image_size (`int`): side of the square images to yield.
            seed (`int`): seeds a stream and any caption sampling (a resumed run passes `seed + step`).

        Returns:
            A map-style or infinite iterable dataset of `{"pixel_values": (3, H, W) in [0, 1], "text": str}`.
        """

    def clip_dataset(self, image_size: int, seed: int, num_negatives: int) -> Dataset | IterableDataset:
        """
        The dataset CLIP trains on: `train_dataset` items with a `negatives` list of at most `num_negatives`
        false captions of the same image (hard negatives, as extra columns of the image->text softmax). Default:
        none.
        """
        return self.train_dataset(image_size, seed)

    def caption_is_true(self, text: str, example: dict) -> bool:
        """Whether `text` is true of the image of `example` (an item of `clip_dataset`); default: string equality
        with its caption. CLIP's loss masks true captions of other images instead of counting them as negatives."""
        return text == example["text"]

    @abstractmethod
    def tokenizer_captions(self, seed: int = 0) -> Iterable[str]:
        """Captions the BPE tokenizer is trained on: every word of the world's language should appear."""

    # ------------------------------------------------------------------------------------- evaluation

    def caption_ranking_set(self, n_images: int, n_captions: int, seed: int = 0) -> RankingSet:
        """Held-out images, each with its true caption and `n_captions - 1` false ones (CLIP's validation); only
        worlds that know which captions are false of an image (`has_ranking_set`)."""
        raise NotImplementedError(f"the {self.name} world has no caption-ranking set")

    def held_out_examples(self, n: int, seed: int = 0) -> list[tuple[str, Image.Image, str]]:
        """
        Up to `n` images no model of the world trained on, each with its caption: what the likelihood benchmarks
        (`benchmarks/compression.py`) compress and score and `train_dalle --held_out_images` measures its held-out
        loss on. A fixed draw for `seed`; only worlds with `has_held_out_examples`.

        Returns:
            `list[tuple[str, PIL.Image.Image, str]]`: `(group, image, caption)` triples, `group` as in `RankingSet`.
        """
        raise NotImplementedError(f"the {self.name} world has no held-out examples")

    def describe(self, for_clip: bool = False) -> str:
        """One line for a model card's Data entry (`for_clip`: of a CLIP run, which may see other data)."""
        return f"the {self.name} world (`dalle_hf.data.{self.name}`)"

    def hyperparameters(self, for_clip: bool = False) -> dict:
        """World options a run used, for the model card's hyperparameter table (default: none)."""
        return {}

    def candidate_bank(self, paths: list[str]):
        """CLIP's `--candidate_bank`: generated candidates with a checker's verdicts; only worlds with a checker."""
        raise ValueError(f"--candidate_bank needs a world with an exact checker (shapes); --dataset {self.name} "
                         "has none.")  # fmt: skip

    def evaluate_vae(self, vae, n: int, seed: int) -> dict:
        """World-specific reconstruction metrics for `train_dvae.py`'s final evaluation (default: none)."""
        return {}

    def validation_prompts(self) -> list[str]:
        """A few prompts whose samples a training run saves as it goes."""
        return []

    # ------------------------------------------------------------------------------------- shipped with a model

    def vocabulary(self) -> list[str]:
        """Every word of the world's training captions, lowercased and sorted: what a model trained on it has seen
        (the app names the words of a prompt outside it)."""
        return sorted({word for caption in self.tokenizer_captions(seed=0) for word in caption_words(caption)})

    def metadata(self) -> dict:
        """What a shipped checkpoint carries about its world (`world.json`, `write_world_file`): its name, example
        prompts, vocabulary and, for worlds with styles, the styles and how a prompt names one."""
        return {"world": self.name, "examples": self.validation_prompts(), "words": self.vocabulary()}


WORLD_FILE = "world.json"  # at the root of a pipeline folder, beside model_index.json


def random_square_crop(side: int, index: int, variant: int, min_scale: float, seed: int) -> tuple[int, int, int]:
    """
    A random square crop of a `side x side` image: `(left, top, crop_side)` in pixels, the crop's side a fraction of
    `side` drawn uniformly from `[min_scale, 1]`, its position uniform. It depends on `(seed, index, variant)` only (a
    string-seeded `random.Random`, stable across processes), so a re-encode and a resumed run get the same crops.

    A finite dataset that can be augmented (`train_dalle --image_augmentations`) has an
    `augmented_pixel_values(index, variant, min_scale, seed)` that crops its source image with this box, at the
    source's own resolution, and then resizes as its `__getitem__` does: the crop is drawn here, once for every world;
    only the world knows its source pixels and its resize. No flip: a caption may name a direction.
    """
    rng = random.Random(f"square-crop/{seed}/{index}/{variant}")
    crop_side = min(side, max(1, round(side * rng.uniform(min_scale, 1.0))))
    return rng.randint(0, side - crop_side), rng.randint(0, side - crop_side), crop_side


def caption_words(text: str) -> list[str]:
    """The words of a caption or prompt as `World.vocabulary` counts them: lowercase runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def write_world_file(world: World, folder: str) -> str:
    """Write `world.metadata()` to `folder/world.json`; returns the path."""
    path = os.path.join(folder, WORLD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(world.metadata(), f, indent=1, ensure_ascii=False)
        f.write("\n")
    return path


def read_world_file(folder: str) -> dict | None:
    """The `world.json` of a pipeline folder, or `None` if it has none (a checkpoint made before worlds had one)."""
    path = os.path.join(folder, WORLD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def world_names() -> list[str]:
    """The worlds installed: modules of `dalle_hf.data` that define a `World` subclass with their name."""
    from .. import data

    return sorted(m.name for m in pkgutil.iter_modules(data.__path__) if _world_class(m.name) is not None)


def _world_class(name: str) -> type[World] | None:
    if not name.isidentifier() or name == "world":
        return None
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as error:
        if error.name == f"{__package__}.{name}":
            return None
        raise
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, World) and value is not World and value.name == name:
            return value
    return None


def load_world(name: str, data_dir: str | None = None, **options) -> World:
    """
    The world called `name` (`--dataset`), reading its data from `data_dir` (`--train_data_dir`) if it has any.

    Args:
        name (`str`): a world's name (`world_names()`).
        data_dir (`str`, *optional*): its data folder, for worlds that need one.
        options: world-specific options that were given (e.g. the shapes world's `task_weights`).

    Raises:
        `ValueError`: no module `dalle_hf.data.<name>` defines a `World` called `name`; `data_dir` is missing or
            given where the world takes none; an option the world does not take.
    """
    cls = _world_class(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"--dataset must name a world, one of {world_names()}, got {name!r}.")
    try:
        return cls(data_dir, **options)
    except TypeError:
        if options:
            raise ValueError(f"--dataset {name} takes none of the options {sorted(options)}.") from None
        raise


def sample_false_captions(rng: random.Random, pool: list[str], true: set[str], n: int) -> list[str]:
    """`n` distinct captions of `pool` that are not in `true`, drawn without replacement (all if fewer)."""
    out: list[str] = []
    seen = set(true)
    for caption in rng.sample(pool, min(len(pool), n + len(true))):
        if caption not in seen:
            seen.add(caption)
            out.append(caption)
        if len(out) == n:
            break
    return out


__all__ = [
    "IMAGE_SIZE",
    "WORLD_FILE",
    "RankingSet",
    "World",
    "caption_words",
    "load_world",
    "read_world_file",
    "sample_false_captions",
    "world_names",
    "write_world_file",
]
