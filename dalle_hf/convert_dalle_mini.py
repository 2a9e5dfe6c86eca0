"""Convert DALL·E mini / Mega (Dayma et al., Apache-2.0) into a dalle-hf pipeline folder.

    dalle-hf convert-dalle-mini --min-dalle pretrained --out dalle-mini          # min-dalle's models_root
    dalle-hf convert-dalle-mini --min-dalle pretrained --out dalle-mega --mega
    dalle-hf convert-dalle-mini --flax dalle-mini-snapshot --vqgan vqgan-snapshot --out dalle-mini

`DalleBartForImageGeneration` names its parameters after min-dalle 0.4.11's (`encoder.` / `decoder.` + its keys),
so converting min-dalle's `encoder.pt` and `decoder.pt` is a key-for-key copy guarded by checks on every key and
shape, each failure naming the file and the tensor. min-dalle's files lack the scales of the LayerNorms dalle-mini
builds without one (min-dalle loads them with `strict=False`, leaving 1); our model has no such parameters. The Flax
path (`--flax`, the published `flax_model.msgpack`) is `dalle_hf.convert_flax_dalle_mini.convert_flax`.

No file runs code: torch files load with `torch.load(weights_only=True)`, torch's restricted unpickler. The output
is a diffusers folder (`model_index.json`, safetensors, configs, the tokenizer, a model card) that carries the
pipeline and model code, as `dalle-hf push` publishes it (`dalle_hf.hub.add_remote_code`): diffusers'
`DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)` loads it with that code, dalle-hf installed or not,
and `DalleMiniPipeline.from_pretrained(OUT)` with dalle-hf's own classes, running none of the folder's code. The
folder is ready to upload as it is (`dalle-hf push OUT org/name` adds the Hub card).
"""

import json
import os
import pickle
import shutil

import torch

