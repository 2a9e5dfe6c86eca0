"""Configuration of DALL·E mini and DALL·E Mega (Dayma et al. 2021-2022): a BART encoder-decoder over VQGAN codes."""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class DalleBartConfig(PreTrainedConfig):
    r"""
    Configuration of [`DalleBartForImageGeneration`]: a BART-style encoder reads the prompt's BPE tokens, a decoder
    predicts the 16 x 16 VQGAN codes of the image one by one. The layers are dalle-mini's released ones
    (`ln_positions="normformer"`, GLU feed-forward, no biases, LayerNorms without a scale where dalle-mini builds
    them with `use_scale=force_ln_scale=False`), which min-dalle 0.4.11 ports to PyTorch. The defaults are
    DALL·E mini's published shapes; [`DalleBartConfig.mega`] gives DALL·E Mega's.

    Args:
        text_vocab_size (`int`, *optional*, defaults to 50264):
            BPE vocabulary of the encoder (the published mini: 50264; Mega: 50272).
        image_vocab_size (`int`, *optional*, defaults to 16384):
            Image vocabulary of the published decoder; its embedding and head have `image_vocab_size + 1` rows, the
            last one the start token (mini: 16384; Mega: 16415, rows that were never trained as codes).
        sampled_image_vocab_size (`int`, *optional*, defaults to 16384):
            The logits sampling keeps: the VQGAN f16 16384's codebook (dalle-mini's `logits[..., :16384]`).
        text_seq_len (`int`, *optional*, defaults to 64):
            Prompts are padded and truncated to this many tokens (dalle-mini's `max_text_length`).
        image_seq_len (`int`, *optional*, defaults to 256):
            Codes per image: a 16 x 16 grid, the VQGAN f16's latent of a 256 x 256 image.
        d_model (`int`, *optional*, defaults to 1024):
            Width of both stacks (Mega: 2048).
        encoder_layers (`int`, *optional*, defaults to 12):
            Encoder layers (Mega: 24).
        decoder_layers (`int`, *optional*, defaults to 12):
            Decoder layers (Mega: 24).
        attention_heads (`int`, *optional*, defaults to 16):
            Heads of every attention, self and cross (Mega: 32).
        glu_dim (`int`, *optional*, defaults to 2730):
            Inner width of the GLU feed-forward `fc2(ln1(gelu(fc0 x) * fc1 x))` (Mega: 4096).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every LayerNorm (flax's and torch's default, which dalle-mini and min-dalle use).
        decoder_start_token_id (`int`, *optional*, defaults to 16384):
            The decoder's first input: dalle-mini's `decoder_start_token_id`, the row after the codes. (min-dalle
            0.4.11 starts from 16383, a real code; docs/dalle-mini.md.)
        text_pad_token_id (`int`, *optional*, defaults to 1):
            BART's `<pad>`; padded positions are masked out of attention.
        text_bos_token_id (`int`, *optional*, defaults to 0):
            BART's `<s>`, the first token of every prompt.
        text_eos_token_id (`int`, *optional*, defaults to 2):
            BART's `</s>`; the unconditional prompt of super-conditioning is `[<s>, </s>]`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of fresh weights (BART's `init_std`); converted weights replace it.

    Example:

    ```python
    >>> from dalle_hf.configuration_dalle_bart import DalleBartConfig
    >>> config = DalleBartConfig.mega()
    >>> config.d_model, config.decoder_layers, config.image_grid_size
    (2048, 24, 16)
    ```"""

    model_type = "dalle-bart"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "attention_heads",
        "num_hidden_layers": "decoder_layers",
    }

    text_vocab_size: int = 50264
    image_vocab_size: int = 16384
    sampled_image_vocab_size: int = 16384
    text_seq_len: int = 64
    image_seq_len: int = 256
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    attention_heads: int = 16
    glu_dim: int = 2730
    layer_norm_eps: float = 1e-5
    decoder_start_token_id: int | None = 16384
    text_pad_token_id: int = 1
    text_bos_token_id: int = 0
    text_eos_token_id: int = 2
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # Checked here too so that a bad config raises a plain ValueError (the @strict validators wrap it).
        self.validate_architecture()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: raises `ValueError` naming the field and what was expected."""
        for name in (
            "text_vocab_size", "image_vocab_size", "sampled_image_vocab_size", "text_seq_len", "image_seq_len",
            "d_model", "encoder_layers", "decoder_layers", "attention_heads", "glu_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)}")
        if self.d_model % self.attention_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of attention_heads ({self.attention_heads})")
        if math.isqrt(self.image_seq_len) ** 2 != self.image_seq_len:
            raise ValueError(f"image_seq_len must be a square (a grid of codes), got {self.image_seq_len}")
        if self.sampled_image_vocab_size > self.image_vocab_size:
            raise ValueError(f"sampled_image_vocab_size ({self.sampled_image_vocab_size}) must be at most "
                             f"image_vocab_size ({self.image_vocab_size})")
        if self.decoder_start_token_id is None or not 0 <= self.decoder_start_token_id <= self.image_vocab_size:
            raise ValueError(f"decoder_start_token_id must be in [0, image_vocab_size={self.image_vocab_size}] (the "
                             f"decoder embedding has image_vocab_size + 1 rows), got {self.decoder_start_token_id}")
        for name in ("text_pad_token_id", "text_bos_token_id", "text_eos_token_id"):
            if not 0 <= getattr(self, name) < self.text_vocab_size:
                raise ValueError(f"{name} must be in [0, {self.text_vocab_size}), got {getattr(self, name)}")

    @classmethod
    def mini(cls, **kwargs) -> "DalleBartConfig":
        """DALL·E mini's published shapes (`dalle-mini/dalle-mini`, min-dalle's `is_mega=False`); kwargs override."""
        return cls(**{**dict(
            text_vocab_size=50264, image_vocab_size=16384, d_model=1024, encoder_layers=12, decoder_layers=12,
            attention_heads=16, glu_dim=2730,
        ), **kwargs})  # fmt: skip

    @classmethod
    def mega(cls, **kwargs) -> "DalleBartConfig":
        """DALL·E Mega's published shapes (`dalle-mini/dalle-mega`, min-dalle's `is_mega=True`); kwargs override."""
        return cls(**{**dict(
            text_vocab_size=50272, image_vocab_size=16415, d_model=2048, encoder_layers=24, decoder_layers=24,
            attention_heads=32, glu_dim=4096,
        ), **kwargs})  # fmt: skip

    @property
    def image_grid_size(self) -> int:
        """Side of the code grid, `sqrt(image_seq_len)` (16 for the VQGAN f16 at 256 x 256)."""
        return math.isqrt(self.image_seq_len)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_heads


__all__ = ["DalleBartConfig"]
