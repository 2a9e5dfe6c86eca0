"""The DALL-E discrete VAE (Ramesh et al. 2021, §2.1 and appendix A).

Layout and parameter names follow OpenAI's released `dall_e/encoder.py` and `dall_e/decoder.py`
(`encoder.blocks.group_1.block_1.res_path.conv_1.w`, ...), so their weights copy key for key. Training
follows the paper: a Gumbel-softmax relaxation of the encoder's categorical posterior, a logit-Laplace
likelihood for the pixels and a KL term against the uniform prior over the `vocab_size` codes.
"""

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dvae import DalleVAEConfig


def map_pixels(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Squeeze pixels from `[0, 1]` into `[eps, 1 - eps]` so their logit is finite (paper appendix A.3)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Invert `map_pixels` and clamp to `[0, 1]`."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


@dataclass
class DalleVAEOutput(ModelOutput):
    r"""
    Output of [`DalleVAE.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            `reconstruction_loss + kl_weight * kl_loss * (h * w) / (3 * H * W) + code_usage_weight * usage_loss`:
            the negative ELB per pixel dimension with the paper's beta on the per-image sums, plus the code-usage term.
        reconstruction_loss (`torch.FloatTensor` of shape `()`):
            Negative log-likelihood per pixel dimension (logit-Laplace) or mean squared error (`"mse"`).
        kl_loss (`torch.FloatTensor` of shape `()`):
            KL(q(z | x) || uniform) per code position, in nats (at most `log(vocab_size)`).
        reconstruction (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            The decoded images in `[0, 1]` (the logit-Laplace mean through `unmap_pixels`).
        logits (`torch.FloatTensor` of shape `(batch_size, vocab_size, grid_size, grid_size)`):
            The encoder's logits over codes.
        usage_loss (`torch.FloatTensor` of shape `()`):
            KL(batch-mean q || uniform) = `log(vocab_size) - entropy of the mean code distribution`.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    usage_loss: torch.FloatTensor | None = None


class DalleConv2d(nn.Module):
    """A same-padded conv with parameters named `w` and `b` as in OpenAI's `dall_e/utils.py`."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.empty(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    """OpenAI's encoder block: `id_path(x) + post_gain * res_path(x)`, res_path = 3x3, 3x3, 3x3, 1x1 convs."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        # OpenAI: 1 / n_layers ** 2 keeps the residual stream's scale flat at init through all blocks.
        self.post_gain = 1 / (n_layers**2)
        self.id_path = DalleConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", DalleConv2d(n_in, n_hid, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", DalleConv2d(n_hid, n_hid, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", DalleConv2d(n_hid, n_hid, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", DalleConv2d(n_hid, n_out, 1)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    """OpenAI's decoder block: like the encoder's but res_path = 1x1, 3x3, 3x3, 3x3 convs."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = DalleConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", DalleConv2d(n_in, n_hid, 1)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", DalleConv2d(n_hid, n_hid, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", DalleConv2d(n_hid, n_hid, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", DalleConv2d(n_hid, n_out, 3)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group_widths(config: DalleVAEConfig, n_hid: int | None = None) -> list[int]:
    # OpenAI: group i has n_hid * (1, 2, 4, 8)[i] channels.
    n_hid = config.n_hid if n_hid is None else n_hid
    return [n_hid * 2**i for i in range(config.num_groups)]


class DalleVAEEncoder(nn.Module):
    """Image `(B, 3, H, W)` (mapped pixels) -> logits over codes `(B, vocab_size, H / d, W / d)`."""

    def __init__(self, config: DalleVAEConfig):
        super().__init__()
        widths = _group_widths(config)
        n_layers = config.num_groups * config.n_blk_per_group
        layers = [("input", DalleConv2d(config.num_channels, widths[0], 7))]
        n_in = widths[0]
        for g, n_out in enumerate(widths, start=1):
            group = []
            for i in range(1, config.n_blk_per_group + 1):
                group.append((f"block_{i}", EncoderBlock(n_in, n_out, n_layers)))
                n_in = n_out
            if g < config.num_groups:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
        output = [("relu", nn.ReLU()), ("conv", DalleConv2d(n_in, config.vocab_size, 1))]
        layers.append(("output", nn.Sequential(OrderedDict(output))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DalleVAEDecoder(nn.Module):
    """Soft or hard one-hot codes `(B, vocab_size, h, w)` -> logit-Laplace statistics `(B, 6, h * d, w * d)`."""

    def __init__(self, config: DalleVAEConfig):
        super().__init__()
        widths = _group_widths(config, config.decoder_n_hid)[::-1]
        n_layers = config.num_groups * config.n_blk_per_group
        layers = [("input", DalleConv2d(config.vocab_size, config.n_init, 1))]
        n_in = config.n_init
        for g, n_out in enumerate(widths, start=1):
            group = []
            for i in range(1, config.n_blk_per_group + 1):
                group.append((f"block_{i}", DecoderBlock(n_in, n_out, n_layers)))
                n_in = n_out
            if g < config.num_groups:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
        # 2 * channels: the logit-Laplace location and log-scale per channel (paper appendix A.3).
        output = [("relu", nn.ReLU()), ("conv", DalleConv2d(n_in, 2 * config.num_channels, 1))]
        layers.append(("output", nn.Sequential(OrderedDict(output))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def forward_codes(self, ids: torch.LongTensor) -> torch.Tensor:
        """Hard codes `(B, h, w)` -> statistics `(B, 6, H, W)`, the same as `forward(one_hot(ids))`: a 1x1 conv of a
        one-hot picks one column of its weight, so the input layer is a lookup and the `(B, vocab, h, w)` one-hot
        is never built. The activations stay channels-last (as the permuted one-hot was): about 2x faster convs
        on CPU than NCHW, in bf16 too (docs/performance.md)."""
        conv = self.blocks.input
        x = conv.w[:, :, 0, 0].t()[ids] + conv.b  # (B, h, w, n_init)
        x = x.permute(0, 3, 1, 2)  # (B, n_init, h, w), channels-last in memory
        for layer in list(self.blocks)[1:]:
            x = layer(x)
        return x


class DalleVAEPreTrainedModel(PreTrainedModel):
    config_class = DalleVAEConfig
    base_model_prefix = "dvae"
    main_input_name = "pixel_values"
    _no_split_modules = ["EncoderBlock", "DecoderBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        # OpenAI's dall_e/utils.py: w ~ N(0, 1 / (n_in * kw ** 2)), b = 0.
        if isinstance(module, DalleConv2d):
            std = self.config.initializer_factor / math.sqrt(module.n_in * module.kw**2)
            init.normal_(module.w, mean=0.0, std=std)
            init.zeros_(module.b)


def runs_offload_hook(method):
    """Run accelerate's offload hook before `method`, as for `forward`: with `pipe.enable_model_cpu_offload()` it
    moves the dVAE to the GPU, and the pipelines call `encode` / `decode_code`, not `forward`. diffusers'
    `apply_forward_hook` does the same; written here so that this model file needs transformers only."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        hook = getattr(self, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self)
        return method(self, *args, **kwargs)

    return wrapper


class DalleVAE(DalleVAEPreTrainedModel):
    r"""
    The discrete VAE of DALL-E: an encoder from images to a `grid_size x grid_size` grid of `vocab_size` codes and
    a decoder back to pixels. "We train a discrete variational autoencoder (dVAE) to compress each 256x256 RGB
    image into a 32 x 32 grid of image tokens, each element of which can assume 8192 possible values" (paper §2).

    Args:
        config ([`DalleVAEConfig`]): the model configuration.

    Example:

    ```python
    >>> import torch
    >>> from dalle_hf import DalleVAE, DalleVAEConfig
    >>> vae = DalleVAE(DalleVAEConfig(image_size=32, num_groups=3, n_hid=16, vocab_size=32))
    >>> ids = vae.get_codebook_indices(torch.rand(2, 3, 32, 32))
    >>> ids.shape, vae.decode_code(ids).shape
    (torch.Size([2, 8, 8]), torch.Size([2, 3, 32, 32]))
    ```
    """

    def __init__(self, config: DalleVAEConfig):
        super().__init__(config)
        self.encoder = DalleVAEEncoder(config)
        self.decoder = DalleVAEDecoder(config)
        self.post_init()

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"`pixel_values` must be a 4D tensor (batch, channels, height, width), got {shape}.")
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` must have {self.config.num_channels} channels, got {pixel_values.shape[1]}."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"`pixel_values` must be a float tensor in [0, 1], got dtype {pixel_values.dtype}.")
        size = self.config.image_size
        if tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"`pixel_values` must be {size}x{size} (config.image_size), got {tuple(pixel_values.shape[2:])}."
            )

    @runs_offload_hook
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        r"""
        Encode images to logits over codes.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                Images in `[0, 1]`; `map_pixels` is applied here.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, vocab_size, grid_size, grid_size)`.
        """
        self._check_pixel_values(pixel_values)
        x = map_pixels(pixel_values.to(self.dtype), self.config.logit_laplace_eps)
        return self.encoder(x)  # (B, V, h, w)

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        r"""
        The argmax code at each grid position (no Gumbel noise, as in the paper's transformer training data).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                Images in `[0, 1]`.

        Returns:
            `torch.LongTensor` of shape `(batch_size, grid_size, grid_size)`.
        """
        return self.encode(pixel_values).argmax(dim=1)  # (B, h, w)

    def _decode_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # z: (B, V, h, w) soft or hard one-hots -> location mu (B, 3, H, W), log-scale (B, 3, H, W) in fp32
        stats = self.decoder(z).float()  # (B, 6, H, W)
        c = self.config.num_channels
        return stats[:, :c], stats[:, c:]

    def _mean_image(self, mu: torch.Tensor) -> torch.Tensor:
        # OpenAI: unmap_pixels(sigmoid(x_stats[:, :3])); sigmoid(mu) is the median of the logit-Laplace.
        return unmap_pixels(torch.sigmoid(mu), self.config.logit_laplace_eps)

    @runs_offload_hook
    @torch.no_grad()
    def decode_code(self, ids: torch.LongTensor) -> torch.FloatTensor:
        r"""
        Decode a grid of codes to images.

        Args:
            ids (`torch.LongTensor` of shape `(batch_size, grid_size, grid_size)` or `(batch_size, grid_size ** 2)`):
                Code indices in `[0, vocab_size)`, row-major.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)` in `[0, 1]`.
        """
        g, v = self.config.grid_size, self.config.vocab_size
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"`ids` must be an integer tensor, got {getattr(ids, 'dtype', type(ids))}.")
        if ids.ndim == 2 and ids.shape[1] == g * g:
            ids = ids.view(-1, g, g)  # (B, h*w) -> (B, h, w)
        if ids.ndim != 3 or tuple(ids.shape[1:]) != (g, g):
            raise ValueError(f"`ids` must have shape (batch, {g}, {g}) or (batch, {g * g}), got {tuple(ids.shape)}.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise ValueError(f"`ids` must be in [0, {v}), got values in [{int(ids.min())}, {int(ids.max())}].")
        stats = self.decoder.forward_codes(ids.long()).float()  # (B, 6, H, W)
        return self._mean_image(stats[:, : self.config.num_channels])

    def _reconstruction_loss(self, pixel_values, mu, log_scale) -> torch.Tensor:
        eps = self.config.logit_laplace_eps
        x = map_pixels(pixel_values.float(), eps)  # (B, 3, H, W) in [eps, 1 - eps]
        if self.config.reconstruction_loss == "mse":
            return F.mse_loss(torch.sigmoid(mu), x)  # both in mapped-pixel space
        # Paper appendix A.3: f(x | mu, b) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)).
        nll = torch.log(2 * x * (1 - x)) + log_scale + torch.abs(torch.logit(x) - mu) * torch.exp(-log_scale)
        return nll.mean()

    def forward(
        self,
        pixel_values: torch.Tensor,
        temperature: float = 1.0,
        kl_weight: float | None = None,
        hard_codes: bool = False,
        return_dict: bool = True,
    ) -> DalleVAEOutput | tuple:
        r"""
        The dVAE training objective (paper §2.1): encode, relax the codes with Gumbel-softmax, decode, and score.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                Images in `[0, 1]`.
            temperature (`float`, *optional*, defaults to 1.0):
                Gumbel-softmax temperature tau; the paper anneals it from 1 to 1/16.
            kl_weight (`float`, *optional*, defaults to None):
                beta for this step (the paper warms it up from 0); `None` uses `config.kl_weight`.
            hard_codes (`bool`, *optional*, defaults to False):
                Decoder fine-tuning: decode the argmax codes, exactly what `decode_code` sees at generation time
                (no Gumbel noise, no gradient into the encoder), and train on the reconstruction loss alone. The
                codes do not change, so a transformer trained on them stays valid. `kl_loss` and `usage_loss` are
                still reported.
            return_dict (`bool`, *optional*, defaults to True):
                Return a [`DalleVAEOutput`] rather than a tuple.

        Returns:
            [`DalleVAEOutput`] or `tuple`.
        """
        if not temperature > 0:
            raise ValueError(f"`temperature` must be positive, got {temperature}.")
        kl_weight = self.config.kl_weight if kl_weight is None else kl_weight
        logits = self.encode(pixel_values)  # (B, V, h, w)
        if hard_codes:
            stats = self.decoder.forward_codes(logits.detach().argmax(dim=1)).float()  # (B, 6, H, W)
            mu, log_scale = stats[:, : self.config.num_channels], stats[:, self.config.num_channels :]
        else:
            # Gumbel noise from the global torch RNG, so `torch.manual_seed` makes a step reproducible.
            z = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1)  # (B, V, h, w) soft one-hots
            mu, log_scale = self._decode_stats(z)  # (B, 3, H, W) each, fp32

        # The losses stay in fp32 under autocast.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            reconstruction_loss = self._reconstruction_loss(pixel_values, mu, log_scale)
            log_q = F.log_softmax(logits, dim=1)  # (B, V, h, w)
            q = log_q.exp()
            log_v = math.log(self.config.vocab_size)
            kl_loss = (q * log_q).sum(dim=1).mean() + log_v  # KL(q || uniform) per position
            mean_q = q.mean(dim=(0, 2, 3))  # (V,) the batch's aggregate code distribution
            usage_loss = log_v + (mean_q * torch.log(mean_q.clamp_min(1e-12))).sum()
            # beta applies to the per-image sums (paper): rescale the per-position KL to per pixel dimension.
            positions_per_dim = logits.shape[2] * logits.shape[3] / pixel_values[0].numel()
            loss = (
                reconstruction_loss
                + kl_weight * positions_per_dim * kl_loss
                + self.config.code_usage_weight * usage_loss
            )
            if hard_codes:
                loss = reconstruction_loss  # the encoder is fixed: its terms have nothing to train
        reconstruction = self._mean_image(mu)

        if not return_dict:
            return (loss, reconstruction_loss, kl_loss, reconstruction, logits, usage_loss)
        return DalleVAEOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            kl_loss=kl_loss,
            reconstruction=reconstruction,
            logits=logits,
            usage_loss=usage_loss,
        )


__all__ = ["DalleVAE", "DalleVAEOutput", "DalleVAEPreTrainedModel", "map_pixels", "unmap_pixels"]

# Registration only (as transformers remote-code models do): `AutoModel` can then load saved dVAEs.
AutoModel.register(DalleVAEConfig, DalleVAE, exist_ok=True)
