"""Configuration of the DALL-E transformer (Ramesh et al. 2021, §2.2)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

ATTENTION_TYPES = ("full", "row", "column", "conv")


@strict
class DalleConfig(PreTrainedConfig):
    r"""
    Configuration of [`DalleForImageGeneration`], a decoder-only transformer over the concatenation
    `[BOS ; text tokens ; image tokens]`. The data layout defaults to the paper's (256 BPE text tokens from a
    16,384 vocabulary, a 32 x 32 grid of dVAE codes from an 8,192 vocabulary); depth and width default to a
    small model (the paper's is 64 layers x 3,968 wide, 12B parameters).

    Args:
        text_vocab_size (`int`, *optional*, defaults to 16384):
            Size of the BPE text vocabulary, special tokens included (paper §2.2).
        text_seq_len (`int`, *optional*, defaults to 256):
            Captions are truncated and padded to this many tokens (paper: 256).
        image_vocab_size (`int`, *optional*, defaults to 8192):
            Number of dVAE codes; must equal the dVAE's `vocab_size` (paper: 8,192).
        image_grid_size (`int`, *optional*, defaults to 32):
            The image is `image_grid_size x image_grid_size` tokens; must equal the dVAE's grid (paper: 32).
        pad_token_id (`int`, *optional*, defaults to 0):
            The tokenizer's padding id. Each text position replaces it with its own learned padding token
            (paper §2.2: "a special padding token for each of the 256 text positions").
        n_layer (`int`, *optional*, defaults to 12):
            Number of transformer blocks (paper: 64).
        n_head (`int`, *optional*, defaults to 8):
            Attention heads per block (paper: 62).
        n_embd (`int`, *optional*, defaults to 512):
            Hidden width (paper: 3,968).
        mlp_ratio (`int`, *optional*, defaults to 4):
            MLP hidden width is `mlp_ratio * n_embd`, as in GPT-2 and the paper.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on embeddings, attention and residual paths. Small data worlds overfit slowly; 0 trains fastest.
        attention_types (`list[str]`, *optional*):
            One of `"full"`, `"row"`, `"column"`, `"conv"` per layer. `None` means full causal attention in every
            layer. The paper's sparse layouts (§B.1, Fig. 11) restrict image-to-image attention: `"row"` to earlier
            tokens of the same row, `"column"` to earlier tokens of the same column, `"conv"` to a causal
            `conv_kernel_size x conv_kernel_size` neighbourhood. Every image token always sees all text tokens.
        conv_kernel_size (`int`, *optional*, defaults to 11):
            Neighbourhood of the `"conv"` layout (paper: 11 x 11); odd.
        text_self_attention (`bool`, *optional*, defaults to `True`):
            Whether text tokens attend to earlier text tokens, as in the paper. `False` lets each text token see
            only BOS and itself, so no text position mixes words: an image token then reads a colour word and a
            shape word at their own positions and must bind them itself, instead of reading a noun token that
            has already merged them into one (colour, shape) feature, which cannot represent a pair never seen
            in training. A compositional-generalization probe for the shapes world's `novel` task; the text
            loss then only predicts each next word from the current one. Measured at 2,400 steps of the shipped
            recipe: held-out pairs per sample 0.27 against 0.20, but the six seen tasks 0.32 against 0.42 (binding
            two colours and word order must then be learned from text positions alone):
            `docs/research/preregistration-text-isolation-probe.md`.
        image_loss_weight (`float`, *optional*, defaults to 7.0):
            The loss is `(text_loss + image_loss_weight * image_loss) / (1 + image_loss_weight)`; the paper weights
            text:image as 1:7 "since we are primarily interested in image modeling".
        layer_norm_epsilon (`float`, *optional*, defaults to 1e-5):
            LayerNorm epsilon, GPT-2's.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init; residual projections use `initializer_range / sqrt(2 * n_layer)` (GPT-2).

    Example:

    ```python
    >>> from dalle_hf import DalleConfig, DalleForImageGeneration
    >>> config = DalleConfig(text_vocab_size=512, text_seq_len=16, image_vocab_size=512, image_grid_size=16,
    ...                      n_layer=2, n_head=2, n_embd=64)
    >>> model = DalleForImageGeneration(config)
    >>> config.image_seq_len
    256
    ```"""

    model_type = "dalle"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

    text_vocab_size: int = 16384
    text_seq_len: int = 256
    image_vocab_size: int = 8192
    image_grid_size: int = 32
    pad_token_id: int | None = 0
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 512
    mlp_ratio: int = 4
    dropout: float | int = 0.0
    attention_types: list[str] | None = None
    conv_kernel_size: int = 11
    text_self_attention: bool = True
    image_loss_weight: float | int = 7.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.attention_types is None:
            self.attention_types = ["full"] * self.n_layer
        # Checked here too so that a bad config raises a plain ValueError (the @strict validators wrap it).
        self.validate_architecture()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: raises `ValueError` naming the field and what was expected."""
        for name in (
            "text_vocab_size", "text_seq_len", "image_vocab_size", "image_grid_size", "n_layer", "n_head", "n_embd"
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.pad_token_id is None or not 0 <= self.pad_token_id < self.text_vocab_size:
            raise ValueError(
                f"pad_token_id must be a text token id in [0, {self.text_vocab_size}), got {self.pad_token_id}"
            )
        if len(self.attention_types) != self.n_layer:
            raise ValueError(
                f"attention_types must list one layout per layer ({self.n_layer}), got {len(self.attention_types)}"
            )
        unknown = sorted(set(self.attention_types) - set(ATTENTION_TYPES))
        if unknown:
            raise ValueError(f"attention_types must be from {ATTENTION_TYPES}, got {unknown}")
        if self.conv_kernel_size < 1 or self.conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be a positive odd int, got {self.conv_kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_loss_weight < 0:
            raise ValueError(f"image_loss_weight must be >= 0, got {self.image_loss_weight}")

    @property
    def image_seq_len(self) -> int:
        """Number of image tokens, `image_grid_size ** 2`."""
        return self.image_grid_size**2

    @property
    def total_seq_len(self) -> int:
        """Length of `[BOS ; text ; image]`."""
        return 1 + self.text_seq_len + self.image_seq_len


__all__ = ["DalleConfig"]
