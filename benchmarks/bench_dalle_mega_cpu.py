"""DALL·E Mega on this CPU in bf16, random weights at Mega's shapes: peak RSS to load, seconds per guided image.

    OMP_NUM_THREADS=1 python benchmarks/bench_dalle_mega_cpu.py --out benchmarks/results/dalle_mega_cpu_bf16.json
    python benchmarks/bench_dalle_mega_cpu.py --tiny   # seconds, for the test suite

1. Build: `random_dalle_bart` makes the model on the `meta` device and materializes it in bf16 (no float32 copy
   ever exists), with the model's own init; peak RSS before and after.
2. Load: the model saved with `save_pretrained` (safetensors, bf16) is loaded by
   `DalleBartForImageGeneration.from_pretrained(dir, dtype=torch.bfloat16)` in a fresh process, as a user loads a
   converted Mega; that process's peak RSS (`VmHWM`) after the imports, after loading and after reading every
   weight once, and the seconds. `--no-load` skips it (it writes 5.2 GB to `--folder`).
3. Sample: one guided image (`[uncond ; cond]`, super-conditioning 10, top-k 256: min-dalle's default; the
   draw is a small part of a step) through the cache: the prompt's prefill, then `--steps` steps timed from the
   start; seconds per image extrapolated as prefill + 255 x the mean step (a step attends more cached positions
   later, so the later steps are timed too: 8 steps at the middle and 8 at the end); with `--full`, the whole
   256-step image is also timed.
4. Decode (before `--full`'s image): a random VQGAN f16 16384 (`VQGAN_F16_16384`, a diffusers `VQModel`)
   decodes one 16 x 16 grid of codes to 256 x 256 pixels in bf16.

The threads are `torch.get_num_threads()` (set `OMP_NUM_THREADS`).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dalle_hf.configuration_dalle_bart import DalleBartConfig  # noqa: E402
from dalle_hf.memory_plan import VQGAN_F16_16384, dalle_bart_weight_bytes, random_dalle_bart  # noqa: E402

GB = 1e9
TINY = dict(text_vocab_size=300, d_model=64, encoder_layers=2, decoder_layers=2, attention_heads=4, glu_dim=96,
            image_vocab_size=16415)
VQGAN_TINY = dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, latent_channels=4,
                  num_vq_embeddings=16384, vq_embed_dim=4, norm_num_groups=4, sample_size=32)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# In the child, ru_maxrss would start from the parent's RSS (Linux keeps the high-water mark across fork and exec):
# /proc/self/status's VmHWM belongs to the new address space. from_pretrained may map the safetensors file and read
# pages only when touched, so the peak is taken again after every weight has been read once.
LOAD_SCRIPT = """
import json, sys, time
import torch

