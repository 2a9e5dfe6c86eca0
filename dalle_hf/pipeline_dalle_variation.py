"""Image variations with DALL-E: keep the top rows of an image's dVAE codes and sample the rest.

Paper §3.3 / Fig. 14 ("image-to-image translation"): the model is primed with part of an image's tokens and
completes it; DALLE-pytorch primes with 14 of 32 rows ("OpenAI used 14 * 32"). Candidates are ranked by CLIP
image-image similarity to the input.
"""

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .pipeline_dalle import DallePipeline, DallePipelineOutput


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


class DalleImageVariationPipeline(DallePipeline):
    r"""
    Variations of an image: keep its first `num_rows_to_keep` rows of dVAE codes, sample the rest (optionally
    conditioned on a prompt), rank by CLIP image-image similarity to the input. Shares its components with
    [`DallePipeline`]: `DalleImageVariationPipeline(**pipe.components)`.

    Example:

    ```python
    >>> import torch
    >>> from dalle_hf import DallePipeline, DalleImageVariationPipeline
    >>> pipe = DallePipeline.from_pretrained("checkpoints/dalle-shapes")
    >>> variations = DalleImageVariationPipeline(**pipe.components)
    >>> out = variations(pipe("a red circle").images[0], num_rows_to_keep=6, num_images_per_prompt=8,
    ...                  num_images_to_keep=4, generator=torch.Generator().manual_seed(0))
    ```
    """

    def check_image_inputs(self, image, prompt, num_rows_to_keep):
        grid = self.transformer.config.image_grid_size
        if not isinstance(num_rows_to_keep, int) or not 0 <= num_rows_to_keep < grid:
            raise ValueError(f"num_rows_to_keep must be an int in [0, {grid - 1}], got {num_rows_to_keep!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str or None, got {type(prompt).__name__}")
        return image_to_tensor(image, self.vae.config.image_size).to(self._execution_device)

    def clip_image_scorer(self, reference: torch.Tensor):
        if self.clip_model is None or self.clip_processor is None:
            return None
        from .clip import clip_image_image_scores

        # one reference (1, 3, H, W) for all candidates: its embedding is computed once
        return lambda images: clip_image_image_scores(self.clip_model, self.clip_processor, images, reference)

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | np.ndarray | torch.Tensor,
        prompt: str | None = None,
        num_rows_to_keep: int = 4,
        num_images_per_prompt: int = 4,
        num_images_to_keep: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
    ):
        r"""
        Args:
            image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`):
                The input. Converted explicitly: RGBA on white, grayscale/CMYK to RGB, center-cropped to a square and
                resized to the dVAE's `image_size`. Tensors are (3, H, W) or (1, 3, H, W) floats in [0, 1].
            prompt (`str`, *optional*, defaults to `None`):
                Optional caption conditioning the completion; `None` or `""` leaves the text all padding.
            num_rows_to_keep (`int`, *optional*, defaults to 4):
                Rows of image tokens kept from the input (0 to `image_grid_size - 1`); the rest are sampled.
            num_images_per_prompt (`int`, *optional*, defaults to 4):
                Candidates sampled, at most 256.
            num_images_to_keep (`int`, *optional*, defaults to `num_images_per_prompt`):
                How many to return, ranked by CLIP image similarity to the input when CLIP is loaded.
            temperature, top_k, top_p, guidance_scale, negative_prompt, generator, output_type, return_dict,
            callback_on_step_end:
                As in [`DallePipeline.__call__`] (one negative prompt; it needs `guidance_scale > 1`).

        Returns:
            [`DallePipelineOutput`] or `tuple`.
        """
        # 1. Check inputs and convert the image
        pixel_values = self.check_image_inputs(image, prompt, num_rows_to_keep)  # (1, 3, H, W)
        keep = self.check_sampling_inputs(
            num_images_per_prompt, num_images_to_keep, temperature, top_k, top_p, guidance_scale, output_type, generator
        )
        negative_prompts = self.check_negative_prompt(negative_prompt, 1)

        # 2. Encode the prompt (and negative prompt) and the image's kept rows
        input_ids = self.encode_prompt([prompt or ""]).repeat(num_images_per_prompt, 1)  # (N, L)
        negative_ids = None
        if negative_prompts is not None:
            negative_ids = self.encode_prompt(negative_prompts).repeat(num_images_per_prompt, 1)  # (N, L)
        vae_dtype = next(self.vae.parameters()).dtype
        codes = self.vae.get_codebook_indices(pixel_values.to(vae_dtype))  # (1, g, g)
        n_prefix = num_rows_to_keep * self.transformer.config.image_grid_size
        prefix_ids = codes.flatten(1)[:, :n_prefix].repeat(num_images_per_prompt, 1)  # (N, rows * g)

        # 3. Sample the remaining tokens with the KV cache
        tokens = self.sample_image_tokens(
            input_ids, prefix_ids, temperature, top_k, top_p, guidance_scale, generator, callback_on_step_end,
            negative_ids,
        )

        # 4. Decode with the dVAE
        images = self.decode_image_tokens(tokens)

        # 5. Rank by CLIP image-image similarity to the input and keep the best
        scores_fn = self.clip_image_scorer(pixel_values)
        images, tokens, scores = self.rank_and_keep(images, tokens, scores_fn, 1, num_images_per_prompt, keep)

        # 6. Postprocess
        g = self.transformer.config.image_grid_size
        tokens = tokens.view(-1, g, g).cpu()
        images = self.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, scores, tokens)
        return DallePipelineOutput(images=images, clip_scores=scores, image_tokens=tokens)


__all__ = ["DalleImageVariationPipeline", "image_to_tensor"]
