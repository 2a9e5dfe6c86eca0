"""Image variations with DALL-E: keep the top rows of an image's dVAE codes and sample the rest.

Paper §3.3 / Fig. 14 ("image-to-image translation"): the model is primed with part of an image's tokens and
completes it; DALLE-pytorch primes with 14 of 32 rows ("OpenAI used 14 * 32"). Candidates are ranked by CLIP
image-image similarity to the input. This is inpainting ([`DalleInpaintPipeline`]) with a mask over the bottom rows
of code cells, sampled by the same step; unlike inpainting, the decoded images are returned as they are (no pixels
pasted back) and ranked by similarity to the input rather than to a prompt.
"""

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch

from .image_processing import image_to_tensor
from .pipeline_dalle import DallePipelineOutput
from .pipeline_dalle_inpaint import DalleInpaintPipeline


class DalleImageVariationPipeline(DalleInpaintPipeline):
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
        return self.prepare_image(image)

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
        codes = self.encode_image_codes(pixel_values)  # (1, g * g)
        g = self.transformer.config.image_grid_size
        cells = torch.arange(g)[:, None].expand(g, g) >= num_rows_to_keep  # (g, g): a mask over the bottom rows

        # 3. Sample the masked rows with the KV cache (the kept rows are the prefill)
        tokens = self.sample_masked_tokens(
            input_ids, codes, cells, temperature, top_k, top_p, guidance_scale, generator, callback_on_step_end,
            negative_ids,
        )  # (N, g * g)

        # 4. Decode with the dVAE
        images = self.decode_image_tokens(tokens)

        # 5. Rank by CLIP image-image similarity to the input and keep the best
        scores_fn = self.clip_image_scorer(pixel_values)
        images, tokens, scores = self.rank_and_keep(images, tokens, scores_fn, 1, num_images_per_prompt, keep)

        # 6. Postprocess
        tokens = tokens.view(-1, g, g).cpu()
        images = self.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, scores, tokens)
        return DallePipelineOutput(images=images, clip_scores=scores, image_tokens=tokens)


__all__ = ["DalleImageVariationPipeline", "image_to_tensor"]
