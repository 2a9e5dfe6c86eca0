"""Compare CLIP rerankers offline on one fixed bank of generated candidates.

    # once per transformer: draw 16 candidates for each dev prompt (prompt seed 1), check every one
    OMP_NUM_THREADS=1 python benchmarks/rerank_bank.py build --pipeline checkpoints/dalle-shapes \
        --out runs/rerank-bank --tasks novel,counting,position,color_attr,two_object --prompts-per-task 100
    # then, in seconds per reranker: how often each one's pick passes the checker
    OMP_NUM_THREADS=1 python benchmarks/rerank_bank.py score --bank runs/rerank-bank \
        --clip checkpoints/dalle-shapes --clip runs/clip-shapes-ft3

`dalle-hf eval shapes --candidates 16` draws a new set of samples for every run, so two rerankers compared
that way differ by sampling noise as well (a task of 100 prompts moves by several points between seeds). Here
every reranker ranks the same images, so a difference is the reranker's alone. The bank draws exactly what
the evaluation's reranked pass draws for the same prompt seed, seed and batch size (same prompts, same
generator seeds, same batches: `_call_seed(..., "rerank")`), so the pick accuracy of the shipped CLIP here
equals that report's `reranked_accuracy` for those settings.

Prints, per task: the checker's pass rate over all candidates (a random pick), each reranker's pick accuracy,
and the checker's best-of-N (a perfect reranker). Tune on the dev prompt seed (1), never on the reported 0.
"""

import argparse
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from dalle_hf import DallePipeline
from dalle_hf.clip import clip_text_image_scores
from dalle_hf.eval.shapes import _call_seed, _generate, _plan_calls, _validate_tasks, check
from dalle_hf.train_clip import load_pretrained_clip

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@torch.no_grad()
def build(args) -> None:
    pipe = DallePipeline.from_pretrained(args.pipeline, dtype=DTYPES[args.dtype])
    # The same transformer and dVAE without CLIP: the pipeline then returns every candidate in drawn order.
    generator_only = DallePipeline(
        tokenizer=pipe.tokenizer,
        transformer=pipe.transformer,
        vae=pipe.vae,
        default_guidance_scale=pipe.config.default_guidance_scale,
    )
    tasks = _validate_tasks(args.tasks.split(","))
    sampling = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    if args.top_k is not None:
        sampling["top_k"] = args.top_k
    # The calls and generator seeds of evaluate_pipeline's reranked pass, so the two draw the same images.
    plan = _plan_calls(tasks, [("rerank", args.candidates)], args.prompts_per_task, args.prompt_seed, args.batch_size)
    images, prompts, task_of, passed = [], [], [], []
    for task, stage, batch_index, batch in tqdm(plan, desc="bank"):
        seed = _call_seed(args.seed, task, batch_index, stage)
        pil_images, _ = _generate(generator_only, [p.prompt for p in batch], args.candidates, args.candidates, seed,
                                  sampling)  # fmt: skip
        array = np.stack([np.asarray(image.convert("RGB")) for image in pil_images])  # (n * N, H, W, 3) uint8
        for i, eval_prompt in enumerate(batch):
            candidates = array[i * args.candidates : (i + 1) * args.candidates]
            images.append(candidates)
            prompts.append(eval_prompt.prompt)
            task_of.append(task)
            passed.append([check(image, eval_prompt) for image in candidates])
    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "bank.npz"), images=np.stack(images), passed=np.array(passed))
    meta = {"prompts": prompts, "tasks": task_of, "config": {k: v for k, v in vars(args).items() if k != "func"}}
    with open(os.path.join(args.out, "bank.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {len(prompts)} prompts x {args.candidates} candidates to {args.out}")


def load_clip(path: str, dtype: torch.dtype):
    from transformers import CLIPProcessor

    processor_dir = os.path.join(path, "clip_processor")
    if not os.path.isdir(processor_dir):
        raise ValueError(f"{path} has no clip_processor/ folder: pass a pipeline or a train_clip output_dir")
    return load_pretrained_clip(path).to(dtype).eval(), CLIPProcessor.from_pretrained(processor_dir)


@torch.no_grad()
def score(args) -> dict:
    data = np.load(os.path.join(args.bank, "bank.npz"))
    with open(os.path.join(args.bank, "bank.json")) as f:
        meta = json.load(f)
    images, passed = data["images"], data["passed"]  # (P, N, H, W, 3) uint8, (P, N) bool
    tasks = sorted(set(meta["tasks"]), key=meta["tasks"].index)
    task_index = {t: [i for i, x in enumerate(meta["tasks"]) if x == t] for t in tasks}
    table = {"random pick": {t: float(passed[task_index[t]].mean()) for t in tasks}}
    for path in args.clip:
        model, processor = load_clip(path, DTYPES[args.dtype])
        picks = []
        for i in range(len(images)):
            pixels = torch.from_numpy(images[i]).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
            scores = clip_text_image_scores(model, processor, pixels, [meta["prompts"][i]] * len(pixels))
            picks.append(bool(passed[i, int(scores.argmax())]))
        table[path] = {t: float(np.mean([picks[i] for i in task_index[t]])) for t in tasks}
    table["checker best-of-N"] = {t: float(passed[task_index[t]].any(axis=1).mean()) for t in tasks}
    width = max(len(name) for name in table)
    print(f"{'':{width}}  " + "  ".join(f"{t:>11}" for t in tasks))
    for name, row in table.items():
        print(f"{name:{width}}  " + "  ".join(f"{row[t]:11.3f}" for t in tasks))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(required=True)
    b = sub.add_parser("build", help="draw and check the candidates")
    b.add_argument("--pipeline", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--tasks", default="novel,counting,position,color_attr,two_object")
    b.add_argument("--prompts-per-task", type=int, default=100)
    b.add_argument("--candidates", type=int, default=16)
    b.add_argument("--prompt-seed", type=int, default=1, help="1 is the dev split; 0 the reported prompts")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    b.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    b.add_argument("--temperature", type=float, default=None, help="default: the pipeline's own (1)")
    b.add_argument("--top-k", type=int, default=None, help="default: no top-k filter")
    b.set_defaults(func=build)
    s = sub.add_parser("score", help="pick accuracy of each CLIP on the bank")
    s.add_argument("--bank", required=True)
    s.add_argument("--clip", action="append", required=True, help="a pipeline folder or train_clip output_dir")
    s.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    s.add_argument("--json", help="also write the table here")
    s.set_defaults(func=score)
    args = parser.parse_args()
    result = args.func(args)
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
