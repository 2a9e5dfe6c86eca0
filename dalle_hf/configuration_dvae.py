"""Configuration of the DALL-E discrete VAE (Ramesh et al. 2021, §2.1 and appendix A)."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig


@strict
class DalleVAEConfig(PreTrainedConfig):
    r"""
    Configuration of a [`DalleVAE`]: the discrete VAE of "Zero-Shot Text-to-Image Generation" (Ramesh et al.
    2021), laid out like OpenAI's released `dall_e` encoder and decoder. Defaults are the paper's (256x256
    images, a 32x32 grid of 8192 codes); small configs (64x64 images, 16x16 grid, 512 codes) train on a CPU.

    Args:
        image_size (`int`, *optional*, defaults to 256):
            Side of the square input images. Must be divisible by the downsampling `2 ** (num_groups - 1)`.
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the input images (RGB).
        vocab_size (`int`, *optional*, defaults to 8192):
            Number of discrete codes K.
        n_hid (`int`, *optional*, defaults to 256):
            Width of the first group; group i has `n_hid * 2 ** i` channels (OpenAI: 1, 2, 4, 8).
        decoder_n_hid (`int`, *optional*, defaults to `None`):
            Width of the decoder's groups in the same pattern; `None` means `n_hid`. OpenAI's released encoder and
            decoder have separate widths; a wider decoder renders sharper edges from the same codes.
        n_blk_per_group (`int`, *optional*, defaults to 2):
            Residual blocks per resolution group.
        num_groups (`int`, *optional*, defaults to 4):
            Resolution groups; downsampling (encoder max-pool) and upsampling (decoder nearest) by 2 between them.
        n_init (`int`, *optional*, defaults to 128):
            Channels of the decoder's 1x1 input conv from the one-hot codes.
        reconstruction_loss (`str`, *optional*, defaults to `"logit_laplace"`):
            `"logit_laplace"` (paper appendix A.3) or `"mse"` (a simpler baseline on the mapped pixels).
        logit_laplace_eps (`float`, *optional*, defaults to 0.1):
            Pixels are squeezed into `[eps, 1 - eps]` by `map_pixels` so the logit stays finite.
        kl_weight (`float`, *optional*, defaults to 6.6):
            beta, the KL weight on the per-image sum of the ELB; overridable per call to `forward` for warmup.
        code_usage_weight (`float`, *optional*, defaults to 0.1):
            Weight of KL(batch-mean code distribution || uniform); not in the paper, keeps codes in use.
        initializer_factor (`float`, *optional*, defaults to 1.0):
            Multiplies OpenAI's conv init std `1 / sqrt(fan_in)`.

    Example:

    ```python
    >>> from dalle_hf import DalleVAEConfig
    >>> config = DalleVAEConfig(image_size=64, num_groups=3, n_hid=64, vocab_size=512)
    >>> config.grid_size
    16
    ```
    """

    model_type = "dalle_dvae"

    image_size: int = 256  # paper §2.1: 256x256 RGB images
    num_channels: int = 3  # RGB
    vocab_size: int = 8192  # paper §2.1: K = 8192 codes
    n_hid: int = 256  # OpenAI's released encoder/decoder width
    decoder_n_hid: int | None = None  # OpenAI's Encoder and Decoder dataclasses each have their own n_hid
    n_blk_per_group: int = 2  # OpenAI's released dVAE: 2 blocks per group
    num_groups: int = 4  # paper: 8x downsampling, 256 -> 32x32 tokens
    n_init: int = 128  # OpenAI's released decoder input width
    reconstruction_loss: Literal["logit_laplace", "mse"] = "logit_laplace"  # paper appendix A.3
    logit_laplace_eps: float = 0.1  # paper appendix A.3: eps = 0.1
    kl_weight: float = 6.6  # paper appendix A.2: beta = 6.6 gave better codebook usage and reconstruction
    code_usage_weight: float = 0.1  # not in the paper; without it only ~16 codes stayed in use on CPU-sized runs
    # OpenAI's init (std 1/sqrt(fan_in)) as is; PyTorch's default left the encoder blank
    initializer_factor: float = 1.0

    @property
    def downsampling(self) -> int:
        """Encoder downsampling factor, `2 ** (num_groups - 1)`."""
        return 2 ** (self.num_groups - 1)

    @property
    def grid_size(self) -> int:
        """Side of the code grid, `image_size // downsampling`."""
        return self.image_size // self.downsampling

    def __post_init__(self, **kwargs):
        # Checked here too (not only in `validate_architecture`) so that a bad config raises a plain
        # `ValueError` at construction; `@strict` wraps errors from its own validators.
        self.validate_architecture()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict`-powered validation: raise `ValueError` on an inconsistent architecture."""
        for name in ("image_size", "num_channels", "vocab_size", "n_hid", "n_blk_per_group", "num_groups", "n_init"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.decoder_n_hid is not None and self.decoder_n_hid < 1:
            raise ValueError(f"`decoder_n_hid` must be a positive integer or None, got {self.decoder_n_hid}.")
        if self.num_groups > 4:
            raise ValueError(
                "`num_groups` must be between 1 and 4 (OpenAI's channel multipliers 1, 2, 4, 8), "
                f"got {self.num_groups}."
            )
        if self.image_size % self.downsampling != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by the downsampling 2 ** (num_groups - 1) = "
                f"{self.downsampling}."
            )
        if self.vocab_size < 2:
            raise ValueError(f"`vocab_size` must be at least 2, got {self.vocab_size}.")
        if not 0.0 < self.logit_laplace_eps < 0.5:
            raise ValueError(f"`logit_laplace_eps` must be in (0, 0.5), got {self.logit_laplace_eps}.")
        if self.kl_weight < 0 or self.code_usage_weight < 0:
            raise ValueError("`kl_weight` and `code_usage_weight` must be non-negative.")
        if self.reconstruction_loss not in ("logit_laplace", "mse"):
            raise ValueError(
                f"`reconstruction_loss` must be 'logit_laplace' or 'mse', got {self.reconstruction_loss!r}."
            )


__all__ = ["DalleVAEConfig"]

# Registration only (as transformers remote-code models do): `AutoConfig` can then read saved dVAEs.
AutoConfig.register(DalleVAEConfig.model_type, DalleVAEConfig, exist_ok=True)
