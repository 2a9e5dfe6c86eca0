"""Text-to-image with DALL·E mini / Mega: the same sampling, guidance, filtering and CLIP ranking as [`DallePipeline`],
over a BART encoder-decoder and the VQGAN f16 16384 (diffusers' `VQModel`).

The pipelines call a model family through a small interface, so one sampling core serves both families:

- the transformer (a text-conditioned next-code model): `forward(input_ids=, image_ids=, cache=, use_cache=,
  logits_to_keep=)` returning `.logits`, `.cache`, `.last_hidden_state`; `decode_step(ids, cache)`,
  `decode_step_hidden_state`, `image_logits`, `image_log_probs`; `config.text_seq_len`, `config.image_grid_size`;
- the pipeline methods that know the family's text and image tokenizers: `encode_prompt`, `prompt_token_count`,
  `unconditional_ids`, `decode_image_tokens`, `encode_images`, `prepare_image`,
  `encode_image_codes`, `image_size`, `codebook_size`.

[`DalleMiniFamily`] holds the DALL·E mini side of the second list; mixed into [`DallePipeline`] it gives
[`DalleMiniPipeline`], into [`DalleInpaintPipeline`] and [`DalleImageVariationPipeline`] it gives
[`DalleMiniInpaintPipeline`] and [`DalleMiniImageVariationPipeline`]: their `__call__`s are written once.
"""

import os

import torch
from diffusers.utils import logging

# diffusers copies the relative imports a published pipeline file names itself, not theirs in turn: the CLIP scorers,
# which the base pipelines import when they rank, and the base's `remote_code` are named here so that
# `trust_remote_code` loading finds them.
from .clip import clip_image_image_scores, clip_text_image_scores  # noqa: F401
from .image_processing import image_to_tensor
from .pipeline_dalle import DallePipeline
from .pipeline_dalle_inpaint import DalleInpaintPipeline
from .pipeline_dalle_variation import DalleImageVariationPipeline
from .remote_code import model_index_without_code  # noqa: F401
from .text_normalizer import DalleMiniTextNormalizer

logger = logging.get_logger(__name__)


