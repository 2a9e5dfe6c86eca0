"""DALL·E mini's VQGAN (taming-transformers' f16 16384, `dalle-mini/vqgan_imagenet_f16_16384`) as diffusers' `VQModel`.

Two sources carry it:

- the Hub's Flax checkpoint, written by vqgan-jax (github.com/patil-suraj/vqgan-jax): the encoder and the decoder,
  named `encoder/down_{i}/block_{j}/conv1/kernel`, `decoder/up_{i}/attn_{j}/q/kernel`, `quantize/embedding/embedding`,
  ..., conv kernels as (kh, kw, in, out);
- min-dalle's `vqgan/detoker.pt`: the decoder only, in taming's torch names (`decoder.up.{i}.block.{j}.conv1.weight`,
  `embedding.weight`, `post_quant_conv.*`).

Both are first put in taming's torch names (Flax: `down_2` -> `down.2`, `kernel` -> `weight` permuted to
(out, in, kh, kw), GroupNorm `scale` -> `weight`), then renamed onto diffusers' `VQModel`: taming's `up.{i}` is
diffusers' `up_blocks.{n - 1 - i}` (taming indexes decoder levels from the full resolution, diffusers in the order
they run), `block` -> `resnets`, `attn` -> `attentions`, `downsample`/`upsample` -> `downsamplers.0`/`upsamplers.0`,
`nin_shortcut` -> `conv_shortcut`, the attention's 1x1 convs `q/k/v/proj_out` -> linear `to_q/to_k/to_v/to_out.0`,
`norm` -> `group_norm`, `mid.block_1/attn_1/block_2` -> `mid_block.resnets.0/attentions.0/resnets.1`, `norm_out` ->
`conv_norm_out`, `embedding` -> `quantize.embedding`. diffusers' VAE blocks use GroupNorm eps 1e-6 as taming and
vqgan-jax do (min-dalle uses torch's default 1e-5: a deviation of min-dalle's).

Pixels live in [0, 1] at both ends, not taming's [-1, 1]: dalle-mini and min-dalle clip the decoder's output to
[0, 1] (`decode_code(...).clip(0, 1)`, no `(x + 1) / 2`), and dalle-mini encoded its training images as webdataset's
`decode("rgb")` gives them, float [0, 1] (`tools/dataset/encode_dataset.ipynb`), with no `2 * x - 1`.
"""

import json
import os
import re
from collections.abc import Iterable, Mapping

import numpy as np
import torch

VQGAN_FLAX_WEIGHTS = "flax_model.msgpack"
# vqgan-jax's `VQGANConfig` defaults, which are taming's f16 layout; the published config sets n_embed / embed_dim.
VQGAN_JAX_DEFAULTS = dict(
    ch=128, out_ch=3, in_channels=3, num_res_blocks=2, resolution=256, z_channels=256, ch_mult=[1, 1, 2, 2, 4],
    attn_resolutions=[16], n_embed=16384, embed_dim=256, double_z=False, resamp_with_conv=True,
)  # fmt: skip


def vqgan_config_from_flax(config_json: Mapping) -> dict:
    """diffusers `VQModel` keyword arguments for a vqgan-jax (taming) `config.json`.

    Each level `i` has `ch * ch_mult[i]` channels at resolution `resolution / 2**i`, with attention where that
    resolution is in `attn_resolutions`; diffusers lists the decoder's levels from the lowest resolution up.

    Raises:
        `ValueError`: for a taming variant `VQModel` cannot express (`double_z`, no resampling convs).
    """
    c = {**VQGAN_JAX_DEFAULTS, **config_json}
    if c["double_z"] or not c["resamp_with_conv"]:
        raise ValueError(f"VQGAN config with double_z={c['double_z']}, resamp_with_conv={c['resamp_with_conv']} is "
                         "not taming's VQGAN layout (expected false, true)")  # fmt: skip
    levels = len(c["ch_mult"])
    has_attention = [c["resolution"] // 2**i in c["attn_resolutions"] for i in range(levels)]
    return dict(
        in_channels=c["in_channels"], out_channels=c["out_ch"],
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in has_attention),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(has_attention)),
        block_out_channels=tuple(c["ch"] * m for m in c["ch_mult"]), layers_per_block=c["num_res_blocks"],
        latent_channels=c["z_channels"], num_vq_embeddings=c["n_embed"], vq_embed_dim=c["embed_dim"],
        norm_num_groups=32, sample_size=c["resolution"],
    )  # fmt: skip


