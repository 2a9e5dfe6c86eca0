"""How often a transformer draws each held-out colour/shape pair of `novel`, one sample at a time, no reranking.

    OMP_NUM_THREADS=2 python benchmarks/novel_pairs.py checkpoints/dalle-shapes runs/probe-worddrop-15 \
        --json runs/novel-pairs.json

`novel` asks for the four colour/shape pairs that no training image shows (`HELD_OUT_PAIRS`). CLIP can only pick
a passing candidate when the transformer draws one, so this measures the transformer alone: for each one-phrase
novel caption (and one two-phrase caption), `--groups` calls of 16 samples (generator seeds 100, 101, ...) at the
given guidance, each sample judged by the checker. Every pipeline draws with the same seeds, so two transformers
are compared on the same noise. The mean over the four one-phrase captions is the summary; its standard error at
8 x 16 samples per caption is about 0.02.
"""

import argparse
import json

import numpy as np
import torch

from dalle_hf import DallePipeline
from dalle_hf.eval.shapes import check

ONE_PHRASE = ("a cyan square", "a purple triangle", "a green circle", "an orange diamond")
TWO_PHRASE = ("a green circle and an orange diamond",)


@torch.no_grad()
def pass_rates(path: str, groups: int, guidance_scale: float) -> dict[str, float]:
    pipe = DallePipeline.from_pretrained(path, dtype=torch.bfloat16)
    # The transformer and dVAE without CLIP: every sample is returned, in drawn order.
    generator_only = DallePipeline(tokenizer=pipe.tokenizer, transformer=pipe.transformer, vae=pipe.vae)
    generator_only.set_progress_bar_config(disable=True)
    rates = {}
    for prompt in ONE_PHRASE + TWO_PHRASE:
        passed = []
        for group in range(groups):
            out = generator_only(prompt, num_images_per_prompt=16, guidance_scale=guidance_scale,
                                 generator=torch.Generator().manual_seed(100 + group))
            passed += [check(image, prompt) for image in out.images]
        rates[prompt] = float(np.mean(passed))
    rates["one-phrase mean"] = float(np.mean([rates[p] for p in ONE_PHRASE]))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipelines", nargs="+", help="pipeline folders (a train_dalle output_dir or checkpoints/...)")
    parser.add_argument("--groups", type=int, default=8, help="calls of 16 samples per caption")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    if args.groups < 1:
        raise ValueError(f"--groups must be at least 1, got {args.groups}")

    table = {path: pass_rates(path, args.groups, args.guidance_scale) for path in args.pipelines}
    columns = list(ONE_PHRASE + TWO_PHRASE) + ["one-phrase mean"]
    print(f"per-sample pass rate, guidance {args.guidance_scale}, {args.groups} x 16 samples per caption, bf16, "
          f"{torch.get_num_threads()} threads")
    for column in columns:
        print(f"{column:40} " + "  ".join(f"{table[path][column]:.3f}" for path in args.pipelines))
    print("columns: " + ", ".join(args.pipelines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"guidance_scale": args.guidance_scale, "groups": args.groups, "pass_rate": table}, f, indent=2)


if __name__ == "__main__":
    main()
