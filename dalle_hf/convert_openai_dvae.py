"""Convert OpenAI's released DALL-E dVAE (`encoder.pkl`, `decoder.pkl`) into a [`DalleVAE`] saved with safetensors.

    dalle-hf convert-openai-dvae --encoder encoder.pkl --decoder decoder.pkl --out openai-dvae

OpenAI published the dVAE of "Zero-Shot Text-to-Image Generation" (8192 codes, a 32 x 32 grid at 256 x 256) as
pickled `dall_e.Encoder` / `dall_e.Decoder` modules. `DalleVAE` names its parameters after them
(`blocks.group_1.block_1.res_path.conv_1.w`), so the conversion is a key-for-key copy under `encoder.` and
`decoder.`, guarded by asserts on the key count and every shape (as nanoGPT's `from_pretrained` copies GPT-2).
What differs from OpenAI's classes: nothing in the weights; the architecture hyperparameters are read from the
tensor shapes (OpenAI's encoder and decoder each have their own `n_hid`, here `n_hid` and `decoder_n_hid`); the
pixel mapping (`map_pixels`, eps 0.1) is applied inside `DalleVAE.encode`, and `decode_code` returns
`unmap_pixels(sigmoid(stats[:, :3]))` as OpenAI's notebook does; OpenAI's half-precision convs on CUDA
(`use_float16`) are left to `DalleVAE.to(dtype)`.

No file runs code here: `.safetensors` loads as tensors, and every torch file (a state dict, or OpenAI's pickled
modules) goes through `torch.load(weights_only=True)`, torch's restricted unpickler. For OpenAI's modules it is told
the few classes their pickles name (`OPENAI_PICKLE_CLASSES`), each rebuilt as a plain `nn.Module` that only holds its
parameters: no `dall_e` code is imported or run, and a file naming anything else is refused.
"""

import os
import pickle

import torch
from torch import nn

from .configuration_dvae import DalleVAEConfig
from .modeling_dvae import DalleVAE

OPENAI_IMAGE_SIZE = 256  # paper §2.1: 256 x 256 images; OpenAI's group_count = 4 (8x downsampling) -> 32 x 32 codes
OPENAI_NUM_GROUPS = 4  # OpenAI's `group_count`, fixed in its Encoder and Decoder


# Every class OpenAI's `encoder.pkl` / `decoder.pkl` name (`torch.serialization.get_unsafe_globals_in_checkpoint`):
# their own modules, rebuilt as a plain `nn.Module` (the parameters and submodules are all we read), and torch layers.
OPENAI_MODULES = (
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.decoder.Decoder", "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
)
OPENAI_PICKLE_CLASSES = [(nn.Module, name) for name in OPENAI_MODULES] + [
    nn.Identity, nn.MaxPool2d, nn.ReLU, nn.Sequential, nn.Upsample
]


def load_openai_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from `path`: `.safetensors`, a `torch.save`d state dict, or OpenAI's pickled module.

    Torch files load with `weights_only=True` and the classes in `OPENAI_PICKLE_CLASSES` allowed, so no code from
    the file runs; anything else a pickle names is refused with a `ValueError`.
    """
    if not os.path.isfile(path):
        raise ValueError(f"expected a file with OpenAI's encoder or decoder, got {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        with torch.serialization.safe_globals(OPENAI_PICKLE_CLASSES):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not OpenAI's dVAE or a state dict: torch's weights-only loader refused it ({error})"
        ) from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"expected {path} to hold a dall_e Encoder/Decoder or its state dict, got {type(obj)}")
    return {key: value.float() for key, value in obj.items()}


def config_from_openai(encoder_state: dict, decoder_state: dict) -> DalleVAEConfig:
    """The `DalleVAEConfig` whose shapes match OpenAI's tensors (their widths are read off the convs)."""
    for name, state in (("encoder", encoder_state), ("decoder", decoder_state)):
        if "blocks.input.w" not in state or "blocks.output.conv.w" not in state:
            raise ValueError(f"expected OpenAI's {name} keys ('blocks.input.w', ...), got {sorted(state)[:3]}...")
    n_hid, num_channels = encoder_state["blocks.input.w"].shape[:2]  # (n_hid, 3, 7, 7)
    vocab_size = encoder_state["blocks.output.conv.w"].shape[0]  # (8192, 8 * n_hid, 1, 1)
    n_init, decoder_vocab = decoder_state["blocks.input.w"].shape[:2]  # (n_init, 8192, 1, 1)
    decoder_out, decoder_n_hid = decoder_state["blocks.output.conv.w"].shape[:2]  # (2 * 3, n_hid, 1, 1)
    n_blk_per_group = sum(1 for key in encoder_state if key.startswith("blocks.group_1.") and key.endswith("conv_1.w"))
    if decoder_vocab != vocab_size or decoder_out != 2 * num_channels:
        raise ValueError(
            f"encoder and decoder do not fit: encoder {vocab_size} codes and {num_channels} channels, decoder "
            f"{decoder_vocab} codes and {decoder_out} outputs (expected {2 * num_channels})"
        )
    return DalleVAEConfig(
        image_size=OPENAI_IMAGE_SIZE,
        num_groups=OPENAI_NUM_GROUPS,
        num_channels=int(num_channels),
        vocab_size=int(vocab_size),
        n_hid=int(n_hid),
        decoder_n_hid=None if decoder_n_hid == n_hid else int(decoder_n_hid),
        n_blk_per_group=n_blk_per_group,
        n_init=int(n_init),
    )


def convert_openai_dvae(encoder_state: dict, decoder_state: dict) -> DalleVAE:
    """OpenAI's encoder and decoder state dicts -> a [`DalleVAE`], key for key (asserted count and shapes)."""
    vae = DalleVAE(config_from_openai(encoder_state, decoder_state)).eval()
    ours = vae.state_dict()
    theirs = {f"encoder.{k}": v for k, v in encoder_state.items()}
    theirs |= {f"decoder.{k}": v for k, v in decoder_state.items()}
    assert len(theirs) == len(ours), f"key count: OpenAI {len(theirs)}, DalleVAE {len(ours)}"
    assert theirs.keys() == ours.keys(), f"keys differ: {sorted(theirs.keys() ^ ours.keys())[:5]}"
    with torch.no_grad():
        for key, value in theirs.items():
            assert value.shape == ours[key].shape, f"{key}: OpenAI {tuple(value.shape)}, ours {tuple(ours[key].shape)}"
            ours[key].copy_(value)
    return vae


def convert_openai_dvae_files(encoder_path: str, decoder_path: str, out: str, log=print) -> DalleVAE:
    """Read OpenAI's two files, convert, and `save_pretrained(out)` (config.json + model.safetensors)."""
    vae = convert_openai_dvae(load_openai_state_dict(encoder_path), load_openai_state_dict(decoder_path))
    vae.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in vae.parameters())
    config = vae.config
    log(f"wrote {out}: {len(vae.state_dict())} tensors, {n:,} parameters, {config.vocab_size} codes, "
        f"{config.grid_size}x{config.grid_size} grid at {config.image_size}x{config.image_size}")  # fmt: skip
    return vae


__all__ = ["config_from_openai", "convert_openai_dvae", "convert_openai_dvae_files", "load_openai_state_dict"]
