"""Convert the published Flax DALL·E mini / Mega (`dalle-mini/dalle-mini`, `dalle-mini/dalle-mega`) and the VQGAN
(`dalle-mini/vqgan_imagenet_f16_16384`) into a dalle-hf pipeline folder, reading the msgpack files as data.

    dalle-hf convert-dalle-mini --flax dalle-mini-snapshot --vqgan vqgan-snapshot --out dalle-mini

dalle-mini 0.1.5's `DalleBart` (`dalle_mini/model/modeling.py`) names its parameters by Flax module creation order.
Inside a layer (normformer, GLU, no biases, `force_ln_scale=false`, the published configs):

| Flax (inside `FlaxBartEncoderLayer` / `FlaxBartDecoderLayer`) | ours (min-dalle's names) |
|---|---|
| `LayerNorm_0/bias` (no scale)                                 | `pre_self_attn_layer_norm.bias` |
| `FlaxBartAttention_0/{q,k,v,out}_proj/kernel` (in, out)       | `self_attn.{q,k,v,out}_proj.weight` (out, in) |
| `LayerNorm_1/{scale,bias}`                                    | `self_attn_layer_norm.{weight,bias}` |
| `LayerNorm_2/bias` (decoder, no scale)                        | `pre_encoder_attn_layer_norm.bias` |
| `FlaxBartAttention_1/...` (decoder)                           | `encoder_attn....` |
| `LayerNorm_3/{scale,bias}` (decoder)                          | `encoder_attn_layer_norm.{weight,bias}` |
| `GLU_0/{LayerNorm_0/bias, Dense_0, Dense_1, LayerNorm_1/bias, Dense_2}` | `glu.{ln0.bias, fc0, fc1, ln1.bias, fc2}` |

The layers sit under `layers/FlaxBartEncoderLayers/` with a leading layer axis when the model was saved with
`use_scan` (`nn.scan`, `variable_axes={"params": 0}`), else under `layers/FlaxBartEncoderLayer_{i}/`; both are read.
Around the layers: `embed_tokens/embedding`, `embed_positions/embedding`, `layernorm_embedding/{scale,bias}`,
`final_ln/bias` (no scale) per side, and `lm_head/kernel` -> `decoder.lm_head.weight`. Flax `scale` is torch's
`weight`; kernels are transposed. The LayerNorms dalle-mini builds without a scale have no `weight` in our model
either, so nothing is invented.

Memory: DALL·E Mega's file is 10.4 GB. The file is first walked for its shapes only (seeking over the data), so the
config is checked against the tensors before any weight is read; then the leaves stream one at a time
(`iter_flax_msgpack`), each converted (sliced per layer, transposed, cast) and dropped before the next is read, so
the peak is the converted weights plus about two copies of the largest leaf (`benchmarks/convert_memory.py`).
"""

import json
import os
import re
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from .flax_msgpack import flax_msgpack_shapes, iter_flax_msgpack

FLAX_WEIGHTS_NAME = "flax_model.msgpack"  # transformers' FLAX_WEIGHTS_NAME
FLAX_CONFIG_NAME = "config.json"
VQGAN_CODES = 16384  # the VQGAN f16 16384's codebook: Mega's extra image-vocabulary rows are never sampled

# Variant switches of dalle-mini's config that change the architecture, with the value our model implements (also
# dalle-mini 0.1.5's default, used when the published config.json omits the field).
SUPPORTED_VARIANT = {
    "ln_positions": "normformer", "ln_type": "layernorm", "use_glu": True, "use_bias": False,
    "force_ln_scale": False, "use_head_scale": False, "use_cosine_attention": False,
    "use_swin_position_embeddings": False, "use_absolute_position_embeddings": True, "use_alibi": False,
    "sinkhorn_iters": 1, "scale_embedding": False, "use_final_ln_encoder": True, "use_final_ln_decoder": True,
    "activation_function": "gelu", "tie_word_embeddings": False,
}  # fmt: skip

