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

Unpickling runs code from the file, so it happens only here, in this one explicit command, and it says so: a
plain state dict (`torch.save(module.state_dict())`) or a `.safetensors` file loads without unpickling any code.
A pickled module needs OpenAI's package importable (`pip install --no-deps DALL-E==0.1 attrs`).
"""

import os

import torch

from .configuration_dvae import DalleVAEConfig
from .modeling_dvae import DalleVAE

OPENAI_IMAGE_SIZE = 256  # paper §2.1: 256 x 256 images; OpenAI's group_count = 4 (8x downsampling) -> 32 x 32 codes
OPENAI_NUM_GROUPS = 4  # OpenAI's `group_count`, fixed in its Encoder and Decoder


def load_openai_state_dict(path: str, log=print) -> dict[str, torch.Tensor]:
    """A state dict from `path`: `.safetensors`, a `torch.save`d state dict, or OpenAI's pickled module.

    A state dict is read with `torch.load(weights_only=True)` (no code runs). Anything else is unpickled with
    `weights_only=False`, announced through `log`, because a pickle can execute code: only for files you trust.
    """
    if not os.path.isfile(path):
        raise ValueError(f"expected a file with OpenAI's encoder or decoder, got {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a plain state dict: a pickled module (OpenAI's release)
        log(f"unpickling {path} (a pickle can run code: convert only files you trust, e.g. OpenAI's own release)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as error:
            raise ValueError(
                f"{path} is a pickled module of OpenAI's `dall_e` package ({error}); install it with "
                "`pip install --no-deps DALL-E==0.1 attrs`, or pass a state dict"
            ) from None
    if isinstance(obj, torch.nn.Module):
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
    vae = convert_openai_dvae(load_openai_state_dict(encoder_path, log), load_openai_state_dict(decoder_path, log))
    vae.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in vae.parameters())
    config = vae.config
    log(f"wrote {out}: {len(vae.state_dict())} tensors, {n:,} parameters, {config.vocab_size} codes, "
        f"{config.grid_size}x{config.grid_size} grid at {config.image_size}x{config.image_size}")  # fmt: skip
    return vae


__all__ = ["config_from_openai", "convert_openai_dvae", "convert_openai_dvae_files", "load_openai_state_dict"]
