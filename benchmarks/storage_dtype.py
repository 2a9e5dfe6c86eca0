"""What storing a checkpoint's transformer and CLIP in bfloat16 costs: the likelihood and CLIP numbers, side by side.

`scripts/assemble_checkpoint.py --storage_dtype bfloat16` halves the transformer's and CLIP's files (the dVAE stays
float32). Loaded without `dtype=`, such a checkpoint also *computes* in bfloat16 (transformers' `dtype="auto"`),
which is what the app does. This measures, on the world's held-out examples, three ways to run the same weights:

- `float32`: the weights as trained, float32 compute;
- `bf16 weights`: every transformer and CLIP weight rounded to bfloat16, float32 compute (`--dtype float32` on a
  bfloat16 checkpoint);
- `bf16 compute`: bfloat16 weights and compute for the transformer and CLIP (loading without `dtype=`).

For each: the transformer's cross-entropy of the held-out images' codes given their captions (bits per image token,
`DallePipeline.code_log_likelihood`, the number compression pays), and CLIP's top-1 retrieval of the true caption
(`World.caption_ranking_set`). Sampled images are compared by `dalle-hf eval emoji --dtype bfloat16` (quoted in
the checkpoint's card).

    OMP_NUM_THREADS=1 python benchmarks/storage_dtype.py --pipeline checkpoints/dalle-emoji --dataset emoji \
        --data-dir /work/emoji-cache --n-images 500 --json benchmarks/results/storage_dtype_dalle-emoji.json
"""

import argparse
import copy
import json
import math
import time

import torch

from dalle_hf import DallePipeline
from dalle_hf.data.world import load_world
from dalle_hf.train_clip import caption_ranking_hits

MODES = ("float32", "bf16 weights", "bf16 compute")


def as_mode(pipe: DallePipeline, mode: str) -> DallePipeline:
    """A copy of `pipe` whose transformer and CLIP run as `mode` (the dVAE is untouched: it stays float32)."""
    if mode not in MODES:
        raise ValueError(f"expected a mode among {MODES}, got {mode!r}")
    pipe = DallePipeline(**{k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v
                            for k, v in pipe.components.items()})  # fmt: skip
    for module in (pipe.transformer, pipe.clip_model):
        if module is None:
            continue
        if mode != "float32":
            module.to(torch.bfloat16)
        if mode == "bf16 weights":
            module.to(torch.float32)  # the rounded values, computed in float32
    return pipe


@torch.no_grad()
def measure(pipe: DallePipeline, examples, ranking) -> dict:
    """Bits per image token on `examples` ((group, image, caption) triples) and CLIP top-1 on `ranking`."""
    images = [image for _, image, _ in examples]
    captions = [caption for _, _, caption in examples]
    codes = pipe.encode_images(images).flatten(1)  # (n, N): the dVAE is the same in every mode, so are the codes
    nats = pipe.code_log_likelihood(codes, pipe.encode_prompt(captions))  # (n,)
    bits_per_token = float(-nats.mean() / codes.shape[1] / math.log(2))
    hits = caption_ranking_hits(pipe.clip_model, pipe.clip_processor, ranking.pixel_values, ranking.candidates)
    return {"bits_per_image_token": round(bits_per_token, 5), "clip_top1": round(float(hits.float().mean()), 4)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--dataset", default="shapes", help="the world: shapes, emoji, ...")
    parser.add_argument("--data-dir", dest="data_dir", default=None, help="its data (emoji: the cache folder)")
    parser.add_argument("--n-images", dest="n_images", type=int, default=500)
    parser.add_argument("--n-captions", dest="n_captions", type=int, default=100, help="CLIP: candidates per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.n_images <= 0:
        raise ValueError(f"--n-images must be > 0, got {args.n_images}")

    start = time.perf_counter()
    world = load_world(args.dataset, args.data_dir)
    examples = world.held_out_examples(args.n_images, seed=args.seed)
    ranking = world.caption_ranking_set(args.n_images, args.n_captions, seed=args.seed)
    pipe = DallePipeline.from_pretrained(args.pipeline, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    results = {mode: measure(as_mode(pipe, mode), examples, ranking) for mode in MODES}
    report = {
        "pipeline": args.pipeline, "dataset": args.dataset, "n_images": len(examples),
        "n_ranking_images": len(ranking.candidates), "n_captions": args.n_captions, "seed": args.seed,
        "torch_threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 1),
        "results": results,
        "bits_per_image_token_change": {mode: round(results[mode]["bits_per_image_token"]
                                                    - results["float32"]["bits_per_image_token"], 5)
                                        for mode in MODES[1:]},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