from .configuration_dalle_bart import DalleBartConfig
from .modeling_dalle_bart import DalleBartForImageGeneration

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The LayerNorms dalle-mini builds with `use_scale=False` (our `LayerNormNoScale`): a `.weight` of theirs is dropped
# when it is all ones (min-dalle's own modules have one), refused otherwise.
UNSCALED_NORMS = ("pre_self_attn_layer_norm", "pre_encoder_attn_layer_norm", "glu.ln0", "glu.ln1", "final_ln")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
WORD_FREQUENCY_FILE = "enwiki-words-frequency.txt"  # dalle-mini's normalizer reads it when present


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A `torch.save`d state dict, loaded weights-only (memory-mapped when the file allows); `ValueError` naming the
    file when it is missing, truncated, or not a state dict."""
    if not os.path.isfile(path):
        raise ValueError(f"expected a file {path}, found none")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as error:
        raise ValueError(f"{path} is not a readable torch state dict (truncated or another format?): {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"expected {path} to hold a state dict of tensors, got {type(state).__name__}")
    return state


def expected_shapes(config: DalleBartConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for `config`, computed on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = DalleBartForImageGeneration(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _is_unscaled_norm_weight(key: str) -> bool:
    return key.endswith(".weight") and any(f"{name}.weight" in key for name in UNSCALED_NORMS)


def prefixed_state_dict(
    state: dict[str, torch.Tensor], prefix: str, expected: dict[str, tuple[int, ...]], path: str
) -> dict[str, torch.Tensor]:
    """min-dalle's `encoder.pt` / `decoder.pt` keys -> ours (`prefix` + key), checked key by key against `expected`
    (only the keys under `prefix`); every failure names `path` and the tensor."""
    out = {}
    for key, value in state.items():
        ours = prefix + key
        if ours not in expected and _is_unscaled_norm_weight(ours):
            if not torch.equal(value, torch.ones_like(value)):
                raise ValueError(f"{path}: tensor {key!r} is a LayerNorm scale that dalle-mini's model does not have "
                                 "(use_scale=False), and it is not all ones")
            continue
        if ours not in expected:
            raise ValueError(f"{path}: unexpected tensor {key!r} (not a parameter of DALL·E mini / Mega)")
        if tuple(value.shape) != expected[ours]:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}, expected {expected[ours]}")
        if not value.is_floating_point():
            raise ValueError(f"{path}: tensor {key!r} has dtype {value.dtype}, expected floating point weights")
        out[ours] = value
    missing = sorted(k for k in expected if k.startswith(prefix) and k not in out)
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0][len(prefix):]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return out


HEAD_DIM = 64  # both published models: mini 1024 / 16 heads, Mega 2048 / 32 heads (shapes cannot tell heads apart)


def _shape(state: dict, key: str, path: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{path}: missing tensor {key!r}")
    return tuple(state[key].shape)


def _layer_count(state: dict) -> int:
    """Layers in a min-dalle state dict: the distinct `N` of its `layers.N.` keys."""
    return len({key.split(".")[1] for key in state if key.startswith("layers.")})


def config_from_min_dalle(
    encoder_state: dict, decoder_state: dict, paths: tuple[str, str], mega: bool | None
) -> DalleBartConfig:
    """The config whose shapes are those of min-dalle's tensors (heads: `d_model / 64`, as in both published models);
    `mega` given must agree with the width (mini 1024, Mega 2048). Every tensor is checked against it afterwards."""
    encoder_path, decoder_path = paths
    text_vocab_size, d_model = _shape(encoder_state, "embed_tokens.weight", encoder_path)
    text_seq_len = _shape(encoder_state, "embed_positions.weight", encoder_path)[0]
    glu_dim = _shape(encoder_state, "layers.0.glu.fc0.weight", encoder_path)[0]
    image_rows = _shape(decoder_state, "embed_tokens.weight", decoder_path)[0]  # image_vocab_size + 1
    image_seq_len = _shape(decoder_state, "embed_positions.weight", decoder_path)[0]
    layers = [_layer_count(encoder_state), _layer_count(decoder_state)]
    if d_model % HEAD_DIM:
        raise ValueError(f"{encoder_path}: tensor 'embed_tokens.weight' is {d_model} wide, expected a multiple of "
                         f"{HEAD_DIM} (DALL·E mini: 1024, Mega: 2048)")
    if mega is not None and d_model in (1024, 2048) and mega != (d_model == 2048):
        raise ValueError(f"{encoder_path}: the tensors are DALL·E {'Mega' if d_model == 2048 else 'mini'}'s (width "
                         f"{d_model}), but {'Mega (--mega)' if mega else 'mini'} was asked")
    try:
        return DalleBartConfig(
            text_vocab_size=text_vocab_size, image_vocab_size=image_rows - 1, text_seq_len=text_seq_len,
            image_seq_len=image_seq_len, d_model=d_model, encoder_layers=layers[0], decoder_layers=layers[1],
            attention_heads=d_model // HEAD_DIM, glu_dim=glu_dim,
            # dalle-mini starts from 16384 in both published models (Mega's 31 extra rows were never codes)
            sampled_image_vocab_size=min(16384, image_rows - 1), decoder_start_token_id=min(16384, image_rows - 1),
        )  # fmt: skip
    except ValueError as error:
        raise ValueError(f"{encoder_path}, {decoder_path}: the tensor shapes make no DALL·E mini config: {error}")


def vqgan_from_detoker(path: str, dtype: torch.dtype):
    """min-dalle's `vqgan/detoker.pt` (the VQGAN's decoder and codebook only) as a diffusers `VQModel`, through the
    `convert` module's mapping (`dalle_hf.convert_vqgan.vqgan_from_min_dalle`, which names the file and tensor of a
    mismatch); the encoder is left empty, so the pipeline is saved with `vae_has_encoder=False`."""
    from .convert_vqgan import vqgan_from_min_dalle

    return vqgan_from_min_dalle(load_state_dict(path), source=path).to(dtype)


def write_card(out_dir: str, card_info: dict, config: DalleBartConfig, vae_has_encoder: bool) -> None:
    """README.md and the card data `dalle-hf push` publishes it from (`dalle_hf.model_card`, as for the shipped
    checkpoints): the base model, the sources with their authors and licenses, the command, what parity was
    verified; `card_info` holds `source`, `command` and optionally `name` and `parity` (a list of lines)."""
    from .model_card import CARD_DATA_NAME, dalle_mini_card_data, write_model_card

    card_data = dalle_mini_card_data(
        mega=config.d_model == 2048, command=card_info.get("command", ""),
        from_min_dalle=card_info.get("source") == "min-dalle", vae_has_encoder=vae_has_encoder,
        parity=card_info.get("parity"),
    )  # fmt: skip
    if "name" in card_info:
        card_data["name"] = card_info["name"]
    with open(os.path.join(out_dir, CARD_DATA_NAME), "w", encoding="utf-8") as f:
        json.dump(card_data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    write_model_card(out_dir)


def save_converted_pipeline(
    out_dir: str,
    *,
    config: DalleBartConfig,
    transformer_state_dict: dict[str, torch.Tensor],
    vae,
    tokenizer_dir: str,
    clip_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    card_info: dict,
    vae_has_encoder: bool = True,
):
    """Assemble and save a [`DalleMiniPipeline`] from converted weights, with its code (`add_remote_code`, so that
    `DiffusionPipeline.from_pretrained(out_dir, trust_remote_code=True)` loads it too); returns the pipeline.

    The transformer is built on the meta device and takes the state dict's tensors (cast to `dtype`) with
    `assign=True`, so no random weights are allocated first; the load is strict.

    Args:
        out_dir (`str`): the folder to write.
        config (`DalleBartConfig`): the transformer's config.
        transformer_state_dict (`dict[str, torch.Tensor]`): every parameter, in our keys.
        vae (`diffusers.VQModel`): the VQGAN.
        tokenizer_dir (`str`): a folder with `vocab.json` and `merges.txt` (and `enwiki-words-frequency.txt`).
        clip_dir (`str`, *optional*): a transformers `CLIPModel` folder for reranking (its processor too).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): storage dtype of the transformer and VQGAN.
        card_info (`dict`): `source` (a repo id or `"min-dalle"`) and `command` for the model card; `name` optional.
        vae_has_encoder (`bool`, *optional*, defaults to `True`): `False` when the VQGAN's encoder is not converted.
    """
    from transformers import BartTokenizerFast, CLIPModel, CLIPProcessor

    from .hub import add_remote_code
    from .pipeline_dalle_mini import DalleMiniPipeline

    expected = expected_shapes(config)
    missing = sorted(expected.keys() - transformer_state_dict.keys())
    unexpected = sorted(transformer_state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"the transformer's state dict does not fit the config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.device("meta"):
        transformer = DalleBartForImageGeneration(config)
    state = {k: v.to(dtype) for k, v in transformer_state_dict.items()}
    transformer.load_state_dict(state, strict=True, assign=True)
    transformer.eval()

    for name in TOKENIZER_FILES:
        if not os.path.isfile(os.path.join(tokenizer_dir, name)):
            raise ValueError(f"expected the BART tokenizer's {name} in {tokenizer_dir}")
    tokenizer = BartTokenizerFast(
        vocab=os.path.join(tokenizer_dir, "vocab.json"), merges=os.path.join(tokenizer_dir, "merges.txt"),
        model_max_length=config.text_seq_len,
    )  # fmt: skip
    if len(tokenizer) > config.text_vocab_size:
        raise ValueError(f"{tokenizer_dir}/vocab.json has {len(tokenizer)} tokens; the model reads "
                         f"{config.text_vocab_size}")
    clip_model = clip_processor = None
    if clip_dir is not None:
        clip_model, clip_processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)

    pipe = DalleMiniPipeline(
        tokenizer=tokenizer, transformer=transformer, vae=vae.to(dtype).eval(), clip_model=clip_model,
        clip_processor=clip_processor, vae_has_encoder=vae_has_encoder,
    )  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in (*TOKENIZER_FILES, WORD_FREQUENCY_FILE):
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, "tokenizer", name))
    add_remote_code(out_dir)
    write_card(out_dir, card_info, config, vae_has_encoder)  # after the code: the card's load lines say so
    return pipe


def convert_min_dalle(
    models_root: str,
    out_dir: str,
    *,
    mega: bool | None = None,
    dtype: torch.dtype = torch.float32,
    clip_dir: str | None = None,
    command: str | None = None,
):
    """min-dalle's `models_root` (`dalle_bart_mini/` or `dalle_bart_mega/` with `encoder.pt`, `decoder.pt`,
    `vocab.json`, `merges.txt`; `vqgan/detoker.pt`) -> a pipeline folder at `out_dir`; returns the pipeline.

    mini or Mega follows from the tensor shapes; `mega` picks the folder when both exist and must agree with the
    shapes. The VQGAN keeps min-dalle's decoder only (`vae_has_encoder=False`).
    """
    folders = {False: os.path.join(models_root, "dalle_bart_mini"), True: os.path.join(models_root, "dalle_bart_mega")}
    if mega is None:
        present = [m for m, folder in folders.items() if os.path.isdir(folder)]
        if not present:
            raise ValueError(f"expected min-dalle's dalle_bart_mini/ or dalle_bart_mega/ in {models_root}, found none")
        if len(present) > 1:
            raise ValueError(f"{models_root} holds both dalle_bart_mini/ and dalle_bart_mega/: say which (--mega or "
                             "not)")
        mega = present[0]
    folder = folders[mega]
    encoder_path, decoder_path = os.path.join(folder, "encoder.pt"), os.path.join(folder, "decoder.pt")
    encoder_state, decoder_state = load_state_dict(encoder_path), load_state_dict(decoder_path)
    config = config_from_min_dalle(encoder_state, decoder_state, (encoder_path, decoder_path), mega)
    expected = expected_shapes(config)
    state = prefixed_state_dict(encoder_state, "encoder.", expected, encoder_path)
    state |= prefixed_state_dict(decoder_state, "decoder.", expected, decoder_path)
    vae = vqgan_from_detoker(os.path.join(models_root, "vqgan", "detoker.pt"), dtype)
    flag = " --mega" if mega else ""
    card_info = {"source": "min-dalle", "command": command or f"dalle-hf convert-dalle-mini --min-dalle {models_root} "
                 f"--out {out_dir}{flag}"}  # fmt: skip
    return save_converted_pipeline(
        out_dir, config=config, transformer_state_dict=state, vae=vae, tokenizer_dir=folder, clip_dir=clip_dir,
        dtype=dtype, card_info=card_info, vae_has_encoder=False,
    )  # fmt: skip


__all__ = [
    "DTYPES",
    "config_from_min_dalle",
    "convert_min_dalle",
    "expected_shapes",
    "load_state_dict",
    "prefixed_state_dict",
    "save_converted_pipeline",
    "vqgan_from_detoker",
]
