"""Inpainting with DALL-E: repaint any masked region of an image, keep every pixel outside it.

The image is encoded to dVAE codes; a code cell is resampled when its patch touches the mask, the others keep
their code. Sampling runs in raster order (paper §2.2): a kept cell is fed its own code, a masked cell is drawn with
the text-to-image settings. A raster-order model cannot see the kept cells *after* a masked one while it samples,
so the candidates are ranked afterwards: by CLIP by default, which picked the best edits when measured; the
transformer's likelihood of the whole code grid (the kept cells after the mask count there), alone or with CLIP, is
one argument away (`rerank`). The decoded candidates get the input's pixels pasted back outside the
mask with a soft edge inside it, so nothing outside the mask changes.

DALLE-pytorch and ru-dalle complete an image from its top rows or borders only; image variations
([`DalleImageVariationPipeline`]) are this pipeline's special case of a mask over the bottom rows.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from .image_processing import cell_mask, image_hw, image_to_tensor, mask_to_tensor, paste_outside_mask, soft_alpha
from .pipeline_dalle import DallePipeline, DallePipelineOutput


@dataclass
class DalleInpaintPipelineOutput(DallePipelineOutput):
    """Output of [`DalleInpaintPipeline`]: [`DallePipelineOutput`]'s fields, and which cells were resampled.

    Args:
        images, clip_scores, image_tokens, likelihood_scores, ranked_by:
            As in [`DallePipelineOutput`]: the kept images best first, CLIP similarity to the prompt, the codes,
            `log p(codes | prompt)` of the whole grid in nats, and the ranking used (`"both"`, `"likelihood"` or
            `"clip"`).
        cell_mask (`torch.BoolTensor` of shape `(grid, grid)`):
            The code cells that were sampled (True); the others kept the input's codes.
    """

    cell_mask: torch.BoolTensor | None = None


class DalleInpaintPipeline(DallePipeline):
    r"""
    Inpainting: repaint the masked region of an image to match a prompt. Shares its components with
    [`DallePipeline`]: `DalleInpaintPipeline(**pipe.components)`; the checkpoint's `default_guidance_scale` is a
    setting, not a component, so pass it too (or load with `DalleInpaintPipeline.from_pretrained(path)`).

    Ranking (`rerank`): `"clip"`, the default with a CLIP model, orders the pasted images by CLIP's similarity to
    the prompt. `"likelihood"` scores each candidate's whole code grid with the transformer,
    `log p(codes | prompt)` ([`DallePipeline.score`]), so the kept cells after the mask, which sampling could not
    see, count; it is the default without CLIP. `"both"` adds the two after standardizing each over the N
    candidates (z-scores). On 240 shapes edits x 3 sets, CLIP alone picked the best edits (best-of-16 0.550 against
    0.500 for `"both"` and 0.312 for the likelihood on the test set; docs/inpainting.md). All three are
    [`DallePipeline`]'s rerankers (`rerank_and_keep`), applied to the pasted images and the whole grids.

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from dalle_hf import DallePipeline, DalleInpaintPipeline
    >>> pipe = DallePipeline.from_pretrained("checkpoints/dalle-shapes")
    >>> inpaint = DalleInpaintPipeline(**pipe.components, default_guidance_scale=pipe.config.default_guidance_scale)
    >>> image = pipe("a red circle left of a blue square").images[0]
    >>> mask = np.zeros((64, 64), dtype=bool); mask[:, 32:] = True  # repaint the right half
    >>> out = inpaint("a red circle left of a green triangle", image=image, mask_image=mask,
    ...               num_images_per_prompt=16, num_images_to_keep=4, generator=torch.Generator().manual_seed(0))
    >>> out.ranked_by, out.images[0].size
    ('clip', (64, 64))
    ```
    """

    # ----------------------------------------------------------------------------------------------------------
    # Steps shared with DalleImageVariationPipeline
    # ----------------------------------------------------------------------------------------------------------
    def prepare_image(self, image) -> torch.Tensor:
        """Any image -> float (1, 3, S, S) in [0, 1] on the execution device (`image_to_tensor`)."""
        return image_to_tensor(image, self.image_size).to(self._execution_device)

    @torch.no_grad()
    def encode_image_codes(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """(1, 3, S, S) pixels -> (1, grid * grid) dVAE codes in raster order."""
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.get_codebook_indices(pixel_values.to(vae_dtype)).flatten(1)  # (1, g * g)

    @torch.no_grad()
    def sample_masked_tokens(
        self,
        input_ids: torch.LongTensor,
        codes: torch.LongTensor,
        cells: torch.BoolTensor,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        guidance_scale: float,
        generator: torch.Generator | None,
        callback_on_step_end: Callable | None,
        negative_ids: torch.LongTensor | None,
    ) -> torch.LongTensor:
        """Sample the `cells` (grid, grid) True of `len(input_ids)` candidates, each kept cell fed its code from
        `codes` (1, grid * grid). Returns (B, grid * grid)."""
        B = input_ids.shape[0]
        return self.sample_image_tokens(
            input_ids, None, temperature, top_k, top_p, guidance_scale, generator, callback_on_step_end,
            negative_ids, known_ids=codes.repeat(B, 1), known_mask=~cells.flatten().to(codes.device),
        )  # (B, g * g)

    # ----------------------------------------------------------------------------------------------------------
    def check_inpaint_inputs(self, prompt, image, mask_image, mask_dilation, soft_edge_px):
        """Validate; returns `(pixel_values (1, 3, S, S), pixel_mask (S, S) bool, cells (grid, grid) bool)`."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str (one image is edited per call), got {type(prompt).__name__}")
        if isinstance(mask_dilation, bool) or not isinstance(mask_dilation, int) or mask_dilation < 0:
            raise ValueError(f"mask_dilation must be an int >= 0 (code cells), got {mask_dilation!r}")
        if isinstance(soft_edge_px, bool) or not isinstance(soft_edge_px, int) or soft_edge_px < 1:
            raise ValueError(f"soft_edge_px must be an int >= 1 (1 is a hard edge), got {soft_edge_px!r}")
        if mask_image is None:
            raise ValueError("mask_image is required: white (True, > 0.5) where the image is repainted")
        pixel_values = self.prepare_image(image)  # (1, 3, S, S)
        pixel_mask = mask_to_tensor(mask_image, image_hw(image), self.image_size)  # (S, S)
        if not pixel_mask.any():
            raise ValueError("mask_image is empty: mark the region to repaint (white, True or > 0.5)")
        g = self.transformer.config.image_grid_size
        cells = cell_mask(pixel_mask, g, mask_dilation)  # (g, g)
        if cells.all():
            raise ValueError(f"mask_image touches all {g} x {g} code cells, so nothing of the image would be kept; "
                             "use DallePipeline for a new image")
        return pixel_values, pixel_mask.to(self._execution_device), cells

    def resolve_rerank(self, rerank: str | None) -> str:
        """`None` -> `"clip"` with a CLIP model, `"likelihood"` without; otherwise checked as in `DallePipeline`."""
        if rerank is None:
            return "likelihood" if self.clip_model is None or self.clip_processor is None else "clip"
        self.check_rerank(rerank)
        return rerank

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        image: PIL.Image.Image | np.ndarray | torch.Tensor,
        mask_image: PIL.Image.Image | np.ndarray | torch.Tensor,
        num_images_per_prompt: int = 1,
        num_images_to_keep: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        rerank: str | None = None,
        mask_dilation: int = 0,
        soft_edge_px: int = 2,
    ):
        r"""
        Repaint the masked region of `image` to match `prompt`, keeping the best `num_images_to_keep` of
        `num_images_per_prompt` candidates.

        Args:
            prompt (`str`):
                The caption of the whole edited image (e.g. "a red circle left of a green triangle"); `""` samples
                the masked cells unconditionally.
            image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`):
                The image to edit, converted as in [`DalleImageVariationPipeline`] (RGBA on white, center-cropped to
                a square, resized to the dVAE's `image_size`). The outputs have that size, and outside the mask they
                equal the converted input exactly.
            mask_image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`):
                Where to repaint: white (True, or > 0.5 in [0, 1]), as in diffusers. The same height and width as
                `image`; a PIL mask is read as grayscale. It must mark something and leave some code cell unmarked.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Candidates N, at most `MAX_IMAGES_PER_PROMPT` (256).
            num_images_to_keep (`int`, *optional*, defaults to `num_images_per_prompt`):
                How many to return, best first.
            temperature, top_k, top_p, guidance_scale, negative_prompt, generator, output_type, callback_on_step_end:
                As in [`DallePipeline.__call__`]; `guidance_scale=None` uses the checkpoint's
                `default_guidance_scale`. `callback_on_step_end` is called for each position from the first masked
                cell to the last.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`DalleInpaintPipelineOutput`] instead of a tuple `(images, clip_scores, image_tokens)`.
            rerank (`str`, *optional*, defaults to `None`):
                `"clip"`, `"likelihood"` (of the whole code grid) or `"both"` (the two standardized and added);
                `None` is `"clip"` with a CLIP model (it picked the best edits: docs/inpainting.md) and
                `"likelihood"` without.
            mask_dilation (`int`, *optional*, defaults to 0):
                Also resample the code cells this many cells around the mask (room for the model to blend the
                seam; the pixels there are still pasted back from the input).
            soft_edge_px (`int`, *optional*, defaults to 2):
                Width in pixels of the blend inside the mask's edge (1: a hard edge). Pixels outside the mask are
                never blended.

        Returns:
            [`DalleInpaintPipelineOutput`] or `tuple` `(images, clip_scores, image_tokens)`.
        """
        # 1. Check inputs, convert the image and the mask, find the code cells to resample
        pixel_values, pixel_mask, cells = self.check_inpaint_inputs(
            prompt, image, mask_image, mask_dilation, soft_edge_px
        )  # (1, 3, S, S), (S, S), (g, g)
        rerank = self.resolve_rerank(rerank)
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        keep = self.check_sampling_inputs(
            num_images_per_prompt, num_images_to_keep, temperature, top_k, top_p, guidance_scale, output_type, generator
        )
        negative_prompts = self.check_negative_prompt(negative_prompt, 1)

        # 2. Encode the prompt (and negative prompt), one row per candidate, and the image's codes
        N = num_images_per_prompt
        input_ids = self.encode_prompt([prompt]).repeat(N, 1)  # (N, L)
        negative_ids = None if negative_prompts is None else self.encode_prompt(negative_prompts).repeat(N, 1)
        codes = self.encode_image_codes(pixel_values)  # (1, g * g)

        # 3. Sample the masked cells in raster order; kept cells are fed their own codes
        tokens = self.sample_masked_tokens(
            input_ids, codes, cells, temperature, top_k, top_p, guidance_scale, generator, callback_on_step_end,
            negative_ids,
        )  # (N, g * g)

        # 4. Decode with the dVAE and paste the input back outside the mask
        images = self.decode_image_tokens(tokens)  # (N, 3, S, S)
        images = paste_outside_mask(images, pixel_values, soft_alpha(pixel_mask, soft_edge_px))  # (N, 3, S, S)

        # 5. Rank by the whole grid's likelihood and/or CLIP, and keep the best
        images, tokens, scores, likelihood_scores, ranked_by = self.rerank_and_keep(
            rerank, [prompt], input_ids, images, tokens, N, keep
        )

        # 6. Postprocess
        g = self.transformer.config.image_grid_size
        tokens = tokens.view(-1, g, g).cpu()
        images = self.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, scores, tokens)
        return DalleInpaintPipelineOutput(
            images=images, clip_scores=scores, image_tokens=tokens, likelihood_scores=likelihood_scores,
            ranked_by=ranked_by, cell_mask=cells.cpu(),
        )


__all__ = ["DalleInpaintPipeline", "DalleInpaintPipelineOutput"]