class DalleMiniFamily:
    """The DALL·E mini text and image tokenizers behind the interface the dalle-hf pipelines sample and score with.

    Text: dalle-mini's normalizer, then BART's byte-level BPE, padded with `<pad>` (1) to 64 tokens; the
    unconditional prompt of super-conditioning is the empty prompt, `[<s>, </s>]` then padding (dalle-mini,
    min-dalle), not all padding as for the DALL-E transformer. Images: VQGAN codes, decoded with the `VQModel`'s
    codebook and decoder and clipped to [0, 1] (as dalle-mini and min-dalle do; no `(x + 1) / 2`).
    """

    def __init__(
        self,
        tokenizer,
        transformer,
        vae,
        clip_model=None,
        clip_processor=None,
        default_guidance_scale=10.0,
        vae_has_encoder=True,
    ):
        super().__init__(
            tokenizer=tokenizer, transformer=transformer, vae=vae, clip_model=clip_model,
            clip_processor=clip_processor, default_guidance_scale=default_guidance_scale,
        )  # fmt: skip
        if not isinstance(vae_has_encoder, bool):
            raise ValueError(f"vae_has_encoder must be a bool, got {vae_has_encoder!r}")
        self.register_to_config(vae_has_encoder=vae_has_encoder)

    @property
    def text_normalizer(self) -> DalleMiniTextNormalizer:
        """dalle-mini's normalizer, read from the tokenizer's folder (its word-frequency file) on first use."""
        if getattr(self, "_text_normalizer", None) is None:
            folder = getattr(self.tokenizer, "name_or_path", None)
            folder = folder if isinstance(folder, str) and os.path.isdir(folder) else None
            self._text_normalizer = DalleMiniTextNormalizer.from_pretrained(folder)
        return self._text_normalizer

    def prompt_token_count(self, prompt: str) -> int:
        """Number of text tokens `prompt` needs after normalization (`<s>` and `</s>` included)."""
        return len(self.tokenizer(self.text_normalizer(prompt))["input_ids"])

    def encode_prompt(self, prompts: list[str]) -> torch.LongTensor:
        """Normalize, tokenize, pad and truncate to `text_seq_len`: -> (len(prompts), 64). An empty (or blank)
        prompt is the unconditional one, `[<s>, </s>]`."""
        L = self.transformer.config.text_seq_len
        normalized = [self.text_normalizer(p) for p in prompts]
        for p, text in zip(prompts, normalized):
            if len(self.tokenizer(text)["input_ids"]) > L:
                logger.warning(f"The prompt {p!r} is longer than the model's {L} text tokens and was truncated.")
        ids = self.tokenizer(normalized, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
        ids = ids["input_ids"].to(self._execution_device)
        # dalle-mini tokenizes its unconditional "" without the normalizer (which would add a leading space)
        empty = torch.tensor([not p.strip() for p in prompts], device=ids.device)
        ids[empty] = self.unconditional_ids(1)
        return ids

    def unconditional_ids(self, batch_size: int) -> torch.LongTensor:
        """The empty prompt (B, L): `[<s>, </s>]`, then padding (dalle-mini's unconditional branch)."""
        config = self.transformer.config
        ids = torch.full((batch_size, config.text_seq_len), config.text_pad_token_id, dtype=torch.long)
        ids[:, 0], ids[:, 1] = config.text_bos_token_id, config.text_eos_token_id
        return ids.to(self._execution_device)

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the VQGAN codes: the grid times its downsampling (16 x 16 for f16: 256)."""
        return self.transformer.config.image_grid_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def codebook_size(self) -> int:
        """Number of VQGAN codes (16384): the head's rows that sampling keeps (Mega's head has 31 more, never codes)."""
        return self.transformer.config.sampled_image_vocab_size

    @torch.no_grad()
    def decode_image_tokens(self, tokens: torch.LongTensor, batch_size: int = 8) -> torch.Tensor:
        """VQGAN decode (B, N) codes -> (B, 3, H, W) float32 in [0, 1], in chunks to bound memory."""
        g = self.transformer.config.image_grid_size
        vae_dtype = next(self.vae.parameters()).dtype
        images = []
        for chunk in tokens.view(-1, g * g).split(batch_size):
            shape = (len(chunk), g, g, self.vae.config.vq_embed_dim or self.vae.config.latent_channels)
            latents = self.vae.quantize.get_codebook_entry(chunk.flatten(), shape).to(vae_dtype)  # (b, C, g, g)
            images.append(self.vae.decode(latents, force_not_quantize=True).sample.float())
        return torch.cat(images).clamp(0, 1)

    def check_image_encoder(self) -> None:
        if not self.config.vae_has_encoder:
            raise ValueError(
                "this pipeline's VQGAN has no encoder weights (a conversion of min-dalle's files, which hold the "
                "decoder only), so it cannot turn images into codes; convert the Flax VQGAN "
                "(dalle-hf convert-dalle-mini --flax DIR --vqgan DIR) for scores, variations and inpainting"
            )

    def prepare_image(self, image) -> torch.Tensor:
        """Any image -> float (1, 3, S, S) in [0, 1] on the execution device (`image_to_tensor`)."""
        return image_to_tensor(image, self.image_size).to(self._execution_device)

    @torch.no_grad()
    def encode_image_codes(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """(n, 3, S, S) pixels in [0, 1] -> (n, grid * grid) VQGAN codes in raster order."""
        self.check_image_encoder()
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(pixel_values.to(self._execution_device, vae_dtype)).latents  # (n, C, g, g)
        indices = self.vae.quantize(latents)[2][2]  # (n * g * g,) or (n * g * g, 1)
        return indices.reshape(len(pixel_values), -1)  # (n, g * g)

    @torch.no_grad()
    def encode_images(self, images) -> torch.LongTensor:
        """VQGAN codes (n, grid, grid) of a list of images (converted by `image_to_tensor`) or of one float tensor
        (n, 3, H, W) in [0, 1]."""
        self.check_image_encoder()
        batched = isinstance(images, torch.Tensor) and images.dim() == 4
        if not (batched or (isinstance(images, (list, tuple)) and images)):
            raise ValueError(f"images must be a non-empty list of images or a (n, 3, H, W) tensor, got {images!r:.80}")
        pixel_values = torch.cat([image_to_tensor(image, self.image_size) for image in images])  # (n, 3, S, S)
        g = self.transformer.config.image_grid_size
        codes = [self.encode_image_codes(chunk) for chunk in pixel_values.split(16)]
        return torch.cat(codes).view(-1, g, g)  # (n, g, g)


class DalleMiniPipeline(DalleMiniFamily, DallePipeline):
    r"""
    Text-to-image generation with DALL·E mini or DALL·E Mega (Dayma et al.): [`DallePipeline`]'s `__call__`, its
    arguments and its [`DallePipelineOutput`] (`image_tokens` of shape `(n, 16, 16)`), over this family's models.

    `guidance_scale` is dalle-mini's super-conditioning, `uncond + s * (cond - uncond)` with the empty prompt as
    `uncond` (dalle-mini's notebook: s = 10, the default here; min-dalle's: 16). `top_k=1` is greedy decoding.

    Args:
        tokenizer ([`~transformers.BartTokenizerFast`]): BART's byte-level BPE from the published `vocab.json` and
            `merges.txt` (`<pad>` = 1).
        transformer ([`DalleBartForImageGeneration`]): the encoder-decoder.
        vae ([`~diffusers.VQModel`]): the VQGAN f16 16384 (codes <-> 256 x 256 images).
        clip_model ([`~transformers.CLIPModel`], *optional*): reranks the candidates.
        clip_processor ([`~transformers.CLIPProcessor`], *optional*): CLIP's image size, mean and std.
        default_guidance_scale (`float`, *optional*, defaults to 10.0): the super-conditioning `__call__` uses when
            it is not given (dalle-mini's inference notebook).
        vae_has_encoder (`bool`, *optional*, defaults to `True`): whether the VQGAN's encoder weights are real. A
            conversion of min-dalle's files has the decoder only; image inputs are then refused with a
            `ValueError`.

    Example:

    ```python
    >>> import torch
    >>> from dalle_hf.pipeline_dalle_mini import DalleMiniPipeline
    >>> pipe = DalleMiniPipeline.from_pretrained("converted/dalle-mini")
    >>> out = pipe("a cat wearing a hat", num_images_per_prompt=9, top_k=256,
    ...            generator=torch.Generator().manual_seed(0))
    >>> out.images[0].save("cat.png")
    ```
    """


class DalleMiniInpaintPipeline(DalleMiniFamily, DalleInpaintPipeline):
    r"""
    Inpainting with DALL·E mini or Mega: [`DalleInpaintPipeline`]'s `__call__` and arguments over this family's
    models. The image is encoded by the VQGAN's encoder (a 16 x 16 grid of 16 px cells at 256 px); a cell whose patch
    touches the mask is resampled, the others keep their code, and outside the mask the output equals the input
    (converted to 256 x 256) exactly. Needs the VQGAN's encoder (a Flax conversion; a min-dalle conversion is refused
    with a `ValueError`).

    Args: as [`DalleMiniPipeline`].

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from PIL import Image
    >>> from dalle_hf.pipeline_dalle_mini import DalleMiniInpaintPipeline
    >>> inpaint = DalleMiniInpaintPipeline.from_pretrained("converted/dalle-mini")
    >>> mask = np.zeros((256, 256), dtype=bool); mask[128:, :] = True  # repaint the bottom half
    >>> out = inpaint("a cat wearing a hat", image=Image.open("cat.png"), mask_image=mask, num_images_per_prompt=4,
    ...               num_images_to_keep=1, top_k=256, generator=torch.Generator().manual_seed(0))
    ```
    """


class DalleMiniImageVariationPipeline(DalleMiniFamily, DalleImageVariationPipeline):
    r"""
    Variations of an image with DALL·E mini or Mega: [`DalleImageVariationPipeline`]'s `__call__` over this family's
    models: the image's first `num_rows_to_keep` rows of VQGAN codes (16 codes each at 256 px) are kept, the rest
    sampled, optionally given a prompt (without one, the empty prompt `[<s>, </s>]`). Needs the VQGAN's encoder.

    Args: as [`DalleMiniPipeline`].

    Example:

    ```python
    >>> import torch
    >>> from PIL import Image
    >>> from dalle_hf.pipeline_dalle_mini import DalleMiniImageVariationPipeline
    >>> variations = DalleMiniImageVariationPipeline.from_pretrained("converted/dalle-mini")
    >>> out = variations(Image.open("cat.png"), num_rows_to_keep=8, num_images_per_prompt=4, top_k=256,
    ...                  generator=torch.Generator().manual_seed(0))
    ```
    """


__all__ = ["DalleMiniFamily", "DalleMiniImageVariationPipeline", "DalleMiniInpaintPipeline", "DalleMiniPipeline"]
