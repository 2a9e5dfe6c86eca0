"""How far bf16 on the CPU moves DALL·E mini's logits from fp32, on random weights at mini's shapes.

    OMP_NUM_THREADS=1 python benchmarks/bench_dalle_mini_precision.py --out benchmarks/results/dalle_mini_bf16_cpu.json
    python benchmarks/bench_dalle_mini_precision.py --tiny   # seconds, for the test suite

min-dalle's users report that bf16 loses precision; this quantifies ours. One fp32 model (`DalleBartConfig.mini()`,
BART's normal init with std `initializer_range` = 0.02, LayerNorms at 1 and 0) and its bf16 copy (the same weights
rounded, as a user who loads fp32 weights with `dtype=torch.bfloat16` gets them), for each of `--prompts` random
prompts, guided as the pipeline samples (`[uncond ; cond]`, super-conditioning `--guidance`):

1. fp32 greedy generation of 256 codes through the cache; its per-step logits are the reference.
2. Teacher-forced: one forward of `[start ; codes[:255]]` in each precision; the logits at all 256 positions.
3. Step by step through the cache: bf16 fed fp32's codes, one step at a time (the cache stored in bf16); its
   per-step logits against fp32's, by quarter of the image (does the error grow along the cache?).
4. Free-running: bf16 greedy on its own; codes equal to fp32's, and the first position where they part.

Logit differences are over the 16384 sampled columns, per row (uncond and cond) and after guidance
(`uncond + s * (cond - uncond)`, which scales a difference by up to 2s - 1); "top-1 agreement" counts positions whose
argmax of the guided logits is the same given the same prefix. Random weights have flatter logits than trained ones
(smaller top-1 gaps), so agreement here is a pessimistic guide for trained weights.
"""

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dalle_hf.configuration_dalle_bart import DalleBartConfig  # noqa: E402
from dalle_hf.memory_plan import random_dalle_bart  # noqa: E402

TINY = dict(text_vocab_size=300, d_model=64, encoder_layers=2, decoder_layers=2, attention_heads=4, glu_dim=96)


def guided_prompts(config: DalleBartConfig, seed: int) -> torch.LongTensor:
    """`[uncond ; cond]` (2, text_seq_len): `[<s>, </s>]` then padding, and `<s>`, 8 random tokens, `</s>`."""
    ids = torch.full((2, config.text_seq_len), config.text_pad_token_id, dtype=torch.long)
    ids[:, 0], ids[0, 1] = config.text_bos_token_id, config.text_eos_token_id
    ids[1, 1:9] = torch.randint(3, config.text_vocab_size, (8,), generator=torch.Generator().manual_seed(seed))
    ids[1, 9] = config.text_eos_token_id
    return ids


def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(2, ..., V) rows `[uncond ; cond]` -> (..., V): dalle-mini's super-conditioning."""
    return logits[0] + scale * (logits[1] - logits[0])


@torch.no_grad()
def run_steps(model, text, scale: float, feed: torch.LongTensor | None = None):
    """Greedy sampling through the cache, or (`feed`) the given codes fed step by step; returns the codes (N,) and
    the per-step logits (2, N, V) in float32."""
    N = model.config.image_seq_len
    out = model(input_ids=text, use_cache=True, logits_to_keep=1)
    logits = [model.image_logits(out.logits[:, -1]).float()]  # (2, V)
    codes = []
    for i in range(N):
        code = guide(logits[-1], scale).argmax() if feed is None else feed[i]
        codes.append(int(code))
        if i == N - 1:
            break
        logits.append(model.decode_step(torch.full((2, 1), codes[-1]), out.cache).float())
    return torch.tensor(codes), torch.stack(logits, dim=1)  # (N,), (2, N, V)


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "reference_std": b.std().item(),
            "reference_max_abs": b.abs().max().item()}


