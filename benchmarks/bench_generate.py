"""Generation speed and memory per precision and batch size, against the machine's measured matmul peak.

    python benchmarks/bench_generate.py [--pipeline checkpoints/dalle-shapes] [--threads 2] [--repeats 3]
    python benchmarks/bench_generate.py --scaling            # cost vs image tokens (64 -> 256 -> 1024)

For each config (`shipped`: the checkpoint, or a random model of its size when it is missing; `large`: a random
24 x 1024 transformer, 256 image tokens, same vocabularies), precision (fp32, bf16, int8-dynamic, bnb-int8) and
batch size (1, 16, 64) a fresh worker process loads the model the way a user would and measures:

- prefill (text) and one decode step around the middle of the image (attention is linear in position, so the
  middle step is the mean step), `--steps` steps per repeat, min and median over `--repeats`;
- image tokens/s = B * N / (prefill + (N - 1) * step); images/s also counts the dVAE decode of B images;
- time to a 4-of-16 grid: the real `pipe(prompt, num_images_per_prompt=16, num_images_to_keep=4)` with CLIP
  reranking when a checkpoint is loaded, else the estimate above at batch 16 (marked ~);
- the blocks' Linear layers alone on `(B, 1, C)` rows ("linears ms"): what a step would cost if attention,
  norms and op dispatch were free, so the precision ratio a faster step loop could at most reach;
- peak RSS of the worker, bytes of the transformer's weights (`dalle_hf.quantization.weight_bytes`);
- matmul FLOP/s of the decode step (2 x params of the blocks and image head + attention over the cache) as a
  fraction of the peak measured in the same run with a large matmul: fp32 and bf16 `torch.mm`, int8 a large
  dynamic-int8 Linear (bnb-int8 is compared with it too: on CPU its matmul is int8 as well).

Timings are wall clock (what a user waits); the load average at start is printed since other processes on a
2-core machine slow small ops a lot. Quoted in docs/performance.md; never asserted in tests.
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

PRECISIONS = ("fp32", "bf16", "int8-dynamic", "bnb-int8")
SHIPPED = dict(
    text_vocab_size=512, text_seq_len=16, image_vocab_size=512, image_grid_size=16, n_layer=6, n_head=4, n_embd=256
)
LARGE = dict(SHIPPED, n_layer=24, n_head=16, n_embd=1024)
VAE = dict(image_size=64, num_groups=3, n_hid=32, n_blk_per_group=2, vocab_size=512)  # the shipped dVAE's size
PROMPT = "a red circle left of a blue square"


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def matmul_peaks(repeats: int, n: int = 2048) -> dict[str, float]:
    """FLOP/s of a large matmul per kernel dtype: the best of `repeats`."""
    from dalle_hf.quantization import quantize_dynamic_int8

    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        peaks[name] = 2 * n**3 / min(timed(lambda: torch.mm(a, b), repeats))
    linear = quantize_dynamic_int8(torch.nn.Sequential(torch.nn.Linear(n, n)))
    x = torch.randn(n, n)
    linear(x)
    peaks["int8"] = 2 * n**3 / min(timed(lambda: linear(x), repeats))
    return peaks


def dalle_config(name: str):
    from dalle_hf.configuration_dalle import DalleConfig

    if name.startswith("grid"):  # the shipped size at another image grid (scaling with image tokens)
        return DalleConfig(**dict(SHIPPED, image_grid_size=int(name[4:])))
    return DalleConfig(**(LARGE if name == "large" else SHIPPED))


def save_random_transformer(name: str, folder: str) -> str:
    from dalle_hf.modeling_dalle import DalleForImageGeneration

    path = os.path.join(folder, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        DalleForImageGeneration(dalle_config(name)).save_pretrained(path)
    return path


def load(config_name: str, precision: str, pipeline_path: str | None, folder: str):
    """(pipeline or None, transformer, vae), loaded through the public APIs."""
    from dalle_hf.loading import load_pipeline
    from dalle_hf.configuration_dvae import DalleVAEConfig
    from dalle_hf.modeling_dalle import DalleForImageGeneration
    from dalle_hf.modeling_dvae import DalleVAE
    from dalle_hf.quantization import quantize_dynamic_int8

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if config_name == "shipped" and pipeline_path:
        quantization = {"int8-dynamic": "int8-dynamic", "bnb-int8": "bnb-int8"}.get(precision, "none")
        pipe = load_pipeline(pipeline_path, "bfloat16" if precision == "bf16" else "float32", quantization)
        pipe.set_progress_bar_config(disable=True)
        return pipe, pipe.transformer, pipe.vae
    kwargs = {"dtype": dtype}
    if precision == "bnb-int8":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    model = DalleForImageGeneration.from_pretrained(save_random_transformer(config_name, folder), **kwargs).eval()
    if precision == "int8-dynamic":
        quantize_dynamic_int8(model)
    torch.manual_seed(0)
    vae_config = DalleVAEConfig(**dict(VAE, image_size=4 * model.config.image_grid_size))  # 3 groups: 4x down
    return None, model, DalleVAE(vae_config).eval().to(dtype)


def block_linears(model, batch: int):
    """A function running each block's Linear layers once on random `(batch, 1, in_features)` rows, as a decode
    step does, and nothing else."""
    layers = [m for block in model.h for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(batch, 1, m.in_features, generator=g).to(model.bos_embedding.dtype) for m in layers]

    def run():
        for layer, x in zip(layers, inputs):
            layer(x)

    return run


def step_flops(config, batch: int, position: int) -> float:
    C, n = config.n_embd, config.n_layer
    linear = n * 12 * C * C + C * config.image_vocab_size  # blocks (qkv, proj, 2 x MLP) + the image head
    attention = n * 2 * position * C  # q.k and att.v over `position` cached keys
    return 2 * batch * (linear + attention)


@torch.no_grad()
def worker(args) -> dict:
    from dalle_hf.quantization import weight_bytes

    torch.set_num_threads(args.threads)
    pipe, model, vae = load(args.config, args.precision, args.pipeline, args.folder)
    config = model.config
    B, N, L = args.batch, config.image_seq_len, config.text_seq_len
    text = torch.randint(3, config.text_vocab_size, (B, L), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, config.image_vocab_size, (B, 1), generator=torch.Generator().manual_seed(1))
    middle = 1 + L + N // 2

    prefill = timed(lambda: model(input_ids=text, use_cache=True, logits_to_keep=1), args.repeats)
    cache = model(input_ids=text, use_cache=True, logits_to_keep=1).cache

    def steps():
        cache.length = middle  # the cost of a step depends on the position, not on the cached values
        for _ in range(args.steps):
            model.decode_step(ids, cache)

    steps()  # warm-up
    step = [t / args.steps for t in timed(steps, args.repeats)]
    run_linears = block_linears(model, B)
    run_linears()  # warm-up
    linears = [t / args.steps for t in timed(lambda: [run_linears() for _ in range(args.steps)], args.repeats)]
    codes = torch.randint(0, config.image_vocab_size, (B, N), generator=torch.Generator().manual_seed(2))
    decode = timed(lambda: vae.decode_code(codes), args.repeats)

    grid = None
    if pipe is not None and B == 16:
        grid = timed(
            lambda: pipe(
                PROMPT, num_images_per_prompt=16, num_images_to_keep=4, generator=torch.Generator().manual_seed(0)
            ),
            args.repeats,
        )
    return {
        "config": args.config, "precision": args.precision, "batch": B, "image_tokens": N,
        "layers": config.n_layer, "width": config.n_embd, "threads": torch.get_num_threads(),
        "prefill": prefill, "step": step, "linears": linears, "vae_decode": decode, "grid": grid,
        "flops_per_step": step_flops(config, B, middle),
        "weight_bytes": weight_bytes(model),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def summarize(r: dict, peaks: dict) -> dict:
    med = statistics.median
    N, B = r["image_tokens"], r["batch"]
    sampling = med(r["prefill"]) + (N - 1) * med(r["step"])
    sampling_min = min(r["prefill"]) + (N - 1) * min(r["step"])
    peak_key = {"fp32": "fp32", "bf16": "bf16", "int8-dynamic": "int8", "bnb-int8": "int8"}[r["precision"]]
    flops = r["flops_per_step"] / med(r["step"])
    if r["grid"] is not None:
        grid = f"{med(r['grid']):.2f} (min {min(r['grid']):.2f})"
    elif B == 16:
        grid = f"~{sampling + med(r['vae_decode']):.2f}"
    else:
        grid = ""
    return {
        "config": f"{r['config']} {r['layers']}x{r['width']}",
        "precision": r["precision"],
        "batch": B,
        "step ms (med/min)": f"{1e3 * med(r['step']):.1f}/{1e3 * min(r['step']):.1f}",
        "linears ms": f"{1e3 * med(r['linears']):.1f}",
        "image tokens/s (med/best)": f"{B * N / sampling:,.0f}/{B * N / sampling_min:,.0f}",
        "images/s": f"{B / (sampling + med(r['vae_decode'])):.2f}",
        "4-of-16 grid s": grid,
        "peak RSS MB": f"{r['peak_rss'] / 2**20:,.0f}",
        "weights MB": f"{r['weight_bytes'] / 2**20:.1f}",
        "GFLOP/s": f"{flops / 1e9:.0f}",
        "% peak (own)": f"{100 * flops / peaks[peak_key]:.0f}",
        "% bf16 peak": f"{100 * flops / peaks['bf16']:.0f}",
    }


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pipeline",
        default="checkpoints/dalle-shapes",
        help="the shipped checkpoint (random model of its size if missing)",
    )
    parser.add_argument("--configs", default="shipped,large")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--steps", type=int, default=8, help="decode steps timed per repeat, around the middle position"
    )
    parser.add_argument(
        "--scaling", action="store_true", help="cost vs image tokens: the shipped size at 8x8, 16x16, 32x32"
    )
    parser.add_argument(
        "--folder", default=os.path.join(tempfile.gettempdir(), "dalle_hf_bench_generate"), help="random checkpoints"
    )
    parser.add_argument("--out", default=None, help="write the raw results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline and not os.path.exists(os.path.join(args.pipeline, "model_index.json")):
        args.pipeline = None
    if args.worker:
        print(json.dumps(worker(args)))
        return
    torch.set_num_threads(args.threads)

    if args.scaling:
        configs, precisions = ["grid8", "grid16", "grid32"], args.precisions.split(",")
        batches = [int(b) for b in args.batches.split(",")]
    else:
        configs, precisions, batches = (
            args.configs.split(","),
            args.precisions.split(","),
            [int(b) for b in args.batches.split(",")],
        )
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    shipped = args.pipeline or f"random model of the shipped size ({args.pipeline or 'checkpoint missing'})"
    print(f"threads={args.threads} repeats={args.repeats} steps={args.steps} load average at start: {load_avg}; "
          f"shipped = {shipped}; torch {torch.__version__}")
    peaks = matmul_peaks(args.repeats)
    print("matmul peak (2048^3, best of repeats): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))

    results, rows = [], []
    for config in configs:
        for precision in precisions:
            for batch in batches:
                cmd = [sys.executable, __file__, "--worker", "--config", config, "--precision", precision,
                       "--batch", str(batch), "--threads", str(args.threads), "--repeats", str(args.repeats),
                       "--steps", str(args.steps), "--folder", args.folder, "--pipeline", args.pipeline or ""]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"{config} {precision} batch {batch}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(result)
                rows.append(summarize(result, peaks))
                print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
    print()
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"peaks": peaks, "threads": args.threads, "load_average": load_avg, "results": results}, f, indent=1
            )


if __name__ == "__main__":
    main()