# Per-layer Flax names -> ours; `weight` marks a kernel to transpose (Flax Dense is (in, out), torch Linear (out, in)).
_ATTENTION = {f"{p}_proj/kernel": f"{p}_proj.weight" for p in ("q", "k", "v", "out")}
_GLU = {
    "GLU_0/LayerNorm_0/bias": "glu.ln0.bias", "GLU_0/Dense_0/kernel": "glu.fc0.weight",
    "GLU_0/Dense_1/kernel": "glu.fc1.weight", "GLU_0/LayerNorm_1/bias": "glu.ln1.bias",
    "GLU_0/Dense_2/kernel": "glu.fc2.weight",
}  # fmt: skip
ENCODER_LAYER_KEYS = {
    "LayerNorm_0/bias": "pre_self_attn_layer_norm.bias",
    **{f"FlaxBartAttention_0/{k}": f"self_attn.{v}" for k, v in _ATTENTION.items()},
    "LayerNorm_1/scale": "self_attn_layer_norm.weight", "LayerNorm_1/bias": "self_attn_layer_norm.bias",
    **_GLU,
}  # fmt: skip
DECODER_LAYER_KEYS = {
    **{k: v for k, v in ENCODER_LAYER_KEYS.items() if not k.startswith("GLU_0")},
    "LayerNorm_2/bias": "pre_encoder_attn_layer_norm.bias",
    **{f"FlaxBartAttention_1/{k}": f"encoder_attn.{v}" for k, v in _ATTENTION.items()},
    "LayerNorm_3/scale": "encoder_attn_layer_norm.weight", "LayerNorm_3/bias": "encoder_attn_layer_norm.bias",
    **_GLU,
}  # fmt: skip
SIDE_KEYS = {
    "embed_tokens/embedding": "embed_tokens.weight", "embed_positions/embedding": "embed_positions.weight",
    "layernorm_embedding/scale": "layernorm_embedding.weight", "layernorm_embedding/bias": "layernorm_embedding.bias",
    "final_ln/bias": "final_ln.bias",
}  # fmt: skip
_LAYER = re.compile(r"model/(encoder|decoder)/layers/FlaxBart(?:Encoder|Decoder)Layer(s|_(\d+))/(.+)")


def flax_key_to_ours(flax_key: str) -> tuple[str, bool, bool] | None:
    """`(our key, with "{i}" for the layer index, is_kernel, is_scanned)` for a dalle-mini key; `None` if unknown.

    Example:
        >>> flax_key_to_ours("model/decoder/layers/FlaxBartDecoderLayers/GLU_0/Dense_2/kernel")
        ('decoder.layers.{i}.glu.fc2.weight', True, True)
    """
    if flax_key == "lm_head/kernel":
        return "decoder.lm_head.weight", True, False
    match = _LAYER.fullmatch(flax_key)
    if match:
        side, scanned, index, rest = match.groups()
        name = (ENCODER_LAYER_KEYS if side == "encoder" else DECODER_LAYER_KEYS).get(rest)
        if name is None:
            return None
        layer = "{i}" if scanned == "s" else index
        return f"{side}.layers.{layer}.{name}", rest.endswith("kernel"), scanned == "s"
    for side in ("encoder", "decoder"):
        prefix = f"model/{side}/"
        if flax_key.startswith(prefix) and flax_key[len(prefix):] in SIDE_KEYS:
            return f"{side}.{SIDE_KEYS[flax_key[len(prefix):]]}", False, False
    return None