def vqgan_config() -> dict:
    """diffusers `VQModel` keyword arguments for the VQGAN f16 16384 (`dalle-mini/vqgan_imagenet_f16_16384`).

    Example:
        >>> from diffusers import VQModel
        >>> vae = VQModel(**vqgan_config())  # doctest: +SKIP
        >>> vae.config.block_out_channels
        (128, 128, 256, 256, 512)
    """
    return vqgan_config_from_flax({})


def _taming_to_diffusers(key: str, levels: int) -> str:
    """One taming torch key (`decoder.up.3.block.0.nin_shortcut.weight`) -> diffusers' `VQModel` key."""
    if key == "embedding.weight":  # min-dalle keeps the codebook at the top level
        return "quantize.embedding.weight"
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", key)
    key = re.sub(r"\.block\.(\d+)\.", r".resnets.\1.", key)
    key = re.sub(r"\.attn\.(\d+)\.", r".attentions.\1.", key)
    key = re.sub(r"\.(down|up)sample\.", r".\1samplers.0.", key)
    key = key.replace(".mid.block_1.", ".mid_block.resnets.0.").replace(".mid.block_2.", ".mid_block.resnets.1.")
    key = key.replace(".mid.attn_1.", ".mid_block.attentions.0.")
    key = key.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
    if ".attentions." in key:
        key = re.sub(r"\.(q|k|v)\.(weight|bias)$", r".to_\1.\2", key)
        key = re.sub(r"\.proj_out\.", ".to_out.0.", key).replace(".norm.", ".group_norm.")
    return key


