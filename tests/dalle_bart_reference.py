"""min-dalle 0.4.11's model classes as the reference for the DALL·E mini parity tests and benchmark, and tiny
random DALL·E mini parts.

`import min_dalle.models` would run `min_dalle/__init__.py`, which imports `min_dalle.min_dalle`: that turns autograd
off, sets the thread count to every core and needs `requests`. Its `models/` folder is loaded here by path as a
package of its own instead, so nothing of it runs but the three model files.
"""

import importlib.util
import sys
from pathlib import Path

import torch

from dalle_hf.configuration_dalle_bart import DalleBartConfig


def load_min_dalle_models():
    """min-dalle's `models` package (`DalleBartEncoder`, `DalleBartDecoder`, `VQGanDetokenizer`), side-effect free."""
    name = "_min_dalle_models_reference"
    if name not in sys.modules:
        root = Path(importlib.util.find_spec("min_dalle").submodule_search_locations[0]) / "models"
        spec = importlib.util.spec_from_file_location(
            name, root / "__init__.py", submodule_search_locations=[str(root)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def min_dalle_modules(config: DalleBartConfig):
    """min-dalle's encoder and decoder built with `config`'s shapes (random weights, eval mode)."""
    models = load_min_dalle_models()
    if config.image_seq_len != 256:
        raise ValueError("min-dalle's decoder has 256 image positions (IMAGE_TOKEN_COUNT)")
    encoder = models.DalleBartEncoder(
        layer_count=config.encoder_layers, embed_count=config.d_model, attention_head_count=config.attention_heads,
        text_vocab_count=config.text_vocab_size, text_token_count=config.text_seq_len, glu_embed_count=config.glu_dim,
        device="cpu",
    )  # fmt: skip
    decoder = models.DalleBartDecoder(
        image_vocab_count=config.image_vocab_size, embed_count=config.d_model,
        attention_head_count=config.attention_heads, glu_embed_count=config.glu_dim,
        layer_count=config.decoder_layers, device="cpu",
    )  # fmt: skip
    return encoder.eval(), decoder.eval()


def load_into_min_dalle(state_dict: dict, encoder, decoder) -> None:
    """Our state dict into min-dalle's modules, as min-dalle loads its files (`strict=False`: the LayerNorms without
    a scale keep min-dalle's weight of 1). Asserts nothing else is missing or unexpected."""
    for prefix, module in (("encoder.", encoder), ("decoder.", decoder)):
        part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        result = module.load_state_dict(part, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        assert all(k.endswith(".weight") and is_unscaled_norm(k) for k in result.missing_keys), result.missing_keys


UNSCALED_NORMS = ("pre_self_attn_layer_norm", "pre_encoder_attn_layer_norm", "glu.ln0", "glu.ln1", "final_ln")


def is_unscaled_norm(key: str) -> bool:
    """Whether a min-dalle key belongs to a LayerNorm that dalle-mini builds without a scale."""
    return any(f"{name}." in key or key.startswith(f"{name}.") for name in UNSCALED_NORMS)


@torch.no_grad()
def min_dalle_generate(
    encoder, decoder, text_tokens: torch.LongTensor, image_count: int, *, start_token: int, top_k: int,
    supercondition_factor: float, temperature: float = 1.0, seed: int | None = None,
) -> torch.LongTensor:
    """min-dalle 0.4.11's `generate_raw_image_stream` loop on its own modules, with the start token as a parameter
    (min-dalle hard-codes 2 ** 14 - 1). `text_tokens` (2, L) is `[uncond ; cond]`. Returns (image_count, 256)."""
    encoder_state = encoder.forward(text_tokens)
    expanded = [0] * image_count + [1] * image_count
    text_tokens, encoder_state = text_tokens[expanded], encoder_state[expanded]
    attention_mask = text_tokens.not_equal(1)[:, None, None, :]
    attention_state = torch.zeros(decoder.layer_count, image_count * 4, 256, decoder.embed_count)
    image_tokens = torch.full((image_count, 257), start_token, dtype=torch.long)
    if seed is not None:
        torch.manual_seed(seed)
    token_indices = torch.arange(256)
    settings = torch.tensor([temperature, top_k, supercondition_factor], dtype=torch.float32)
    for i in range(256):
        image_tokens[:, i + 1], attention_state = decoder.sample_tokens(
            settings=settings, attention_mask=attention_mask, encoder_state=encoder_state,
            attention_state=attention_state, prev_tokens=image_tokens[:, [i]], token_index=token_indices[[i]],
        )  # fmt: skip
    return image_tokens[:, 1:]


def tiny_bart_config(**overrides) -> DalleBartConfig:
    """2 + 2 layers, width 32, the real image vocabulary (min-dalle samples from `logits[..., :2 ** 14]` and has
    256 image positions, so those stay) and a small text vocabulary."""
    kwargs = dict(
        text_vocab_size=300, text_seq_len=64, image_seq_len=256, d_model=32, encoder_layers=2, decoder_layers=2,
        attention_heads=4, glu_dim=48,
    )  # fmt: skip
    kwargs.update(overrides)
    return DalleBartConfig(**kwargs)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random, LayerNorm scales near 1 and biases away from 0, so no mapping can pass by chance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "layer_norm" in name or "layernorm" in name or ".ln" in name or "final_ln" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(std * noise)
    return model.eval()


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 characters byte-level BPE writes bytes as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


TINY_MERGES = ["Ġ a", "Ġ c", "a t", "Ġc at", "Ġ h", "Ġh at", "Ġ w", "e a", "Ġ r", "e d"]


def write_tiny_bart_tokenizer(folder) -> None:
    """`vocab.json` and `merges.txt` of a tiny BART byte-level BPE (271 tokens: `<s>`=0, `<pad>`=1, `</s>`=2)."""
    import json
    import os

    tokens = ["<s>", "<pad>", "</s>", "<unk>", *byte_alphabet(), *(m.replace(" ", "") for m in TINY_MERGES), "<mask>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(dict.fromkeys(tokens))}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")


def tiny_vqgan(seed: int = 0):
    """A diffusers `VQModel` with the VQGAN's codebook size (16384 codes) and a 2x downsampling: 16 x 16 codes
    <-> 32 x 32 images."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, latent_channels=4,
        num_vq_embeddings=16384, vq_embed_dim=4, norm_num_groups=4, sample_size=32,
    ).eval()  # fmt: skip
