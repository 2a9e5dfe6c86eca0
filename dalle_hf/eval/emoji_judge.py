"""EmojiEval's judge: a small CNN that names the concept and the style of a 64 x 64 emoji image.

The judge plays the role Inception plays for FID (a fixed reader of images, apart from every model it scores): it
is trained on **all** real renders of the emoji cache, held-out `(concept, style)` pairs included, and is never used
to train or rerank a generator. Its augmentations make
real renders look like generated ones: small shifts, Gaussian blur, Gaussian noise, JPEG, slight colour jitter and,
when a dVAE is given, dVAE round trips.

**Accept rule.** The judge *accepts* an image as concept `c` iff its concept argmax is `c` **and** its probability of
`c` is at least `config.accept_threshold`. The threshold is chosen on the judge's own validation images: the 5th
percentile of the top probability over the validation images it names correctly (it keeps 95% of its correct
answers). The style is accepted iff the style argmax is the asked style (11 classes, no threshold).

**Quality numbers.** A fixed 10% of the renders (`is_judge_validation`: a hash of `(key, style)`, so the same images
for every run) is kept out of the judge's training; `judge_quality.json` reports accuracy on them clean and under blur,
noise, JPEG and shifts (and dVAE round trips with `--vae`), and the false-accept rate on white and noise images and on
wrong-concept images (each validation image asked for its most likely *wrong* concept: the hardest wrong prompt).

Train it once per cache (about 10 minutes on one CPU core at the defaults):

```bash
python -m dalle_hf.eval.emoji_judge --cache /work/emoji-cache --out runs/emoji-judge --epochs 40 --seed 0
```

Example:

```python
>>> import torch
>>> from dalle_hf.eval.emoji_judge import EmojiJudge, EmojiJudgeConfig
>>> judge = EmojiJudge(EmojiJudgeConfig(concepts=["1f34e", "1f431"], styles=["noto", "twemoji"]))
>>> out = judge(torch.rand(2, 3, 64, 64))
>>> out.concept_logits.shape, out.style_logits.shape, out.features.shape
(torch.Size([2, 2]), torch.Size([2, 2]), torch.Size([2, 128]))
```
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from PIL import Image
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

JUDGE_VALIDATION_MODULUS = 10  # a render is kept out of the judge's training iff hash % 10 == 0: a fixed 10%
ACCEPT_QUANTILE = 0.05  # the threshold keeps 95% of the judge's correct answers on its validation images
QUALITY_FILE = "judge_quality.json"
# Fixed corruptions of the quality report (mid-range of the training augmentations).
BLUR_SIGMA, NOISE_STD, JPEG_QUALITY, SHIFT_PX = 1.0, 0.05, 30, 4
OUTLIER_WEIGHT = 0.5  # the outlier-exposure term's weight, Hendrycks et al. (2019)'s for classifiers


@strict
class EmojiJudgeConfig(PreTrainedConfig):
    r"""
    Configuration of an [`EmojiJudge`].

    Args:
        concepts (`list[str]`, *optional*, defaults to `[]`):
            The concept keys of the cache it was trained on, sorted: class `i` of the concept head is `concepts[i]`.
        styles (`list[str]`, *optional*, defaults to `[]`):
            The style names, in `STYLES` order: class `i` of the style head is `styles[i]`.
        image_size (`int`, *optional*, defaults to 32):
            Side the judge reads; other sizes (the 64 px renders) are resized (bicubic, antialiased) first. In the
            same 40 s of training on 100 concepts, 32 px reached 24% concept accuracy on unseen renders and 78% on
            training renders (58 epochs); 64 px with four stages reached 0% and 9% (12 epochs): with ~8 renders
            per concept, epochs matter more than pixels.
        widths (`list[int]`, *optional*, defaults to `[32, 64, 128]`):
            Channels of the stride-2 stages (32 -> 16 -> 8 -> 4 px); `[64, 128, 256]` reached 14% in those 40 s.
        feature_dim (`int`, *optional*, defaults to 128):
            Width of the penultimate features (the Fréchet distance's space): small enough that ~1,000 generated
            images estimate its covariance.
        dropout (`float`, *optional*, defaults to 0.2):
            Dropout before the heads: about 8 renders per concept, so the concept head overfits without it.
        accept_threshold (`float`, *optional*, defaults to 0.5):
            Least concept probability for an accept (see the module docstring); training sets it from validation.
    """

    model_type = "emoji_judge"

    concepts: list[str] | None = None  # keys of the training cache, sorted
    styles: list[str] | None = None  # STYLES order
    image_size: int = 32  # half the render size: 4x the epochs of 64 px in the same time, which mattered more
    widths: list[int] | None = None  # None -> [32, 64, 128]: the best of three sizes in a 40 s probe (see above)
    feature_dim: int = 128  # Fréchet features: a 128 x 128 covariance is estimable from ~1,000 images
    dropout: float = 0.2  # ~8 renders per concept
    accept_threshold: float = 0.5  # replaced by the validation quantile after training

    def __post_init__(self, **kwargs):
        self.concepts = list(self.concepts or [])
        self.styles = list(self.styles or [])
        self.widths = list(self.widths or [32, 64, 128])
        if len(self.widths) < 1 or min(self.widths) < 1 or self.image_size < 2 ** len(self.widths):
            raise ValueError(f"expected positive `widths` with image_size >= 2 ** len(widths), got {self.widths} "
                             f"and {self.image_size}")  # fmt: skip
        if not 0.0 <= self.accept_threshold <= 1.0:
            raise ValueError(f"expected `accept_threshold` in [0, 1], got {self.accept_threshold}")
        super().__post_init__(**kwargs)


@dataclass
class EmojiJudgeOutput(ModelOutput):
    """
    Args:
        concept_logits (`torch.FloatTensor` of shape `(B, len(concepts))`)
        style_logits (`torch.FloatTensor` of shape `(B, len(styles))`)
        features (`torch.FloatTensor` of shape `(B, feature_dim)`): the penultimate features (Fréchet distance).
    """

    concept_logits: torch.FloatTensor | None = None
    style_logits: torch.FloatTensor | None = None
    features: torch.FloatTensor | None = None


class JudgeStage(nn.Module):
    """A stride-2 3x3 conv and a 3x3 conv, each with batch norm and ReLU: halves the side."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.down = nn.Conv2d(n_in, n_out, 3, stride=2, padding=1, bias=False)
        self.norm_1 = nn.BatchNorm2d(n_out)
        self.conv = nn.Conv2d(n_out, n_out, 3, padding=1, bias=False)
        self.norm_2 = nn.BatchNorm2d(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm_1(self.down(x)))
        return F.relu(self.norm_2(self.conv(x)))


class EmojiJudgePreTrainedModel(PreTrainedModel):
    config_class = EmojiJudgeConfig
    base_model_prefix = "judge"
    main_input_name = "pixel_values"

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class EmojiJudge(EmojiJudgePreTrainedModel):
    r"""
    EmojiEval's judge: stride-2 conv stages on 32 px, global average pooling, a `feature_dim` projection and two
    linear heads (concept, style). Inputs are `(B, 3, H, W)` in `[0, 1]`; `H = W != image_size` is resized first.

    Args:
        config ([`EmojiJudgeConfig`]): the model configuration.
    """

    def __init__(self, config: EmojiJudgeConfig):
        super().__init__(config)
        widths = [3, *config.widths]
        self.stages = nn.ModuleList(JudgeStage(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.project = nn.Linear(widths[-1], config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.concept_head = nn.Linear(config.feature_dim, max(1, len(config.concepts)))
        self.style_head = nn.Linear(config.feature_dim, max(1, len(config.styles)))
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> EmojiJudgeOutput:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"expected `pixel_values` of shape (B, 3, H, W) in [0, 1], got {shape}")
        size = self.config.image_size
        x = pixel_values.to(self.device, torch.float32)
        if tuple(x.shape[2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        x = (x - 0.5) / 0.5  # (B, 3, 64, 64) in [-1, 1]
        for stage in self.stages:
            x = stage(x)  # (B, C, 4, 4) after the last
        features = F.relu(self.project(x.mean(dim=(2, 3))))  # (B, feature_dim)
        hidden = self.dropout(features)
        return EmojiJudgeOutput(self.concept_head(hidden), self.style_head(hidden), features)

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Eval-mode probabilities and features in batches: `{"concept_probs": (N, C), "style_probs": (N, S),
        "features": (N, feature_dim)}` on the CPU."""
        was_training = self.training
        self.eval()
        out = {"concept_probs": [], "style_probs": [], "features": []}
        for batch in pixel_values.split(batch_size):
            result = self(batch)
            out["concept_probs"].append(result.concept_logits.float().softmax(-1).cpu())
            out["style_probs"].append(result.style_logits.float().softmax(-1).cpu())
            out["features"].append(result.features.float().cpu())
        self.train(was_training)
        empty = {"concept_probs": len(self.config.concepts), "style_probs": len(self.config.styles),
                 "features": self.config.feature_dim}  # fmt: skip
        return {k: torch.cat(v) if v else torch.zeros(0, empty[k]) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------
# The accept rule and false accepts.


def accepts(concept_probs: torch.Tensor, asked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool `(N,)`: the judge accepts image `n` as concept `asked[n]` iff it is the argmax and its probability is at
    least `threshold` (the module docstring's rule)."""
    asked = torch.as_tensor(asked, dtype=torch.long)
    if concept_probs.ndim != 2 or asked.shape != concept_probs.shape[:1]:
        raise ValueError(f"expected (N, C) probabilities and (N,) asked concepts, got {tuple(concept_probs.shape)} "
                         f"and {tuple(asked.shape)}")  # fmt: skip
    asked_probs = concept_probs.gather(1, asked[:, None])[:, 0]
    return (concept_probs.argmax(1) == asked) & (asked_probs >= threshold)


def false_accept_rate(
    concept_probs: torch.Tensor, threshold: float, true_concepts: torch.Tensor | None = None
) -> float:
    """
    The fraction of images the judge accepts for the hardest wrong prompt: each image is asked for its most likely
    concept other than `true_concepts[n]` (blank images, `true_concepts=None`: its most likely concept at all).
    """
    probs = concept_probs.clone()
    if true_concepts is not None:
        probs.scatter_(1, torch.as_tensor(true_concepts, dtype=torch.long)[:, None], -1.0)
    asked = probs.argmax(1)
    return float(accepts(concept_probs, asked, threshold).float().mean()) if len(asked) else float("nan")


def choose_threshold(concept_probs: torch.Tensor, true_concepts: torch.Tensor) -> tuple[float, str]:
    """`ACCEPT_QUANTILE` of the top probability over the images named correctly (and what it was computed on)."""
    top, predicted = concept_probs.max(1)
    correct = predicted == torch.as_tensor(true_concepts)
    if correct.any():
        return float(torch.quantile(top[correct], ACCEPT_QUANTILE)), "correct validation answers"
    return float(torch.quantile(top, ACCEPT_QUANTILE)), "all validation images (none named correctly)"


# ----------------------------------------------------------------------------------------------------
# Corruptions: the training augmentations and the quality report's fixed versions.


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` blurred with a per-image Gaussian of std `sigmas[b]` px (0: unchanged); white-padded edges."""
    B, C, H, W = images.shape
    radius = max(1, math.ceil(3 * float(sigmas.max()))) if len(sigmas) else 1
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigmas.clamp_min(1e-3)[:, None] ** 2))  # (B, K)
    kernels = kernels / kernels.sum(1, keepdim=True)
    kernels = kernels.repeat_interleave(C, dim=0)  # (B * 3, K): one kernel per channel of each image
    x = F.pad(images.reshape(1, B * C, H, W), (radius,) * 4, value=1.0)
    x = F.conv2d(x, kernels[:, None, None, :], groups=B * C)  # horizontal
    x = F.conv2d(x, kernels[:, None, :, None], groups=B * C)  # vertical
    return x.view(B, C, H, W)


def jpeg(images: torch.Tensor, qualities: list[int]) -> torch.Tensor:
    """Each image through a JPEG of the given quality (Pillow)."""
    out = []
    for image, quality in zip(images, qualities):
        array = (image.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).byte().numpy()  # (H, W, 3)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        out.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255.0


def shift(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Translate image `b` by `(dx[b], dy[b])` px, filling with white."""
    B, _, H, W = images.shape
    pad = int(max(dx.abs().max(), dy.abs().max(), 1))
    padded = F.pad(images, (pad,) * 4, value=1.0)
    return torch.stack([padded[b, :, pad - int(dy[b]) : pad - int(dy[b]) + H, pad - int(dx[b]) : pad - int(dx[b]) + W]
                        for b in range(B)])  # fmt: skip


def augment(images: torch.Tensor, rng: torch.Generator, round_trips: torch.Tensor | None = None) -> torch.Tensor:
    """
    Training augmentations that look like generated images, each applied to a random half (JPEG: 30%): a shift of up
    to 4 px, colour jitter, blur, noise, JPEG. `round_trips` (the same images through a dVAE) replace 30% of the
    images before the rest.
    """
    B = len(images)

    def some(p: float) -> torch.Tensor:
        return torch.rand(B, generator=rng) < p

    if round_trips is not None:
        images = torch.where(some(0.3)[:, None, None, None], round_trips, images)
    x = shift(images, torch.randint(-4, 5, (B,), generator=rng), torch.randint(-4, 5, (B,), generator=rng))
    pick = some(0.5)  # slight colour jitter: brightness, contrast and saturation within +-10%
    if pick.any():
        y = x[pick]
        factors = 1 + 0.2 * (torch.rand(3, len(y), 1, 1, 1, generator=rng) - 0.5)
        gray = y.mean(1, keepdim=True)
        y = gray + (y - gray) * factors[0]  # saturation
        y = y.mean((1, 2, 3), keepdim=True) + (y - y.mean((1, 2, 3), keepdim=True)) * factors[1]  # contrast
        x[pick] = (y * factors[2]).clamp(0, 1)  # brightness
    pick = some(0.5)
    if pick.any():
        x[pick] = gaussian_blur(x[pick], 0.3 + 1.2 * torch.rand(int(pick.sum()), generator=rng))
    pick = some(0.5)
    if pick.any():
        std = 0.08 * torch.rand(int(pick.sum()), 1, 1, 1, generator=rng)
        x[pick] = (x[pick] + std * torch.randn(x[pick].shape, generator=rng)).clamp(0, 1)
    pick = some(0.3)
    if pick.any():
        x[pick] = jpeg(x[pick], torch.randint(20, 91, (int(pick.sum()),), generator=rng).tolist())
    return x


@torch.no_grad()
def round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """A dVAE round trip (argmax codes) at the dVAE's image size, returned at the input's size."""
    size, side = vae.config.image_size, images.shape[-1]
    x = images if side == size else F.interpolate(images, size=size, mode="bicubic", antialias=True).clamp(0, 1)
    x = vae.decode_code(vae.get_codebook_indices(x.to(vae.device, vae.dtype))).float().clamp(0, 1).cpu()
    return x if side == size else F.interpolate(x, size=side, mode="bicubic", antialias=True).clamp(0, 1)


def corruptions(vae=None) -> dict:
    """The quality report's fixed corruptions: name -> function of a `(B, 3, 64, 64)` batch (seeded)."""
    out = {
        "clean": lambda x: x,
        f"blur_sigma_{BLUR_SIGMA:g}": lambda x: gaussian_blur(x, torch.full((len(x),), BLUR_SIGMA)),
        f"noise_std_{NOISE_STD:g}": lambda x: (x + NOISE_STD * torch.randn(x.shape, generator=torch.Generator()
                                                                          .manual_seed(0))).clamp(0, 1),  # fmt: skip
        f"jpeg_quality_{JPEG_QUALITY}": lambda x: jpeg(x, [JPEG_QUALITY] * len(x)),
        f"shift_{SHIFT_PX}px": lambda x: shift(x, torch.full((len(x),), SHIFT_PX), torch.full((len(x),), -SHIFT_PX)),
    }
    if vae is not None:
        out["dvae_round_trip"] = lambda x: round_trip(vae, x)
    return out


# ----------------------------------------------------------------------------------------------------
# Training.


def is_judge_validation(key: str, style: str) -> bool:
    """Whether the render `(key, style)` is one of the fixed 10% kept out of the judge's training."""
    digest = hashlib.sha256(f"emoji-judge-validation|{key}|{style}".encode()).hexdigest()
    return int(digest, 16) % JUDGE_VALIDATION_MODULUS == 0


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """`(N, H, W, 3)` uint8 -> `(N, 3, H, W)` float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def judge_quality(judge: EmojiJudge, pixels: torch.Tensor, concepts: torch.Tensor, styles: torch.Tensor,
                  vae=None, n_blank: int = 64) -> dict:  # fmt: skip
    """Accuracy under each corruption, the accept threshold and false-accept rates (sets `accept_threshold`)."""
    report: dict = {"n_validation_images": len(pixels), "accuracy": {}}
    clean = None
    for name, corrupt in corruptions(vae).items():
        result = judge.predict(torch.cat([corrupt(batch) for batch in pixels.split(256)]) if len(pixels) else pixels)
        clean = result if clean is None else clean
        report["accuracy"][name] = {
            "concept": float((result["concept_probs"].argmax(1) == concepts).float().mean()),
            "style": float((result["style_probs"].argmax(1) == styles).float().mean()),
        }
    threshold, source = choose_threshold(clean["concept_probs"], concepts)
    judge.config.accept_threshold = threshold
    report["accuracy"]["clean"]["concept_accepted"] = float(accepts(clean["concept_probs"], concepts, threshold)
                                                            .float().mean())  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    white = (1 - 0.02 * torch.rand(n_blank, 3, 64, 64, generator=generator)).clamp(0, 1)
    noise = torch.rand(n_blank, 3, 64, 64, generator=generator)
    report["accept_threshold"] = threshold
    report["accept_rule"] = ("accept concept c iff argmax == c and p(c) >= accept_threshold; accept_threshold is the "
                             f"{ACCEPT_QUANTILE:g} quantile of the top probability over {source}; style: argmax")
    report["false_accept"] = {
        "white": false_accept_rate(judge.predict(white)["concept_probs"], threshold),
        "uniform_noise": false_accept_rate(judge.predict(noise)["concept_probs"], threshold),
        "wrong_concept": false_accept_rate(clean["concept_probs"], threshold, concepts),
        "definition": "the fraction of images accepted for the hardest wrong prompt: blank images (white with "
                      "2% noise, uniform noise) asked for their most likely concept, validation renders asked for "
                      "their most likely wrong concept",
    }  # fmt: skip
    return report


def non_emoji_images(n: int, rng: torch.Generator, size: int = 64) -> torch.Tensor:
    """
    `(n, 3, size, size)` images in [0, 1] that show no emoji, for outlier exposure: a third each of flat colours
    with up to 5% Gaussian noise (half of them near white, the background of every render and what a generator
    draws when it draws nothing), uniform noise, and smooth colour fields (random 4 x 4 colours, bicubic upsampled).
    """
    kind = torch.randint(0, 3, (n,), generator=rng)
    colour = torch.rand(n, 3, 1, 1, generator=rng)
    near_white = 0.9 + 0.1 * torch.rand(n, 1, 1, 1, generator=rng)
    flat = torch.where(torch.rand(n, 1, 1, 1, generator=rng) < 0.5, near_white, colour).expand(n, 3, size, size)
    flat = flat + 0.05 * torch.rand(n, 1, 1, 1, generator=rng) * torch.randn(n, 3, size, size, generator=rng)
    noise = torch.rand(n, 3, size, size, generator=rng)
    smooth = F.interpolate(torch.rand(n, 3, 4, 4, generator=rng), size=(size, size), mode="bicubic",
                           align_corners=False)  # fmt: skip
    images = torch.where((kind == 0)[:, None, None, None], flat, torch.where((kind == 1)[:, None, None, None], noise,
                                                                             smooth))  # fmt: skip
    return images.clamp(0, 1)


def train_judge(
    cache_dir: str,
    out_dir: str,
    epochs: float = 40.0,
    seed: int = 0,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    vae_path: str | None = None,
    max_steps: int | None = None,
    log=print,
    model_config: dict | None = None,
    outlier_fraction: float = 0.1,
) -> dict:
    """
    Train the judge on every render of the cache except a fixed 10% (`is_judge_validation`), report its quality on
    those, and save it (`save_pretrained`, safetensors) with `judge_quality.json` and `train_log.jsonl`.

    Args:
        cache_dir (`str`): the emoji cache (`dalle-hf data emoji --cache DIR`).
        out_dir (`str`): where to save the judge.
        epochs (`float`, *optional*, defaults to 40.0): passes over the training renders (about 8 minutes at the
            ~1,000 images/s measured on one busy core, augmentations included).
        seed (`int`, *optional*, defaults to 0): seeds the initialization, the batches and the augmentations.
        batch_size (`int`, *optional*, defaults to 128): renders per step.
        learning_rate (`float`, *optional*, defaults to 3e-3): AdamW's peak; 3% linear warmup, then cosine to 0.
        vae_path (`str`, *optional*, defaults to `None`): a dVAE (or pipeline) folder; adds dVAE round trips to the
            augmentations and to the quality report.
        max_steps (`int`, *optional*, defaults to `None`): stop after this many steps (tests, throughput probes).
        log (`Callable[[str], None]`, *optional*, defaults to `print`): progress lines.
        model_config (`dict`, *optional*, defaults to `None`): `EmojiJudgeConfig` fields other than the concepts and
            styles (`widths`, `feature_dim`, `dropout`, `image_size`); `None` keeps the config's defaults.
        outlier_fraction (`float`, *optional*, defaults to 0.1): outlier exposure (Hendrycks et al., 2019, "Deep
            Anomaly Detection with Outlier Exposure"): each batch gets this fraction of extra `non_emoji_images`,
            whose concept target is the uniform distribution (weight `OUTLIER_WEIGHT`, no style loss), so that a
            blank or noise image gets no confident concept and the accept threshold rejects it.

    Returns:
        `dict`: the quality report written to `out_dir/judge_quality.json`.
    """
    from ..data.emoji import STYLES, read_emoji_cache

    if not 0.0 <= outlier_fraction < 1.0:
        raise ValueError(f"expected outlier_fraction in [0, 1), got {outlier_fraction}")
    if epochs <= 0 or batch_size < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError(f"expected epochs > 0, batch_size >= 1 and max_steps >= 1 or None, got {epochs}, "
                         f"{batch_size}, {max_steps}")  # fmt: skip
    torch.manual_seed(seed)
    cache = read_emoji_cache(cache_dir)
    keys, style_names = cache.keys.tolist(), cache.styles.tolist()
    concepts = sorted(set(keys))
    styles = [s for s in STYLES if s in set(style_names)]
    concept_index = {c: i for i, c in enumerate(concepts)}
    concept_ids = torch.tensor([concept_index[k] for k in keys])
    style_ids = torch.tensor([styles.index(s) for s in style_names])
    validation = torch.tensor([is_judge_validation(k, s) for k, s in zip(keys, style_names)])
    train_index, val_index = torch.nonzero(~validation)[:, 0], torch.nonzero(validation)[:, 0]
    vae = None
    if vae_path:
        from ..modeling_dvae import DalleVAE

        subfolder = "vae" if os.path.isdir(os.path.join(vae_path, "vae")) else ""
        vae = DalleVAE.from_pretrained(vae_path, subfolder=subfolder).eval()
        # Each training render's round trip once (argmax codes are deterministic): a dVAE call per batch made training
        # ~10x slower (30 round trips/s measured for a 64 px dVAE on one core, against ~1,000 images/s of training).
        log(f"judge: round-tripping {len(train_index)} training renders through the dVAE once")
        round_trips = torch.cat([round_trip(vae, to_pixels(cache.images[batch.numpy()]))
                                 for batch in train_index.split(64)])  # fmt: skip
        round_trips = (round_trips * 255 + 0.5).to(torch.uint8)  # (N_train, 3, 64, 64): a quarter of float32
        row_of = torch.full((len(keys),), -1, dtype=torch.long)
        row_of[train_index] = torch.arange(len(train_index))

    # channels_last: oneDNN's convolutions ran 35% faster in that layout here (208 -> 280 images/s at 64 px, 1 core)
    config = EmojiJudgeConfig(concepts=concepts, styles=styles, **(model_config or {}))
    judge = EmojiJudge(config).to(memory_format=torch.channels_last).train()
    decay = [p for p in judge.parameters() if p.dim() >= 2]
    no_decay = [p for p in judge.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
                                  lr=learning_rate)  # fmt: skip
    steps_per_epoch = max(1, len(train_index) // batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    warmup = max(1, int(0.03 * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    rng = torch.Generator().manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "train_log.jsonl")
    start, step, seen = time.perf_counter(), 0, 0
    log(f"judge: {len(concepts)} concepts, {len(styles)} styles, {len(train_index)} training renders, "
        f"{len(val_index)} validation renders, {total} steps of {batch_size}")  # fmt: skip
    with open(log_path, "w") as log_file:
        while step < total:
            order = train_index[torch.randperm(len(train_index), generator=rng)]
            for batch_index in order.split(batch_size):
                if step >= total or (len(batch_index) < batch_size and len(train_index) >= batch_size):
                    break
                trips = None if vae is None else round_trips[row_of[batch_index]].float() / 255.0
                pixels = augment(to_pixels(cache.images[batch_index.numpy()]), rng, trips)
                n_outliers = round(outlier_fraction * len(batch_index))
                if n_outliers:
                    pixels = torch.cat([pixels, non_emoji_images(n_outliers, rng, pixels.shape[-1])])
                pixels = pixels.contiguous(memory_format=torch.channels_last)
                out = judge(pixels)
                b = len(batch_index)  # the renders come first, then the outliers
                loss = F.cross_entropy(out.concept_logits[:b], concept_ids[batch_index], label_smoothing=0.1) + \
                    F.cross_entropy(out.style_logits[:b], style_ids[batch_index])  # fmt: skip
                if n_outliers:  # cross-entropy to the uniform distribution over concepts
                    loss = loss - OUTLIER_WEIGHT * F.log_softmax(out.concept_logits[b:], dim=-1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step, seen = step + 1, seen + len(batch_index)
                if step % 50 == 0 or step == total:
                    record = {"step": step, "loss": round(loss.item(), 4), "lr": scheduler.get_last_lr()[0],
                              "images_per_s": round(seen / (time.perf_counter() - start), 1)}  # fmt: skip
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    log(json.dumps(record))
    seconds = time.perf_counter() - start
    judge = judge.to(memory_format=torch.contiguous_format).eval()  # safetensors stores contiguous tensors
    report = judge_quality(judge, to_pixels(cache.images[val_index.numpy()]), concept_ids[val_index],
                           style_ids[val_index], vae=vae)  # fmt: skip
    report["validation"] = (f"a fixed {100 // JUDGE_VALIDATION_MODULUS}% of the renders (is_judge_validation: "
                            "sha256 of key|style), kept out of the judge's training; every other render (held-out "
                            "pairs included) trained it")  # fmt: skip
    report["training"] = {"cache": os.path.abspath(cache_dir), "concepts": len(concepts), "styles": styles,
                          "train_images": len(train_index), "steps": step, "batch_size": batch_size,
                          "epochs": round(step / steps_per_epoch, 2), "learning_rate": learning_rate, "seed": seed,
                          "vae": vae_path, "seconds": round(seconds, 1),
                          "images_per_s": round(seen / max(seconds, 1e-9), 1),
                          "torch_threads": torch.get_num_threads(), "widths": config.widths,
                          "feature_dim": config.feature_dim, "dropout": config.dropout,
                          "outlier_fraction": outlier_fraction}  # fmt: skip
    judge.save_pretrained(out_dir)
    with open(os.path.join(out_dir, QUALITY_FILE), "w") as f:
        json.dump(report, f, indent=2)
    log(json.dumps({k: report[k] for k in ("accuracy", "accept_threshold", "false_accept")}, indent=2))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The training flags (`python -m dalle_hf.eval.emoji_judge` and `dalle-hf eval emoji-judge`)."""
    parser = argparse.ArgumentParser(prog="dalle-hf eval emoji-judge", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True, help="the emoji cache (dalle-hf data emoji --cache DIR)")
    parser.add_argument("--out", required=True, help="folder for the judge, judge_quality.json and train_log.jsonl")
    parser.add_argument("--epochs", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=128)
    parser.add_argument("--learning-rate", dest="learning_rate", type=float, default=3e-3)
    parser.add_argument("--vae", default=None, help="a dVAE or pipeline folder: adds dVAE round trips")
    parser.add_argument("--max-steps", dest="max_steps", type=int, default=None, help="stop early (throughput probes)")
    parser.add_argument("--widths", default=None,
                        help="channels of the conv stages, e.g. 64,128,256 (default 32,64,128)")
    parser.add_argument("--feature-dim", dest="feature_dim", type=int, default=None, help="penultimate width (128)")
    parser.add_argument("--dropout", type=float, default=None, help="dropout before the heads (0.2)")
    parser.add_argument("--outlier-fraction", dest="outlier_fraction", type=float, default=0.1,
                        help="extra non-emoji images per batch, trained toward no concept (outlier exposure)")
    args = parser.parse_args(argv)
    try:
        args.widths = [int(w) for w in args.widths.split(",")] if args.widths else None
    except ValueError:
        parser.error(f"expected --widths as comma-separated integers, got {args.widths!r}")
    if not 0.0 <= args.outlier_fraction < 1.0:
        parser.error(f"expected --outlier-fraction in [0, 1), got {args.outlier_fraction}")
    if args.epochs <= 0 or args.batch_size < 1:
        parser.error(f"expected --epochs > 0 and --batch-size >= 1, got {args.epochs} and {args.batch_size}")
    return args


def main(args: argparse.Namespace) -> int:
    model_config = {k: getattr(args, k) for k in ("widths", "feature_dim", "dropout") if getattr(args, k) is not None}
    train_judge(args.cache, args.out, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                learning_rate=args.learning_rate, vae_path=args.vae, max_steps=args.max_steps,
                model_config=model_config, outlier_fraction=args.outlier_fraction)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))


__all__ = [
    "EmojiJudge",
    "EmojiJudgeConfig",
    "EmojiJudgeOutput",
    "accepts",
    "augment",
    "choose_threshold",
    "false_accept_rate",
    "is_judge_validation",
    "non_emoji_images",
    "train_judge",
]