def config_kwargs_from_flax(config_json: dict, shapes: Mapping[str, tuple[int, ...]], source: str = "") -> dict:
    """`DalleBartConfig` keyword arguments from dalle-mini's `config.json`, checked against the tensor shapes.

    Args:
        config_json (`dict`): the published `config.json` (dalle-mini's `DalleBartConfig`, `model_type` "dallebart").
        shapes (`Mapping[str, tuple[int, ...]]`): Flax key -> shape (`flax_msgpack_shapes`), or arrays.
        source (`str`, *optional*): the folder, for error messages.

    Raises:
        `ValueError`: for a variant our model does not implement, or a config field its tensor contradicts.
    """
    where = source or "the Flax checkpoint"
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    if config_json.get("model_type") != "dallebart":
        raise ValueError(f"{where}: expected dalle-mini's config (model_type 'dallebart'), got "
                         f"{config_json.get('model_type')!r}")  # fmt: skip
    for field, supported in SUPPORTED_VARIANT.items():
        if config_json.get(field, supported) != supported:
            raise ValueError(f"{where}/config.json: {field}={config_json[field]!r} is a dalle-mini variant dalle-hf "
                             f"does not implement (expected {supported!r}, as in the published mini and Mega)")
    for side in ("encoder", "decoder"):
        if config_json.get(f"{side}_attention_heads") != config_json.get("encoder_attention_heads"):
            raise ValueError(f"{where}/config.json: encoder and decoder attention heads differ")
        if config_json.get(f"{side}_ffn_dim") != config_json.get("encoder_ffn_dim"):
            raise ValueError(f"{where}/config.json: encoder_ffn_dim and decoder_ffn_dim differ")

    def dim(flax_key: str, axis: int) -> int:
        if flax_key not in shapes:
            raise ValueError(f"{where}/{FLAX_WEIGHTS_NAME}: missing tensor {flax_key!r}")
        return shapes[flax_key][axis]

    def layer_count(side: str) -> int:
        cls = "Encoder" if side == "encoder" else "Decoder"
        stacked = f"model/{side}/layers/FlaxBart{cls}Layers/FlaxBartAttention_0/q_proj/kernel"
        if stacked in shapes:
            return shapes[stacked][0]
        return len({m.group(3) for k in shapes if (m := _LAYER.fullmatch(k)) and m.group(1) == side})

    glu_key = next((k for k in shapes if k.startswith("model/encoder/layers/") and k.endswith("GLU_0/Dense_0/kernel")),
                   "model/encoder/layers/FlaxBartEncoderLayers/GLU_0/Dense_0/kernel")  # fmt: skip
    found = {
        "encoder_vocab_size": ("text_vocab_size", dim("model/encoder/embed_tokens/embedding", 0)),
        "image_vocab_size": ("image_vocab_size", dim("model/decoder/embed_tokens/embedding", 0) - 1),
        "max_text_length": ("text_seq_len", dim("model/encoder/embed_positions/embedding", 0)),
        "image_length": ("image_seq_len", dim("model/decoder/embed_positions/embedding", 0)),
        "d_model": ("d_model", dim("model/encoder/embed_tokens/embedding", 1)),
        "encoder_layers": ("encoder_layers", layer_count("encoder")),
        "decoder_layers": ("decoder_layers", layer_count("decoder")),
        "encoder_ffn_dim": ("glu_dim", dim(glu_key, -1)),
    }
    kwargs = {}
    for field, (ours, value) in found.items():
        if config_json.get(field) != value:
            raise ValueError(f"{where}: config.json says {field}={config_json.get(field)!r} but the tensors of "
                             f"{FLAX_WEIGHTS_NAME} say {value} (truncated or mismatched files?)")
        kwargs[ours] = value
    kwargs["attention_heads"] = config_json["encoder_attention_heads"]
    kwargs["decoder_start_token_id"] = config_json.get("decoder_start_token_id", kwargs["image_vocab_size"])
    kwargs["sampled_image_vocab_size"] = min(VQGAN_CODES, kwargs["image_vocab_size"])
    return kwargs


def config_from_flax(config_json: dict, params: Mapping, source: str = ""):
    """A [`DalleBartConfig`] from dalle-mini's `config.json`, checked against `params` (arrays or shapes by Flax key).

    Example:
        >>> config = config_from_flax(json.load(open("dalle-mini/config.json")),
        ...                           flax_msgpack_shapes("dalle-mini/flax_model.msgpack"))  # doctest: +SKIP
        >>> config.glu_dim  # doctest: +SKIP
        2730
    """
    from .configuration_dalle_bart import DalleBartConfig

    return DalleBartConfig(**config_kwargs_from_flax(config_json, params, source))


