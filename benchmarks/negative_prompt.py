"""How much a negative prompt helps where the shipped transformer draws the wrong colour.

    OMP_NUM_THREADS=2 python benchmarks/negative_prompt.py --pipeline checkpoints/dalle-shapes \
        --json benchmarks/results/negative_prompt_dalle-shapes.json

For each prompt, `--groups` calls of 16 candidates (seeds 0, 1, ...) with and without a negative prompt: the
prompt with its colour words removed ("a cyan square" -> "a square"). Guidance then pushes along what the colour
word adds, `neg + g * (cond - neg)`, instead of along the whole caption, `uncond + g * (cond - uncond)`. Prints the
checker's pass rate over all samples (one sample) and over CLIP's pick of each 16 (the app's default path).
The held-out pairs of `novel` come first; two seen pairs show the effect where the model is already right.
ShapesEval itself never uses a negative prompt: this measures a user's option, not the reported numbers.
"""

import argparse
import json

import numpy as np
import torch

from dalle_hf import DallePipeline
from dalle_hf.data.shapes import COLORS
from dalle_hf.eval.shapes import check

PROMPTS = (
    "a cyan square",
    "a purple triangle",
    "a green circle",
    "an orange diamond",
    "a green circle and an orange diamond",
    "a red circle",
    "a blue square and a yellow triangle",
)
ARTICLES = ("a", "an")


def without_colours(prompt: str) -> str:
    """Drop the colour words and fix the article: "an orange diamond" -> "a diamond"."""
    words = prompt.split()
    kept = []
    for i, word in enumerate(words):
        if word in COLORS:
            continue
        if word in ARTICLES and i + 1 < len(words) and words[i + 1] in COLORS:
            next_noun = words[i + 2] if i + 2 < len(words) else ""
            word = "an" if next_noun[:1] and next_noun[0] in "aeiou" else "a"
        kept.append(word)
    return " ".join(kept)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default="checkpoints/dalle-shapes")
    parser.add_argument("--groups", type=int, default=16, help="calls of 16 candidates per prompt and setting")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()

    pipe = DallePipeline.from_pretrained(args.pipeline, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    guidance = args.guidance_scale or pipe.config.default_guidance_scale
    rows = []
    print(f"guidance {guidance}, {args.groups} x 16 samples per prompt and setting, bf16, "
          f"{torch.get_num_threads()} threads")
    print(f"{'prompt':38} {'negative':24} {'one sample':>10} {'CLIP pick':>10}")
    for prompt in PROMPTS:
        for negative in (None, without_colours(prompt)):
            samples, picks = [], []
            for group in range(args.groups):
                out = pipe(prompt, num_images_per_prompt=16, guidance_scale=guidance, negative_prompt=negative,
                           generator=torch.Generator().manual_seed(group))
                passed = [check(image, prompt) for image in out.images]  # all 16 kept, in CLIP order: best first
                samples += passed
                picks.append(passed[0])
            row = {"prompt": prompt, "negative_prompt": negative, "one_sample": float(np.mean(samples)),
                   "clip_pick": float(np.mean(picks)), "samples": len(samples)}
            rows.append(row)
            print(f"{prompt:38} {negative or '-':24} {row['one_sample']:10.3f} {row['clip_pick']:10.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"guidance_scale": guidance, "groups": args.groups, "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
