"""Do two dVAEs give the same codes? After a decoder-only fine-tune (`train_dvae --train_decoder_only`) they must: a
transformer trained on the first one's codes (and its saved `--image_codes` file) stays valid with the second.

    python scripts/check_vae_codes.py --old /work/runs/dvae-emoji32/vae --new /work/runs/dvae-emoji32-dec/vae \
        --cache /work/emoji-cache --codes /work/runs/codes/emoji32.safetensors --n 300 --out report.json

Compares the encoders tensor for tensor, then encodes `--n` training renders (spread over the dataset, the order the
code file was written in) and `--n` held-out renders with both, and, with `--codes`, the training renders' new codes
against the saved ones.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dalle_hf.data.world import load_world
from dalle_hf.training_utils import load_frozen_vae


def same_encoder(old, new) -> bool:
    """Whether two dVAEs' encoders hold the same tensors (names, shapes and values, bit for bit)."""
    a, b = old.encoder.state_dict(), new.encoder.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def code_agreement(old, new, pixel_values: torch.Tensor) -> dict:
    """
    Both dVAEs' argmax codes of the same images.

    Args:
        old, new (`DalleVAE`): the two dVAEs (same `image_size` and `vocab_size`).
        pixel_values (`torch.Tensor`): `(N, 3, H, W)` in `[0, 1]`, at their `image_size`.

    Returns:
        `dict`: `images` (N), `identical_images` (all codes equal), `identical_codes` (the share of equal codes).
    """
    a = old.get_codebook_indices(pixel_values)  # (N, h, w)
    b = new.get_codebook_indices(pixel_values)  # (N, h, w)
    same = (a == b).flatten(1)  # (N, h * w)
    return {"images": len(pixel_values), "identical_images": int(same.all(1).sum()),
            "identical_codes": round(same.float().mean().item(), 6)}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="the dVAE the codes were made with (a vae/ or pipeline folder)")
    parser.add_argument("--new", required=True, help="the fine-tuned dVAE")
    parser.add_argument("--cache", required=True, help="the emoji cache")
    parser.add_argument("--codes", default=None, help="the code file written with --old (train_dalle --image_codes)")
    parser.add_argument("--n", type=int, default=300, help="renders of each kind (training, held-out)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    old, new = load_frozen_vae(args.old), load_frozen_vae(args.new)
    size = old.config.image_size
    if (new.config.image_size, new.config.vocab_size) != (size, old.config.vocab_size):
        raise ValueError(f"the dVAEs differ in image size or codebook: {old.config} / {new.config}")
    world = load_world("emoji", args.cache)
    train = world.train_dataset(size, 0)
    positions = torch.linspace(0, len(train) - 1, min(args.n, len(train))).long().unique()
    train_pixels = torch.stack([train[int(i)]["pixel_values"] for i in positions])  # (n, 3, S, S)
    held_out = world.caption_ranking_set(args.n, 2, seed=0, split="novel").pixel_values  # (n, 3, 64, 64)
    held_out = F.interpolate(held_out, size=size, mode="bicubic", antialias=True).clamp(0, 1)  # as the world resizes
    report = {"old": args.old, "new": args.new, "same_encoder": same_encoder(old, new),
              "training_renders": code_agreement(old, new, train_pixels),
              "held_out_renders": code_agreement(old, new, held_out)}  # fmt: skip
    if args.codes:
        saved = load_file(args.codes)["image_ids"][positions].long()  # (n, h * w)
        now = new.get_codebook_indices(train_pixels).flatten(1)
        report["new_vs_saved_codes"] = {"file": args.codes, "images": len(positions),
                                        "identical_images": int((now == saved).all(1).sum())}  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
