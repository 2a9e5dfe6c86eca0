"""
Training loss against held-out loss of emoji pipelines: is a run still learning, or memorising its renders?

The emoji world has 13,028 training renders; a transformer on 8 x 8 codes sees each of them dozens of times within
the CPU budget. This scores `--n` training renders and `--n` renders of the held-out (`novel`) concept-style pairs
under each pipeline, teacher-forced with their captions (`"{label} in {style} style"`), and reports the mean
negative log-likelihood per image token, with the caption and without it. A falling training loss with a rising
held-out loss is memorisation. The renders are a fixed draw (the same for every pipeline), resized to each
pipeline's dVAE size as the world's `train_dataset` resizes them.

    python benchmarks/emoji_heldout_loss.py PIPELINE [PIPELINE ...] --cache /work/emoji-cache --n 300 --out loss.json
"""

import argparse
import json
import random

import torch
import torch.nn.functional as F

from dalle_hf import DallePipeline
from dalle_hf.data.emoji import EmojiRenders, read_emoji_cache


def renders_and_captions(cache, split: str, n: int) -> tuple[torch.Tensor, list[str]]:
    """A fixed draw of `n` renders of `split` (`train` or `novel`): `(n, 3, 64, 64)` in [0, 1] and their captions."""
    renders = EmojiRenders.from_cache(cache, split=split)
    chosen = random.Random(f"heldout-loss/{split}").sample(range(len(renders)), min(n, len(renders)))
    items = [renders[i] for i in chosen]
    return torch.stack([item["pixel_values"] for item in items]), [item["text"] for item in items]


@torch.no_grad()
def split_losses(pipe, pixels: torch.Tensor, captions: list[str]) -> dict:
    """Mean nats per image token of `pixels` under `pipe`, given `captions` and given empty text."""
    size = pipe.vae.config.image_size
    if pixels.shape[-1] != size:
        pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True).clamp(0, 1)
    scores = pipe.score(images=pixels, captions=captions)
    n_tokens = scores.image_tokens[0].numel()
    return {"nats_per_token": float(-scores.log_likelihood.mean() / n_tokens),
            "nats_per_token_unconditional": float(-scores.unconditional_log_likelihood.mean() / n_tokens)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipelines", nargs="+", help="Emoji pipeline folders (e.g. one per checkpoint of a run).")
    parser.add_argument("--cache", required=True, help="The emoji cache (`dalle-hf data emoji --cache DIR`).")
    parser.add_argument("--n", type=int, default=300, help="Renders per split.")
    parser.add_argument("--out", default=None, help="Write the report here as JSON.")
    args = parser.parse_args(argv)
    if args.n <= 0:
        raise ValueError(f"expected --n > 0, got {args.n}")

    cache = read_emoji_cache(args.cache)
    data = {split: renders_and_captions(cache, split, args.n) for split in ("train", "novel")}
    report = {"n": args.n, "pipelines": {}}
    for path in args.pipelines:
        pipe = DallePipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        report["pipelines"][path] = {split: split_losses(pipe, *data[split]) for split in data}
        print(path, json.dumps(report["pipelines"][path]), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
