import json

import pytest
import torch
from PIL import Image

from dalle_hf.data.imagefolder import ImageFolderCaptions
from tests.conftest import write_folder


def test_items_and_modes(tmp_path):
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # fully transparent -> white background
    rgba.paste((0, 0, 255, 255), (10, 0, 30, 20))  # opaque blue in the centre square
    images = {
        "rgb.png": Image.new("RGB", (32, 32), (10, 200, 30)),
        "rgba.png": rgba,
        "gray.png": Image.new("L", (16, 24), 128),
        "cmyk.jpg": Image.new("CMYK", (20, 20), (0, 255, 255, 0)),  # red in CMYK
        "palette.png": Image.new("RGB", (8, 8), (0, 0, 255)).convert("P"),
    }
    write_folder(tmp_path, images)
    dataset = ImageFolderCaptions(str(tmp_path), image_size=16)
    assert len(dataset) == 5
    items = {name: dataset[i] for i, name in enumerate(images)}
    for name, item in items.items():
        x = item["pixel_values"]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32, name
        assert 0 <= x.min() and x.max() <= 1
        assert item["text"] == f"caption of {name}"
    assert torch.allclose(items["rgb.png"]["pixel_values"][:, 0, 0], torch.tensor([10, 200, 30]) / 255)
    # RGBA: center crop keeps the opaque blue square only
    assert torch.allclose(items["rgba.png"]["pixel_values"][:, 8, 8], torch.tensor([0.0, 0.0, 1.0]), atol=0.02)
    gray = items["gray.png"]["pixel_values"]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[0], torch.full((16, 16), 128 / 255), atol=0.01)
    assert items["cmyk.jpg"]["pixel_values"][0].mean() > 0.9 and items["cmyk.jpg"]["pixel_values"][1].mean() < 0.1


def test_transparent_corner_is_white(tmp_path):
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    write_folder(tmp_path, {"a.png": image})
    assert torch.equal(ImageFolderCaptions(str(tmp_path), image_size=16)[0]["pixel_values"], torch.ones(3, 16, 16))


def test_subfolders(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "x.png")
    with open(tmp_path / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "sub/x.png", "text": "t"}) + "\n\n")
    assert ImageFolderCaptions(str(tmp_path), image_size=8)[0]["text"] == "t"


@pytest.mark.parametrize(
    "lines, message",
    [
        (["not json"], "valid JSON"),
        ([json.dumps({"text": "t"})], "file_name"),
        ([json.dumps({"file_name": "a.png"})], "text"),
        ([json.dumps({"file_name": "missing.png", "text": "t"})], "not found"),
        ([], "no images"),
    ],
)
def test_malformed_metadata(tmp_path, lines, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        ImageFolderCaptions(str(tmp_path))


def test_missing_folder_or_metadata(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderCaptions(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="metadata.jsonl"):
        ImageFolderCaptions(str(tmp_path))
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderCaptions(str(tmp_path), image_size=0)


def test_unreadable_image(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not an image")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "t"}))
    with pytest.raises(ValueError, match="Could not read"):
        ImageFolderCaptions(str(tmp_path))[0]