def vm(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
imported = vm("VmHWM")
start = time.perf_counter()
model = DalleBartForImageGeneration.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
seconds = time.perf_counter() - start
loaded = vm("VmHWM")
with torch.no_grad():
    for p in model.parameters():
        p.sum()
print(json.dumps({"seconds": seconds, "peak_rss_after_imports": imported, "peak_rss_after_load": loaded,
                  "peak_rss": vm("VmHWM"), "rss_end": vm("VmRSS"),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


def measure_load(model, folder: str) -> dict:
    """Save in bf16, then load in a fresh process and report its peak RSS."""
    path = os.path.join(folder, "dalle-mega-random-bf16")
    start = time.perf_counter()
    model.save_pretrained(path)
    save_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, path], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"loading failed: {proc.stderr[-2000:]}")
    return {"save_s": save_s, "safetensors_bytes": size, **json.loads(proc.stdout.strip().splitlines()[-1])}


def guided_text(config: DalleBartConfig) -> torch.LongTensor:
    """`[uncond ; cond]` (2, text_seq_len): `[<s>, </s>]` and `<s>`, 8 random tokens, `</s>`, then padding."""
    ids = torch.full((2, config.text_seq_len), config.text_pad_token_id, dtype=torch.long)
    ids[:, 0], ids[0, 1] = config.text_bos_token_id, config.text_eos_token_id
    ids[1, 1:9] = torch.randint(3, config.text_vocab_size, (8,), generator=torch.Generator().manual_seed(0))
    ids[1, 9] = config.text_eos_token_id
    return ids


def draw(logits: torch.Tensor, scale: float, top_k: int, generator) -> torch.LongTensor:
    """(2, V) `[uncond ; cond]` logits -> the code for both rows (2, 1): guidance, top-k, a draw, as the pipeline."""
    guided = (logits[0] + scale * (logits[1] - logits[0])).float()  # (V,)
    values, indices = guided.topk(top_k)
    code = indices[torch.multinomial(values.softmax(-1), 1, generator=generator)]  # (1,)
    return code.expand(2, 1)


@torch.no_grad()
def sample(model, steps: int, scale: float, top_k: int, timed_positions=()) -> dict:
    """Prefill and `steps` steps from the start; then, for each start in `timed_positions`, 8 steps from there
    (the cache's length set back: a step's cost depends on its position, not on the cached values)."""
    text, generator = guided_text(model.config), torch.Generator().manual_seed(0)
    start = time.perf_counter()
    out = model(input_ids=text, use_cache=True, logits_to_keep=1)
    code = draw(model.image_logits(out.logits[:, -1]), scale, top_k, generator)
    prefill = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        code = draw(model.decode_step(code, out.cache), scale, top_k, generator)
        times.append(time.perf_counter() - start)
    at = {}
    if timed_positions:  # the jumps skip positions never written (`torch.empty`, NaN possible): zeros keep it finite
        out.cache.keys[:, :, :, out.cache.length:].zero_()
        out.cache.values[:, :, :, out.cache.length:].zero_()
    for position in timed_positions:
        out.cache.length = position
        start = time.perf_counter()
        for _ in range(8):
            code = draw(model.decode_step(code, out.cache), scale, top_k, generator)
        at[position] = (time.perf_counter() - start) / 8
    return {"prefill_s": prefill, "step_s": times, "step_s_at_position": at}


@torch.no_grad()
def decode_seconds(vqgan_config: dict, dtype: torch.dtype, grid: int) -> dict:
    from diffusers import VQModel

    torch.manual_seed(0)
    with torch.device("meta"):
        vqgan = VQModel(**vqgan_config)
    vqgan = vqgan.to(dtype).to_empty(device="cpu")
    for p in vqgan.parameters():
        torch.nn.init.normal_(p, std=0.02)
    vqgan.eval()
    codes = torch.randint(0, 16384, (grid * grid,))
    start = time.perf_counter()
    latents = vqgan.quantize.get_codebook_entry(codes, (1, grid, grid, vqgan.config.vq_embed_dim)).to(dtype)
    image = vqgan.decode(latents, force_not_quantize=True).sample
    return {"seconds": time.perf_counter() - start, "image_shape": list(image.shape)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for the test suite")
    parser.add_argument("--steps", type=int, default=32, help="steps timed from the start")
    parser.add_argument("--full", action="store_true", help="also time a whole 256-step image")
    parser.add_argument("--guidance", type=float, default=10.0)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--no-load", action="store_true", help="skip saving and loading with from_pretrained")
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "dalle_mega_cpu"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import psutil

    config = DalleBartConfig.mega(**(TINY if args.tiny else {}))
    needed = 2 * dalle_bart_weight_bytes(config, "bf16", device="cpu") + 2 * 2**30  # build + load + margin
    available = psutil.virtual_memory().available
    if available < needed:
        raise SystemExit(f"needs about {needed / GB:.1f} GB free, {available / GB:.1f} GB available")
    report = {"what": __doc__.split("\n")[0], "argv": argv if argv is not None else sys.argv[1:],
              "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
              "memory_available_at_start": available, "config": "DalleBartConfig.mega()" if not args.tiny else
              config.to_dict()}

    def save():  # after every phase: a run stopped by its time limit keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    # 1. Build in bf16 without float32
    rss_before = peak_rss()
    start = time.perf_counter()
    model = random_dalle_bart(config, dtype=torch.bfloat16)
    report["build"] = {"seconds": time.perf_counter() - start, "peak_rss_before": rss_before,
                       "peak_rss_after": peak_rss(),
                       "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                       "parameters": sum(p.numel() for p in model.parameters())}
    print(f"built in {report['build']['seconds']:.1f} s; peak RSS {rss_before / GB:.2f} -> "
          f"{report['build']['peak_rss_after'] / GB:.2f} GB; weights {report['build']['weight_bytes'] / GB:.2f} GB",
          flush=True)
    save()
    # 2. Load with from_pretrained in a fresh process
    if not args.no_load:
        report["load"] = measure_load(model, args.folder)
        load = report["load"]
        print(f"from_pretrained(bf16): {load['seconds']:.1f} s; peak RSS after imports / loading / reading every "
              f"weight {load['peak_rss_after_imports'] / GB:.2f} / {load['peak_rss_after_load'] / GB:.2f} / "
              f"{load['peak_rss'] / GB:.2f} GB", flush=True)
        save()
    # 3. Sample
    N = config.image_seq_len
    run = sample(model, args.steps, args.guidance, args.top_k, timed_positions=(N // 2, N - 9))
    mean_step = sum(run["step_s"][1:]) / max(len(run["step_s"]) - 1, 1)  # the first step warms up
    positions = [mean_step, *run["step_s_at_position"].values()]  # start, middle, end
    report["sample"] = {**run, "mean_step_s_first_steps": mean_step,
                        "extrapolated_image_s": run["prefill_s"] + (N - 1) * sum(positions) / len(positions),
                        "extrapolation": f"prefill + {N - 1} x mean of the step at the start (mean of steps 2-"
                                         f"{args.steps}), the middle and the end (8 steps each)"}
    print(f"prefill {run['prefill_s']:.2f} s; step {mean_step:.3f} s (start), "
          + ", ".join(f"{t:.3f} s at {p}" for p, t in run["step_s_at_position"].items())
          + f"; extrapolated {report['sample']['extrapolated_image_s']:.1f} s per guided image", flush=True)
    save()
    # 4. VQGAN decode (before the full image: the longest phase comes last)
    report["vqgan_decode"] = decode_seconds(VQGAN_TINY if args.tiny else VQGAN_F16_16384, torch.bfloat16,
                                            config.image_grid_size)
    print(f"VQGAN decode of one image: {report['vqgan_decode']['seconds']:.2f} s", flush=True)
    if args.full:
        full = sample(model, N - 1, args.guidance, args.top_k)
        report["full_image"] = {"seconds": full["prefill_s"] + sum(full["step_s"]), "prefill_s": full["prefill_s"],
                                "steps": len(full["step_s"])}
        print(f"full image: {report['full_image']['seconds']:.1f} s", flush=True)
        save()
    report["peak_rss_end"] = peak_rss()
    save()
    return report


if __name__ == "__main__":
    main()