@torch.no_grad()
def compare(fp32, bf16, text, scale: float) -> dict:
    N = fp32.config.image_seq_len
    start = time.perf_counter()
    codes, step32 = run_steps(fp32, text, scale)
    fp32_s = time.perf_counter() - start
    forced = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        image_ids = codes[: N - 1].expand(2, -1)  # (2, N - 1): the start token is prepended
        forced[name] = model.image_logits(model(input_ids=text, image_ids=image_ids).logits).float()  # (2, N, V)
    _, step16 = run_steps(bf16, text, scale, feed=codes)
    start = time.perf_counter()
    free16, _ = run_steps(bf16, text, scale)
    bf16_s = time.perf_counter() - start
    equal = free16 == codes
    quarters = {}
    for q in range(4):
        span = slice(q * N // 4, (q + 1) * N // 4)
        quarters[f"positions {span.start}-{span.stop - 1}"] = diff(guide(step16[:, span], scale),
                                                                   guide(step32[:, span], scale))
    return {
        "teacher_forced": {
            "rows": diff(forced["bf16"], forced["fp32"]),
            "guided": diff(guide(forced["bf16"], scale), guide(forced["fp32"], scale)),
            "top1_agreement": (guide(forced["bf16"], scale).argmax(-1) == guide(forced["fp32"], scale).argmax(-1))
            .float().mean().item(),
            "fp32_forced_vs_fp32_steps_guided": diff(guide(forced["fp32"], scale), guide(step32, scale)),
        },
        "steps_through_cache": {
            "rows": diff(step16, step32),
            "guided": diff(guide(step16, scale), guide(step32, scale)),
            "guided_by_quarter": quarters,
            "top1_agreement": (guide(step16, scale).argmax(-1) == guide(step32, scale).argmax(-1))
            .float().mean().item(),
        },
        "free_running_greedy": {
            "equal_codes": int(equal.sum()), "of": N,
            "first_difference": None if equal.all() else int((~equal).nonzero()[0]),
            "distinct_codes_fp32": len(set(codes.tolist())),
        },
        "seconds_per_image_greedy": {"fp32": fp32_s, "bf16": bf16_s},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2 + 2 layer, width 64 model (seconds; the test)")
    parser.add_argument("--prompts", type=int, default=2, help="random prompts (seeds 0, 1, ...)")
    parser.add_argument("--guidance", type=float, default=10.0, help="super-conditioning (the pipeline's default)")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    config = DalleBartConfig.mini(**(TINY if args.tiny else {}))
    start = time.perf_counter()
    fp32 = random_dalle_bart(config, dtype=torch.float32, seed=args.seed)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    build_s = time.perf_counter() - start
    runs = []
    for seed in range(args.prompts):
        run = {"prompt_seed": seed, **compare(fp32, bf16, guided_prompts(config, seed), args.guidance)}
        runs.append(run)
        g = run["free_running_greedy"]
        forced, steps = run["teacher_forced"]["guided"], run["steps_through_cache"]["rows"]
        print(f"prompt {seed}: teacher-forced guided max/mean |d| {forced['max_abs']:.4f} / {forced['mean_abs']:.5f}; "
              f"steps rows max/mean {steps['max_abs']:.4f} / {steps['mean_abs']:.5f}; "
              f"greedy {g['equal_codes']}/{g['of']} equal (first difference {g['first_difference']})", flush=True)
    report = {
        "what": __doc__.split("\n")[0], "command": " ".join(["python", "benchmarks/bench_dalle_mini_precision.py",
                                                             *(argv if argv is not None else sys.argv[1:])]),
        "config": config.to_dict() if args.tiny else "DalleBartConfig.mini()", "guidance": args.guidance,
        "weights_seed": args.seed, "init": f"normal std {config.initializer_range}, LayerNorms 1 / 0",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "build_s": build_s, "runs": runs,
        "summary": {
            "greedy_equal": f"{sum(r['free_running_greedy']['equal_codes'] for r in runs)}/"
                            f"{sum(r['free_running_greedy']['of'] for r in runs)}",
            "teacher_forced_rows_max_abs": max(r["teacher_forced"]["rows"]["max_abs"] for r in runs),
            "teacher_forced_rows_mean_abs": sum(r["teacher_forced"]["rows"]["mean_abs"] for r in runs) / len(runs),
            "steps_rows_max_abs": max(r["steps_through_cache"]["rows"]["max_abs"] for r in runs),
            "steps_rows_mean_abs": sum(r["steps_through_cache"]["rows"]["mean_abs"] for r in runs) / len(runs),
            "steps_guided_top1_agreement": sum(r["steps_through_cache"]["top1_agreement"] for r in runs) / len(runs),
            "fp32_logit_std": runs[0]["teacher_forced"]["rows"]["reference_std"],
        },
    }
    print(json.dumps(report["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
