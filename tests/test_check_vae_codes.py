"""scripts/check_vae_codes.py: a decoder-only fine-tune keeps the codes; another encoder does not."""

import os

import torch

from dalle_hf import DalleVAE, DalleVAEConfig

from .conftest import load_script

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "check_vae_codes.py")


def _tiny_vae(seed: int) -> DalleVAE:
    torch.manual_seed(seed)
    config = DalleVAEConfig(image_size=16, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32)
    return DalleVAE(config).eval()


def test_codes_agree_only_with_the_same_encoder():
    script = load_script(SCRIPT)
    old = _tiny_vae(0)
    finetuned = _tiny_vae(1)
    finetuned.encoder.load_state_dict(old.encoder.state_dict())  # a decoder-only fine-tune: another decoder
    pixels = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(old.decoder.state_dict()["blocks.input.w"], finetuned.decoder.state_dict()["blocks.input.w"])
    assert script.same_encoder(old, finetuned)
    assert script.code_agreement(old, finetuned, pixels) == {"images": 8, "identical_images": 8, "identical_codes": 1.0}

    other = _tiny_vae(2)  # another encoder: other codes
    assert not script.same_encoder(old, other)
    report = script.code_agreement(old, other, pixels)
    assert report["identical_images"] < 8 and report["identical_codes"] < 0.5
