"""Image and mask conversions shared by the pipelines that take an image (variations, inpainting).

`image_to_tensor` turns any user image into the dVAE's float (1, 3, S, S) input; `mask_to_tensor` does the same for
an inpainting mask (white = repaint, diffusers' convention), `cell_mask` finds the dVAE code cells a pixel mask
touches, and `paste_outside_mask` puts the input's pixels back outside the mask with a soft edge inside it.
"""

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


def image_to_tensor(image, image_size: int) -> torch.Tensor:
    """A PIL image, `np.ndarray` (H, W, C) uint8 or float in [0, 1], or `torch.Tensor` (C, H, W) / (1, C, H, W) in
    [0, 1] -> float32 (1, 3, image_size, image_size).

    Conversions are explicit: RGBA is composited on white, grayscale / palette / CMYK become RGB, a non-square image
    is center-cropped to a square and resized (bicubic, antialiased) to `image_size`.
    """
    if isinstance(image, PIL.Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(background, rgba)
        image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        if array.shape[-1] == 4:  # composite on white
            array = array[..., :3] * array[..., 3:] + (1 - array[..., 3:])
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensors must be (3, H, W), (1, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        image = image.float().expand(3, -1, -1) if image.shape[0] == 1 else image.float()
    else:
        raise ValueError(f"image must be a PIL.Image, np.ndarray or torch.Tensor, got {type(image).__name__}")
    if image.min() < 0 or image.max() > 1:
        raise ValueError("image values must be in [0, 1] (or uint8 for arrays)")
    _, H, W = image.shape
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    image = image[:, top : top + side, left : left + side][None]  # (1, 3, side, side)
    if side != image_size:
        image = F.interpolate(image, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
    return image.clamp(0, 1)


def image_hw(image) -> tuple[int, int]:
    """(height, width) of an image as `image_to_tensor` accepts it (PIL, (H, W[, C]) array, ([1,] C, H, W) tensor)."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return tuple(image.shape[:2])
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    raise ValueError(f"image must be a PIL.Image, np.ndarray or torch.Tensor, got {type(image).__name__}")


def mask_to_tensor(mask, image_hw_: tuple[int, int], image_size: int) -> torch.BoolTensor:
    """An inpainting mask -> bool (image_size, image_size), True where the image is repainted.

    White (or True, or values above 0.5 of the format's range) means "repaint", as in diffusers. `mask` is a PIL image
    (any mode; converted to grayscale, transparency ignored), an `np.ndarray` (H, W) or (H, W, 1) of bool, uint8 or
    float in [0, 1], or a `torch.Tensor` (H, W), (1, H, W) or (1, 1, H, W) in [0, 1]. It must have the input image's
    height and width; it is then center-cropped and resized as the image is, and binarized at 0.5.
    """
    if isinstance(mask, PIL.Image.Image):
        array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    elif isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise ValueError(f"mask_image arrays must be (H, W) or (H, W, 1), got {mask.shape}")
        array = mask.astype(np.float32) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float32)
    elif isinstance(mask, torch.Tensor):
        while mask.dim() > 2 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.dim() != 2:
            raise ValueError(f"mask_image tensors must be (H, W), (1, H, W) or (1, 1, H, W), got {tuple(mask.shape)}")
        array = mask.float().cpu().numpy()
    else:
        raise ValueError(f"mask_image must be a PIL.Image, np.ndarray or torch.Tensor, got {type(mask).__name__}")
    if tuple(array.shape) != tuple(image_hw_):
        raise ValueError(f"mask_image must be the image's size (H, W) = {tuple(image_hw_)}, got {tuple(array.shape)}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError("mask_image values must be in [0, 1] (or uint8 for arrays)")
    resized = image_to_tensor(torch.from_numpy(np.ascontiguousarray(array))[None], image_size)  # (1, 3, S, S)
    return resized[0, 0] > 0.5  # (S, S)


def cell_mask(pixel_mask: torch.BoolTensor, grid_size: int, dilation: int = 0) -> torch.BoolTensor:
    """(S, S) pixel mask -> (grid_size, grid_size) code cells whose patch touches it, dilated by `dilation` cells
    (3x3 neighbourhoods, so diagonal neighbours count)."""
    S = pixel_mask.shape[-1]
    cells = F.max_pool2d(pixel_mask.float()[None, None], S // grid_size)  # (1, 1, g, g): any pixel of the patch
    for _ in range(dilation):
        cells = F.max_pool2d(cells, 3, stride=1, padding=1)  # (1, 1, g, g)
    return cells[0, 0] > 0


def soft_alpha(pixel_mask: torch.BoolTensor, feather: int) -> torch.Tensor:
    """(S, S) float weight of the generated pixels: 0 outside the mask, rising inside it over `feather` px from its
    edge to 1 (the mean of the mask eroded 0, 1, ..., feather - 1 times), so the edge is soft and the outside exact."""
    eroded = pixel_mask.float()[None, None]  # (1, 1, S, S)
    total = torch.zeros_like(eroded)
    for _ in range(max(feather, 1)):
        total += eroded
        # erosion: a pixel stays only if its 3x3 neighbourhood (the image border counts as masked) is all masked
        eroded = -F.max_pool2d(-eroded, 3, stride=1, padding=1)
    return (total / max(feather, 1))[0, 0]  # (S, S)


def paste_outside_mask(generated: torch.Tensor, original: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) generated, (1, 3, S, S) original, (S, S) alpha -> the blend `alpha * generated + (1 - alpha) *
    original`, with the original's exact values wherever alpha is 0."""
    alpha = alpha.to(generated)
    blended = alpha * generated + (1 - alpha) * original.to(generated)  # (B, 3, S, S)
    return torch.where(alpha > 0, blended, original.to(generated))


__all__ = ["cell_mask", "image_hw", "image_to_tensor", "mask_to_tensor", "paste_outside_mask", "soft_alpha"]
