"""CLIP's caption retrieval on emoji renders at a lower resolution than it was trained at: can a 64 px CLIP rerank a
32 px model's samples?

    python benchmarks/clip_resolution.py --pipeline checkpoints/dalle-emoji --cache /work/emoji-cache \
        --sizes 64,32 --out docs/research/clip_resolution_dalle-emoji.json

EmojiEval's `clip` split at each size: the same renders (a fixed draw of seen and of held-out pairs), resized to the
size as the emoji world resizes training images (bicubic, antialiased) and handed to CLIP, whose processor resizes
them back to its own input size (`clip_pixel_values`, as in reranking); top-1 of the true caption among 100.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

from dalle_hf.data.emoji import EmojiWorld
from dalle_hf.eval.emoji import CLIP_CAPTIONS
from dalle_hf.train_clip import caption_ranking_hits


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="a pipeline folder with clip_model/ and clip_processor/")
    parser.add_argument("--cache", required=True, help="the emoji cache")
    parser.add_argument("--sizes", default="64,32", help="comma-separated image sides")
    parser.add_argument("--n", type=int, default=300, help="renders per group (seen, held out), as EmojiEval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    clip_model = CLIPModel.from_pretrained(args.pipeline, subfolder="clip_model").eval()
    clip_processor = CLIPProcessor.from_pretrained(args.pipeline, subfolder="clip_processor")
    world = EmojiWorld(args.cache)
    results = {"pipeline": args.pipeline, "n_captions": CLIP_CAPTIONS, "n": args.n, "seed": args.seed, "top1": {}}
    for group, split in (("seen", "train"), ("novel", "novel")):
        ranking = world.caption_ranking_set(args.n, CLIP_CAPTIONS, seed=args.seed, split=split)
        for size in (int(s) for s in args.sizes.split(",")):
            pixels = ranking.pixel_values  # (N, 3, 64, 64)
            if pixels.shape[-1] != size:
                pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True).clamp(0, 1)
            with torch.no_grad():
                hits = caption_ranking_hits(clip_model, clip_processor, pixels, ranking.candidates)
            results["top1"][f"{group}_{size}px"] = float(hits.float().mean())
            print(group, size, results["top1"][f"{group}_{size}px"], flush=True)
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
