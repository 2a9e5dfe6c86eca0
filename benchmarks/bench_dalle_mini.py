"""dalle-hf's DALL·E mini against min-dalle 0.4.11, on the same random weights at DALL·E mini's shapes.

    python benchmarks/bench_dalle_mini.py [--repeats 3] [--threads 2] [--out benchmarks/results/bench_dalle_mini.json]
    python benchmarks/bench_dalle_mini.py --tiny --repeats 1     # a smoke run on tiny shapes, seconds

Writes min-dalle-format random weights once (`encoder.pt`, `decoder.pt` of min-dalle's own modules, default torch
init, seed 0) and loads them into both implementations: min-dalle's classes directly, ours through
`convert_dalle_mini.prefixed_state_dict` (the converter's key-for-key check). Each measurement is a separate process
(so peak RSS is that implementation's alone), runs alternate between the two, and the medians are reported.

What is timed: text ids -> 256 image codes per image, super-conditioning 10 (batch `[uncond ; cond]`), for one image
and for a 3 x 3 grid, top-k 256, in float32 and bfloat16. dalle-hf samples with `DalleMiniPipeline`'s own sampling
loop (`sample_image_tokens`); min-dalle with its `generate_raw_image_stream` loop on its `DalleBartDecoder` (the
loop of `tests/dalle_bart_reference.py`, min-dalle's code with the start token as a parameter; CPU autocast for its
bfloat16, the CPU counterpart of its CUDA autocast). VQGAN decoding is not timed: it is the same diffusers
`VQModel` work whichever transformer drew the codes. A greedy run per implementation (float32, one image, both
starting from 16384) checks the codes are equal token for token.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dalle_hf.configuration_dalle_bart import DalleBartConfig  # noqa: E402

PROMPT_IDS = [0, 58, 4758, 2990, 58, 6282, 2]  # a fixed 5-word prompt between <s> and </s>
SUPERCONDITION = 10.0


def bench_config(tiny: bool) -> DalleBartConfig:
    if tiny:
        return DalleBartConfig.mini(d_model=128, attention_heads=2, glu_dim=96, encoder_layers=2, decoder_layers=2)
    return DalleBartConfig.mini()


def text_rows(config: DalleBartConfig) -> torch.LongTensor:
    """`[uncond ; cond]` (2, 64): `[<s>, </s>]` then padding, and the prompt then padding."""
    text = torch.full((2, config.text_seq_len), config.text_pad_token_id, dtype=torch.long)
    text[0, :2] = torch.tensor([config.text_bos_token_id, config.text_eos_token_id])
    text[1, : len(PROMPT_IDS)] = torch.tensor(PROMPT_IDS)
    return text


def make_weights(folder: str, tiny: bool) -> None:
    from tests.dalle_bart_reference import min_dalle_modules

    torch.manual_seed(0)
    encoder, decoder = min_dalle_modules(bench_config(tiny))
    torch.save(encoder.state_dict(), os.path.join(folder, "encoder.pt"))
    torch.save(decoder.state_dict(), os.path.join(folder, "decoder.pt"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def run_ours(config, weights: str, images: int, dtype, top_k: int, seed: int) -> torch.LongTensor:
    from dalle_hf.convert_dalle_mini import expected_shapes, load_state_dict, prefixed_state_dict
    from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
    from dalle_hf.pipeline_dalle_mini import DalleMiniPipeline
    from tests.dalle_bart_reference import tiny_vqgan

    expected = expected_shapes(config)
    state = {}
    for prefix in ("encoder", "decoder"):
        path = os.path.join(weights, f"{prefix}.pt")
        state |= prefixed_state_dict(load_state_dict(path), f"{prefix}.", expected, path)
    with torch.device("meta"):
        model = DalleBartForImageGeneration(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    del state
    pipe = DalleMiniPipeline(tokenizer=None, transformer=model.eval(), vae=tiny_vqgan())
    pipe.set_progress_bar_config(disable=True)
    cond = text_rows(config)[1:].repeat(images, 1)  # (n, 64)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    tokens = pipe.sample_image_tokens(cond, None, 1.0, top_k, None, SUPERCONDITION, generator, None, None)
    return tokens, time.perf_counter() - start


@torch.no_grad()
def run_min_dalle(config, weights: str, images: int, dtype, top_k: int, seed: int) -> torch.LongTensor:
    from dalle_hf.convert_dalle_mini import load_state_dict
    from tests.dalle_bart_reference import min_dalle_generate, min_dalle_modules

    with torch.device("meta"):
        encoder, decoder = min_dalle_modules(config)
    for module, name in ((encoder, "encoder.pt"), (decoder, "decoder.pt")):
        module.load_state_dict(load_state_dict(os.path.join(weights, name)), strict=True, assign=True)
        module.to(dtype)  # as MinDalle(dtype=...) does
    text = text_rows(config)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        tokens = min_dalle_generate(encoder, decoder, text, images, start_token=config.decoder_start_token_id,
                                    top_k=top_k, supercondition_factor=SUPERCONDITION, seed=seed)  # fmt: skip
    return tokens, time.perf_counter() - start


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    run = {"dalle-hf": run_ours, "min-dalle": run_min_dalle}[args.impl]
    tokens, seconds = run(bench_config(args.tiny), args.weights, args.images, dtype, args.top_k, args.seed)
    torch.save(tokens, args.tokens_out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}))


def measure(args, impl: str, images: int, dtype: str, top_k: int, weights: str, tokens_out: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--images", str(images),
               "--dtype", dtype, "--top-k", str(top_k), "--weights", weights, "--threads", str(args.threads),
               "--tokens-out", tokens_out] + (["--tiny"] if args.tiny else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ROOT}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{impl} {images} {dtype} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {impl:9s} images={images} {dtype:8s} top_k={top_k:3d}: {result['seconds']:7.2f} s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per setting (one image, float32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the script")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_dalle_mini.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("dalle-hf", "min-dalle"), help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--top-k", dest="top_k", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--tokens-out", dest="tokens_out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    # (images, dtype, top_k, repeats): the headline first, then the rest once or twice to stay near 10 minutes
    settings = [(1, "float32", 256, args.repeats), (1, "float32", 1, 1), (1, "bfloat16", 256, max(1, args.repeats - 1)),
                (9, "float32", 256, 1), (9, "bfloat16", 256, 1)]  # fmt: skip
    results = {"config": {"shapes": "tiny" if args.tiny else "DALL·E mini (12 + 12 layers, width 1024, GLU 2730)",
                          "threads": args.threads, "supercondition": SUPERCONDITION, "image_tokens": 256,
                          "torch": torch.__version__, "cpu_count": os.cpu_count()},
               "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as weights:
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import benchmarks."
                        f"bench_dalle_mini as b; b.make_weights({weights!r}, {args.tiny})"], check=True, cwd=ROOT)
        for images, dtype, top_k, repeats in settings:
            print(f"images={images} {dtype} top_k={top_k}, {repeats} alternating repeat(s)", flush=True)
            row = {"images": images, "dtype": dtype, "top_k": top_k, "dalle-hf": [], "min-dalle": []}
            for r in range(repeats):
                order = ("dalle-hf", "min-dalle") if r % 2 == 0 else ("min-dalle", "dalle-hf")
                for impl in order:
                    out = os.path.join(weights, f"{impl}-{images}-{dtype}-{top_k}-{r}.pt")
                    row[impl].append({**measure(args, impl, images, dtype, top_k, weights, out), "tokens": out})
            for impl in ("dalle-hf", "min-dalle"):
                row[f"{impl}_median_s"] = statistics.median(m["seconds"] for m in row[impl])
                row[f"{impl}_peak_rss_mb"] = max(m["peak_rss_mb"] for m in row[impl])
            row["speedup"] = row["min-dalle_median_s"] / row["dalle-hf_median_s"]
            if top_k == 1:
                ours, theirs = (torch.load(row[i][0]["tokens"], weights_only=True) for i in ("dalle-hf", "min-dalle"))
                row["greedy_tokens_equal"] = int((ours == theirs).sum())
                row["greedy_tokens_total"] = ours.numel()
            for impl in ("dalle-hf", "min-dalle"):
                for m in row[impl]:
                    m.pop("tokens")
            print(f"  -> dalle-hf {row['dalle-hf_median_s']:.2f} s, min-dalle {row['min-dalle_median_s']:.2f} s: "
                  f"{row['speedup']:.2f}x" + (f"; greedy tokens equal {row['greedy_tokens_equal']}/"
                                               f"{row['greedy_tokens_total']}" if top_k == 1 else ""), flush=True)
            results["runs"].append(row)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