def flax_to_state_dict(
    params: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    config,
    *,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype = torch.float32,
    source: str = "the Flax params",
) -> dict[str, torch.Tensor]:
    """dalle-mini's Flax parameters -> our state dict (min-dalle's keys), one leaf at a time.

    Args:
        params (`Mapping[str, np.ndarray]` or an iterable of `(key, array)`):
            Flax keys joined by `/` (`read_flax_msgpack`), or the stream of `iter_flax_msgpack`: each leaf is
            converted and dropped before the next is read. Scanned and unscanned layouts are both read.
        config (`DalleBartConfig`):
            Gives the layer counts.
        expected_shapes (`Mapping[str, tuple[int, ...]]`, *optional*):
            Our key -> shape; defaults to `DalleBartForImageGeneration(config)`'s, built on the meta device.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Each tensor is cast as it is converted (no float32 copy of the whole model is kept).
        source (`str`, *optional*):
            The file, named in errors.

    Raises:
        `ValueError`: naming `source` and the tensor, for an unknown, missing, repeated or wrongly shaped tensor.

    Example:
        >>> state = flax_to_state_dict(iter_flax_msgpack("dalle-mini/flax_model.msgpack"), config)  # doctest: +SKIP
    """
    if expected_shapes is None:
        from .convert_dalle_mini import expected_shapes as model_shapes

        expected_shapes = model_shapes(config)
    layers = {"encoder": config.encoder_layers, "decoder": config.decoder_layers}
    state: dict[str, torch.Tensor] = {}
    leaves = params.items() if isinstance(params, Mapping) else params
    for flax_key, array in leaves:
        mapped = flax_key_to_ours(flax_key)
        if mapped is None:
            raise ValueError(f"{source}: unexpected tensor {flax_key!r} (not part of dalle-mini's normformer GLU "
                             "layout, e.g. a LayerNorm scale of a force_ln_scale model)")  # fmt: skip
        key, is_kernel, scanned = mapped
        side = key.split(".", 1)[0]
        if scanned:
            if array.ndim == 0 or array.shape[0] != layers[side]:
                raise ValueError(f"{source}: tensor {flax_key!r} of shape {array.shape} should stack "
                                 f"{layers[side]} {side} layers on its first axis")  # fmt: skip
            pieces = [(key.format(i=i), array[i]) for i in range(layers[side])]
        else:
            pieces = [(key, array)]
        for name, value in pieces:
            if name in state:
                raise ValueError(f"{source}: tensor {flax_key!r} gives {name!r} a second time (mixed layouts?)")
            if name not in expected_shapes:
                raise ValueError(f"{source}: tensor {flax_key!r} maps to {name!r}, which the model does not have")
            shape = value.shape[::-1] if is_kernel else value.shape
            if tuple(shape) != tuple(expected_shapes[name]):
                raise ValueError(f"{source}: tensor {flax_key!r} has shape {tuple(value.shape)}; {name!r} needs "
                                 f"{tuple(expected_shapes[name])}" + (" transposed" if is_kernel else ""))  # fmt: skip
            value = value.T if is_kernel else value  # (in, out) -> (out, in)
            state[name] = torch.from_numpy(np.ascontiguousarray(value)).to(dtype)
        del array, pieces, value  # drop the leaf before the next is read
    missing = [k for k in expected_shapes if k not in state]
    if missing:
        raise ValueError(f"{source}: missing tensor for {missing[0]!r} (and {len(missing) - 1} more)")
    return state


