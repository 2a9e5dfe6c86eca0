"""Captioned images in the Hugging Face `imagefolder` layout.

```
root/
  metadata.jsonl      one JSON object per line: {"file_name": "0001.png", "text": "a red circle"}
  0001.png
  ...
```
`file_name` is relative to `root` (sub-folders allowed), as in `datasets.load_dataset("imagefolder", ...)`.
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .world import World, random_square_crop


def load_rgb(path: str) -> Image.Image:
    """Open an image and convert it to RGB explicitly: RGBA/LA/P are composited on white, CMYK/L/I go through PIL."""
    image = Image.open(path)
    image.load()
    if image.mode == "P":
        image = image.convert("RGBA")  # palettes may carry transparency
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I", "I;16", "F"):
        # 16-bit / float grayscale: rescale to 8 bits before converting (PIL's convert would clip).
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.max() > 0 else 1.0
        image = Image.fromarray((array / high * 255).round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, image_size: int, crop=None) -> Image.Image:
    """Center-crop to the largest square and resize to `image_size x image_size` (bicubic); `crop(side)` ->
    `(left, top, crop_side)`, if given, crops that square further first (`random_square_crop`)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    if crop is not None:
        dx, dy, side = crop(side)
        left, top = left + dx, top + dy
    image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> `FloatTensor (3, H, W)` in `[0, 1]`."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0  # (H, W, 3) -> (3, H, W)


class ImageFolderCaptions(Dataset):
    r"""
    A map-style dataset of captioned images in the Hugging Face `imagefolder` layout.

    Args:
        root (`str`):
            Folder holding the images and `metadata.jsonl` (`file_name` and `text` on each line).
        image_size (`int`, *optional*, defaults to 64):
            Images are converted to RGB, center-cropped to a square and resized to this side.

    Example:

    ```python
    >>> from dalle_hf.data.imagefolder import ImageFolderCaptions
    >>> dataset = ImageFolderCaptions("my_images", image_size=64)  # doctest: +SKIP
    >>> dataset[0]["pixel_values"].shape, dataset[0]["text"]  # doctest: +SKIP
    (torch.Size([3, 64, 64]), 'a red circle')
    ```
    """

    def __init__(self, root: str, image_size: int = 64):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"`image_size` must be a positive integer, got {image_size!r}.")
        if not os.path.isdir(root):
            raise ValueError(f"Image folder {root!r} does not exist or is not a directory.")
        metadata_path = os.path.join(root, "metadata.jsonl")
        if not os.path.isfile(metadata_path):
            raise ValueError(
                f"{metadata_path!r} not found: an imagefolder needs a metadata.jsonl with one "
                '{"file_name": ..., "text": ...} object per line.'
            )
        self.root = root
        self.image_size = image_size
        self.records = self._read_metadata(metadata_path)

    def _read_metadata(self, metadata_path: str) -> list[tuple[str, str]]:
        records = []
        with open(metadata_path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{metadata_path}:{line_number} is not valid JSON: {error}") from None
                if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                    raise ValueError(f"{metadata_path}:{line_number} must be an object with a string 'file_name'.")
                if not isinstance(row.get("text"), str):
                    raise ValueError(f"{metadata_path}:{line_number} must have a string 'text' (the caption).")
                path = os.path.join(self.root, row["file_name"])
                if not os.path.isfile(path):
                    raise ValueError(
                        f"{metadata_path}:{line_number}: image {row['file_name']!r} not found in {self.root!r}."
                    )
                records.append((path, row["text"]))
        if not records:
            raise ValueError(f"{metadata_path} lists no images.")
        return records

    def __len__(self) -> int:
        return len(self.records)

    def text(self, index: int) -> str:
        """The caption of item `index` (without reading the image)."""
        return self.records[index][1]

    def _read(self, index: int) -> Image.Image:
        path = self.records[index][0]
        try:
            return load_rgb(path)
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"Could not read image {path!r}: {error}") from None

    def augmented_pixel_values(self, index: int, variant: int, min_scale: float, seed: int) -> torch.Tensor:
        """Item `index`'s centre square cropped by `random_square_crop` at the file's resolution, then resized as
        `__getitem__` resizes."""
        crop = lambda side: random_square_crop(side, index, variant, min_scale, seed)  # noqa: E731
        return pil_to_tensor(center_crop_resize(self._read(index), self.image_size, crop))

    def __getitem__(self, index: int) -> dict:
        image = center_crop_resize(self._read(index), self.image_size)
        return {"pixel_values": pil_to_tensor(image), "text": self.records[index][1]}  # (3, H, W) in [0, 1]


class ImageFolderWorld(World):
    """
    Any folder of captioned images behind the `World` interface (`--dataset imagefolder --train_data_dir DIR`).

    The captions are whatever `metadata.jsonl` says, so the world knows no hard negatives, counts a caption true of
    an image only if it is that image's own, and has no caption-ranking set (another image's caption may well be
    true of this one).
    """

    name = "imagefolder"
    needs_data_dir = True
    has_ranking_set = False

    @classmethod
    def data_dir_help(cls) -> str:
        return "a folder with images and metadata.jsonl"

    def __init__(self, data_dir: str | None = None):
        super().__init__(data_dir)
        self.captions = ImageFolderCaptions(data_dir, image_size=8).records  # validates the folder once

    def describe(self, for_clip: bool = False) -> str:
        return f"an imagefolder at `{self.data_dir}` (images + metadata.jsonl)"

    def train_dataset(self, image_size: int, seed: int) -> ImageFolderCaptions:
        return ImageFolderCaptions(self.data_dir, image_size=image_size)

    def tokenizer_captions(self, seed: int = 0) -> list[str]:
        return [text for _, text in self.captions]


__all__ = ["ImageFolderCaptions", "ImageFolderWorld"]