def _from_taming(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name = _taming_to_diffusers(key, levels)
        if ".attentions." in name and name.endswith("weight") and value.ndim == 4:  # 1x1 conv -> linear
            value = value[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
        out[name] = value
    return out


def vqgan_state_dict_from_min_dalle(detoker_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """min-dalle's `detoker.pt` state dict (taming's decoder, `embedding.weight`, `post_quant_conv`) -> diffusers'
    `VQModel` keys for `vqgan_config()`: the decoder, `post_quant_conv` and `quantize` (no encoder, no
    `quant_conv`: min-dalle does not ship them)."""
    levels = 1 + max(int(m.group(1)) for k in detoker_state if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    return _from_taming(detoker_state, levels)


def flax_vqgan_to_taming(params: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], dtype=torch.float32):
    """vqgan-jax's Flax keys (`decoder/up_3/block_0/conv1/kernel`) -> taming's torch keys and layouts, leaf by leaf."""
    out = {}
    leaves = params.items() if isinstance(params, Mapping) else params
    for key, array in leaves:
        if key == "quantize/embedding/embedding":
            out["embedding.weight"] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
            continue
        *path, leaf = key.split("/")
        # taming's level lists are ModuleLists (`down.2.block.0`); its middle blocks keep `mid.block_1`, `mid.attn_1`
        name = re.sub(r"(?<!mid\.)\b(down|up|block|attn)_(\d+)", r"\1.\2", ".".join(path))
        if leaf == "kernel":  # (kh, kw, in, out) -> (out, in, kh, kw)
            if array.ndim != 4:
                raise ValueError(f"VQGAN tensor {key!r} of shape {array.shape} is not a conv kernel (kh, kw, in, out)")
            array = array.transpose(3, 2, 0, 1)
        elif leaf not in ("bias", "scale"):
            raise ValueError(f"unexpected VQGAN tensor {key!r} (vqgan-jax writes kernel, bias, scale, embedding)")
        name = f"{name}.{'bias' if leaf == 'bias' else 'weight'}"
        out[name] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    return out


def vqgan_state_dict_from_flax(params, levels: int = 5, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """vqgan-jax's Flax parameters (flat `/` keys, or `iter_flax_msgpack`'s stream) -> diffusers' `VQModel` keys,
    encoder included; `levels` is `len(ch_mult)` (5 for f16)."""
    return _from_taming(flax_vqgan_to_taming(params, dtype), levels)


def _load_strict(vae, state: Mapping[str, torch.Tensor], source: str, allow_missing: tuple[str, ...] = ()):
    """Checks every key and shape (naming `source` and the tensor), then assigns the tensors to `vae` (built on the
    meta device); modules under `allow_missing` are materialized as zeros."""
    expected = vae.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise ValueError(f"{source}: tensor {key!r} is not part of the VQGAN ({type(vae).__name__})")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the VQGAN needs "
                             f"{tuple(expected[key].shape)}")  # fmt: skip
    missing = [k for k in expected if k not in state and not k.startswith(allow_missing)]
    if missing:
        raise ValueError(f"{source}: missing tensor for {missing[0]!r} (and {len(missing) - 1} more)")
    vae.load_state_dict(state, strict=not allow_missing, assign=True)
    for prefix in allow_missing:
        module = vae.get_submodule(prefix.rstrip("."))
        module.to_empty(device="cpu")
        with torch.no_grad():
            for tensor in module.parameters():
                tensor.zero_()


def vqgan_from_flax(folder: str, dtype: torch.dtype = torch.float32):
    """A diffusers `VQModel` (encoder and decoder) from a snapshot of `dalle-mini/vqgan_imagenet_f16_16384`
    (`config.json` + `flax_model.msgpack`), built on the meta device and given the converted tensors.

    Raises:
        `ValueError`: naming the file and the tensor, for a missing, truncated or mismatched file.

    Example:
        >>> vae = vqgan_from_flax("vqgan_imagenet_f16_16384")  # doctest: +SKIP
    """
    from diffusers import VQModel

    from .flax_msgpack import iter_flax_msgpack

    weights, config_path = os.path.join(folder, VQGAN_FLAX_WEIGHTS), os.path.join(folder, "config.json")
    for path in (config_path, weights):
        if not os.path.isfile(path):
            raise ValueError(f"expected the VQGAN's {path} (a snapshot of dalle-mini/vqgan_imagenet_f16_16384)")
    with open(config_path, encoding="utf-8") as f:
        config = vqgan_config_from_flax(json.load(f))
    state = vqgan_state_dict_from_flax(iter_flax_msgpack(weights), len(config["block_out_channels"]), dtype)
    with torch.device("meta"):
        vae = VQModel(**config)
    _load_strict(vae, state, weights)
    return vae.eval()


def vqgan_from_min_dalle(detoker_state: Mapping[str, torch.Tensor], source: str = "detoker.pt"):
    """A diffusers `VQModel` from min-dalle's `detoker.pt` state dict: decoder, `post_quant_conv` and codebook loaded;
    the encoder and `quant_conv` are zeros (min-dalle does not ship them: such a VQGAN decodes but cannot encode)."""
    from diffusers import VQModel

    with torch.device("meta"):
        vae = VQModel(**vqgan_config())
    _load_strict(vae, vqgan_state_dict_from_min_dalle(detoker_state), source, ("encoder.", "quant_conv."))
    return vae.eval()


def decode_codes(vae, codes: torch.Tensor) -> torch.Tensor:
    """Codes (B, h * w) -> images (B, 3, H, W) in [0, 1], as dalle-mini does: look up, decode, clip (no (x+1)/2).

    Example:
        >>> images = decode_codes(vae, torch.zeros(1, 256, dtype=torch.long))  # doctest: +SKIP
    """
    batch, count = codes.shape
    side = int(count**0.5)
    if side * side != count:
        raise ValueError(f"expected a square grid of codes, got {count} per image")
    channels = vae.config.vq_embed_dim
    latents = vae.quantize.get_codebook_entry(codes, (batch, side, side, channels))  # (B, C, h, w)
    return vae.decode(latents, force_not_quantize=True).sample.clamp(0, 1)


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] (as dalle-mini encoded its data, no `2 * x - 1`) -> codes (B, h * w), each the
    nearest codebook entry."""
    latents = vae.encode(images).latents  # (B, C, h, w), after quant_conv
    _, _, (_, _, indices) = vae.quantize(latents)
    return indices.reshape(images.shape[0], -1)


__all__ = [
    "decode_codes",
    "encode_images",
    "flax_vqgan_to_taming",
    "vqgan_config",
    "vqgan_config_from_flax",
    "vqgan_from_flax",
    "vqgan_from_min_dalle",
    "vqgan_state_dict_from_flax",
    "vqgan_state_dict_from_min_dalle",
]