def resolve_snapshot(path_or_repo_id: str, allow_patterns: list[str]) -> str:
    """A local folder as is; otherwise a Hub repo id through `huggingface_hub.snapshot_download` (its cache, or
    `HF_HUB_OFFLINE=1` for a cached snapshot without network)."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    if path_or_repo_id.count("/") != 1 or os.path.exists(path_or_repo_id):
        raise ValueError(f"expected a snapshot folder or a Hub repo id (org/name), got {path_or_repo_id!r}")
    from huggingface_hub import snapshot_download

    return snapshot_download(path_or_repo_id, allow_patterns=allow_patterns)


def load_flax_dalle_mini(
    flax_dir: str, *, dtype: torch.dtype = torch.float32, expected_shapes: Mapping[str, tuple[int, ...]] | None = None
):
    """`(config, state_dict)` from a dalle-mini snapshot folder: `config.json` checked against the tensor shapes
    (read from the msgpack headers first), then the weights streamed through `flax_to_state_dict`.

    Raises:
        `ValueError`: naming the file and the tensor, for a missing, truncated or mismatched file.
    """
    weights = os.path.join(flax_dir, FLAX_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        sharded = os.path.isfile(weights + ".index.json")
        raise ValueError(f"expected {weights}" + (" (sharded Flax checkpoints are not supported)" if sharded else ""))
    config_path = os.path.join(flax_dir, FLAX_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(f"expected dalle-mini's {config_path}")
    with open(config_path, encoding="utf-8") as f:
        config = config_from_flax(json.load(f), flax_msgpack_shapes(weights), flax_dir)
    state = flax_to_state_dict(
        iter_flax_msgpack(weights), config, expected_shapes=expected_shapes, dtype=dtype, source=weights
    )
    return config, state


def convert_flax(
    flax_dir: str,
    vqgan_dir: str,
    out_dir: str,
    *,
    clip_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    command: str | None = None,
):
    """A local snapshot (or repo id) of `dalle-mini/dalle-mini` or `dalle-mini/dalle-mega` plus one of
    `dalle-mini/vqgan_imagenet_f16_16384` -> a dalle-hf pipeline folder at `out_dir`; returns the pipeline.

    Args:
        flax_dir (`str`): folder (or repo id) with `config.json`, `flax_model.msgpack`, `vocab.json`, `merges.txt`
            (and `enwiki-words-frequency.txt`, the text normalizer's word list, copied along when present).
        vqgan_dir (`str`): folder (or repo id) with the VQGAN's `config.json` and `flax_model.msgpack`.
        out_dir (`str`): the folder to write.
        clip_dir (`str`, *optional*): a transformers `CLIPModel` folder for reranking.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): storage dtype.
        command (`str`, *optional*): the command line, for the model card.

    Raises:
        `ValueError`: naming the file and the tensor, for a missing, truncated or mismatched file.

    Example:
        >>> pipe = convert_flax("dalle-mini-snapshot", "vqgan-snapshot", "dalle-mini")  # doctest: +SKIP
    """
    from .convert_dalle_mini import save_converted_pipeline
    from .convert_vqgan import vqgan_from_flax

    patterns = ["config.json", FLAX_WEIGHTS_NAME, "vocab.json", "merges.txt", "enwiki-words-frequency.txt"]
    folder = resolve_snapshot(flax_dir, patterns)
    vqgan_folder = resolve_snapshot(vqgan_dir, ["config.json", FLAX_WEIGHTS_NAME])
    config, state = load_flax_dalle_mini(folder, dtype=dtype)
    vae = vqgan_from_flax(vqgan_folder, dtype=dtype)
    published = "dalle-mini/dalle-mega" if config.d_model == 2048 else "dalle-mini/dalle-mini"  # a local snapshot's
    card_info = {"source": flax_dir if folder != flax_dir else published, "command": command or (
        f"dalle-hf convert-dalle-mini --flax {flax_dir} --vqgan {vqgan_dir} --out {out_dir}")}  # fmt: skip
    return save_converted_pipeline(
        out_dir, config=config, transformer_state_dict=state, vae=vae, tokenizer_dir=folder, clip_dir=clip_dir,
        dtype=dtype, card_info=card_info, vae_has_encoder=True,
    )  # fmt: skip


__all__ = [
    "config_from_flax",
    "config_kwargs_from_flax",
    "convert_flax",
    "flax_key_to_ours",
    "flax_to_state_dict",
    "load_flax_dalle_mini",
    "resolve_snapshot",
]
