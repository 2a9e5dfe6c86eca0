"""The GPU check: the tests marked `cuda`, then memory and speed of every precision at batch 1, 16 and 64, and of
DALL·E mini and Mega for one image and a 3 x 3 grid.

    # on a GPU machine (wheels for what it lacks: benchmarks/gpu_wheels.sh; docs/performance.md, "The GPU check")
    python benchmarks/gpu_check.py --out gpu.json
    # on the CPU with small settings (tests/test_gpu_check.py keeps this working)
    python benchmarks/gpu_check.py --device cpu --small
    # only the memory computed from the configs (no model is run): the "What fits where" tables
    python benchmarks/gpu_check.py --computed
    # DALL·E mini and Mega only (issue: a Mega 3 x 3 grid in int8 within 6 GB)
    python benchmarks/gpu_check.py --configs mini,mega --out gpu_mini_mega.json

Steps, all in one process except the tests:

1. Environment: python, torch (and its CUDA), transformers, diffusers, accelerate, bitsandbytes; what is missing
   and which precisions that rules out.
2. `pytest -m cuda tests/test_cuda.py` in a subprocess (all skipped on the CPU); its summary goes into the JSON.
   Among them, `test_cli_and_app_load_on_cuda`: `dalle-hf generate` and the app load a tiny pipeline on the GPU
   with `--device auto` (float32, float16, bnb-int8) and generate.
3. For each config and precision (`dalle_hf.quantization.PRECISIONS`, loaded through `precision_kwargs`), load the
   pipeline once, then for each batch B: one prefill of B rows (the text) and `--steps` KV-cached decode steps
   around the middle of the image (the mean step; attention cost is linear in position), median of `--repeats`.
   Image tokens/s = B * N / (prefill + (N - 1) * step), sampling alone, B rows without guidance (guidance runs
   2B rows). Peak memory: `torch.cuda.max_memory_allocated` over the batch (weights included), on the CPU the
   bytes of the weights and KV cache tensors and the process's peak RSS. Next to it, the same bytes computed from
   the configs alone (`computed_weight_bytes`, `computed_kv_cache_bytes`). Then seconds to a 4-of-16 grid: the
   real `pipe(prompt, num_images_per_prompt=16, num_images_to_keep=4)` with the pipeline's default guidance and
   CLIP reranking, and its peak memory.

Configs: `shipped` is `--pipeline` (checkpoints/dalle-shapes). `large` is DALL-E's shape at 24 x 1024: a random
transformer with `DalleConfig`'s paper layout (256 text tokens from 16,384, 1,024 = 32 x 32 image tokens from
8,192 codes), n_layer 24, n_embd 1024, n_head 16, a random paper-size dVAE (`DalleVAEConfig()`: 256 x 256 images,
32 x 32 codes), the shipped tokenizer and CLIP, guidance 3.0 like the shipped checkpoint. `--small` shrinks
`large` to 2 x 64 with an 8 x 8 grid, and the batches, steps and grid, for a run of seconds on a CPU.

DALL·E mini and Mega (`mini`, `mega`): random weights at their published shapes, made on the device (built on the
`meta` device and materialized there by `dalle_hf.memory_plan.random_dalle_bart`, nothing carried to the machine),
in `CUDA_PRECISIONS` (fp32 only where `dalle_bart_memory_plan` says it fits the free memory; fp16 only on CUDA).
The bitsandbytes precisions load through `from_pretrained(..., **precision_kwargs(p, device, model=True))` from a
random bf16 copy saved once under `--folder` (Mega: 5.2 GB). For each of `--bart-images` (1 and 9, a 3 x 3 grid) with
super-conditioning (twice the rows): the prompt's prefill and `--steps` guided greedy steps around the middle of the
image; seconds per image = (prefill + 255 x the median step) / images, extrapolated, not a full sampling run. Then a
random VQGAN f16 16384 in the same float dtype decodes the images in the pipeline's chunks of 8 (the cache freed
first, as in the pipeline). Peak memory of each phase (`torch.cuda.max_memory_allocated`), the device memory in use
at the end (`torch.cuda.mem_get_info`: the CUDA context and the allocator's reserve included), and beside them the
same parts computed by `dalle_bart_memory_plan`. `--small` shrinks both to width 128, 2 + 2 layers, a 4 x 4 grid.

A time budget (`--budget-s`) skips the remaining cells, recorded as skipped, rather than overrun a lease. Quoted
in docs/performance.md; never asserted in tests except that it runs and its bytes add up.
"""

import argparse
import gc
import importlib.util
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # on a GPU machine dalle-hf is not installed: run it from the working tree
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dalle_hf.memory_plan import VQGAN_F16_16384, quantized_linear_bytes  # noqa: E402

PROMPT = "a red circle left of a blue square"
MB = 2**20
# DALL-E's shape at 24 x 1024 (the paper's layout is DalleConfig's default; its depth and width are 64 x 3968)
LARGE = dict(n_layer=24, n_head=16, n_embd=1024)
LARGE_SMALL = dict(text_vocab_size=512, text_seq_len=16, image_vocab_size=64, image_grid_size=8, n_layer=2,
                   n_head=2, n_embd=64)
VAE_SMALL = dict(image_size=32, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=64)  # 8 x 8 codes
PAPER = dict(n_layer=64, n_head=62, n_embd=3968)  # for the computed table only


# ---------------------------------------------------------------------------------------------------------------
# 1. Environment
# ---------------------------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    """Versions, the GPU, and what is missing (a missing package becomes a line saying what it rules out)."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "device": device, "missing": []}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    for name, rules_out in (
        ("transformers", "everything"),
        ("diffusers", "everything (the pipelines are diffusers pipelines)"),
        ("accelerate", "the model CPU offload test"),
        ("bitsandbytes", "bnb-int8 and bnb-nf4"),
        ("pytest", "the tests marked cuda"),
    ):
        if importlib.util.find_spec(name) is None:
            env[name] = None
            env["missing"].append(f"{name}: rules out {rules_out}")
        else:
            from importlib.metadata import version

            env[name] = version(name)
    return env


def precisions_available(requested: list[str], env: dict) -> list[str]:
    return [p for p in requested if not (p.startswith("bnb") and env.get("bitsandbytes") is None)]


# ---------------------------------------------------------------------------------------------------------------
# 2. The tests marked cuda
# ---------------------------------------------------------------------------------------------------------------
def run_cuda_tests(timeout_s: int = 300) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsxX", "-m", "cuda", "tests/test_cuda.py"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        output, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, returncode = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout_s} s", None
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return {"command": " ".join(cmd[2:]), "returncode": returncode, "summary": lines[-1] if lines else "",
            "seconds": round(time.perf_counter() - start, 1), "output_tail": output[-6000:]}


# ---------------------------------------------------------------------------------------------------------------
# Memory computed from the configs alone
# ---------------------------------------------------------------------------------------------------------------
def float_dtype(precision: str, device: str) -> torch.dtype:
    """dtype of everything bitsandbytes does not quantize: `precision_kwargs(precision, device)["dtype"]`, without
    building a quantization config (tests/test_gpu_check.py checks they agree)."""
    if precision == "bnb-int8":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "bnb-nf4": torch.bfloat16}[precision]


def computed_weight_bytes(model: torch.nn.Module, precision: str, device: str, quantized: bool = False) -> int:
    """Bytes of `model`'s state dict in `precision`, from its shapes alone (a model on the `meta` device will do).
    With `quantized`, the transformer's `nn.Linear` layers but the head are counted as bitsandbytes stores them."""
    from dalle_hf.quantization import INT8_SKIP_MODULES

    size = torch.finfo(float_dtype(precision, device)).bits // 8
    total, skipped = 0, set()
    if quantized and precision.startswith("bnb"):
        for name, m in model.named_modules():
            if type(m) is torch.nn.Linear and name.split(".")[-1] not in INT8_SKIP_MODULES:
                total += quantized_linear_bytes(m.out_features, m.in_features, precision)
                skipped.add(f"{name}.weight")
    for name, t in model.state_dict().items():
        if name not in skipped:
            total += t.numel() * (size if t.is_floating_point() else t.element_size())
    return total


def computed_kv_cache_bytes(config, rows: int, precision: str, device: str) -> int:
    """`DalleKVCache` preallocates keys and values for every position: 2 x n_layer x rows x n_embd x total_seq_len,
    in the transformer's float dtype."""
    size = torch.finfo(float_dtype(precision, device)).bits // 8
    return 2 * config.n_layer * rows * config.n_embd * config.total_seq_len * size


def meta_models(transformer_config, vae_config, clip_config=None) -> dict:
    """The pipeline's models on the `meta` device: shapes without memory, for the computed bytes."""
    from dalle_hf.modeling_dalle import DalleForImageGeneration
    from dalle_hf.modeling_dvae import DalleVAE

    with torch.device("meta"):
        models = {"transformer": DalleForImageGeneration(transformer_config), "vae": DalleVAE(vae_config)}
        if clip_config is not None:
            from transformers import CLIPModel

            models["clip_model"] = CLIPModel(clip_config)
    return models


def computed_pipeline_bytes(models: dict, precision: str, device: str) -> int:
    return sum(computed_weight_bytes(m, precision, device, quantized=(name == "transformer"))
               for name, m in models.items())


# ---------------------------------------------------------------------------------------------------------------
# 3. Pipelines, measurement
# ---------------------------------------------------------------------------------------------------------------
def save_large_pipeline(shipped_path: str, folder: str, small: bool, device: str) -> str:
    """A random `large` pipeline (see the module docstring) saved in float32 under `folder`; built on `device`
    (initializing 350M parameters is much faster on a GPU)."""
    from dalle_hf.configuration_dalle import DalleConfig
    from dalle_hf.configuration_dvae import DalleVAEConfig
    from dalle_hf.modeling_dalle import DalleForImageGeneration
    from dalle_hf.modeling_dvae import DalleVAE
    from dalle_hf.pipeline_dalle import DallePipeline

    path = os.path.join(folder, "large-small" if small else "large")
    if os.path.exists(os.path.join(path, "model_index.json")):
        return path
    shipped = DallePipeline.from_pretrained(shipped_path)
    config = DalleConfig(**(LARGE_SMALL if small else LARGE))
    vae_config = DalleVAEConfig(**VAE_SMALL) if small else DalleVAEConfig()
    if vae_config.grid_size != config.image_grid_size or len(shipped.tokenizer) > config.text_vocab_size:
        raise ValueError("the large config's dVAE grid and text vocabulary must fit the transformer")
    torch.manual_seed(0)
    with torch.device(device):
        transformer, vae = DalleForImageGeneration(config).eval(), DalleVAE(vae_config).eval()
    DallePipeline(
        tokenizer=shipped.tokenizer, transformer=transformer, vae=vae, clip_model=shipped.clip_model,
        clip_processor=shipped.clip_processor, default_guidance_scale=3.0,
    ).save_pretrained(path)
    del transformer, vae
    empty_cache(device)
    return path


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def empty_cache(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, device: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if torch.device(device).type == "cuda":
        return {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
                "process_peak_rss": rss}
    return {"peak_allocated": None, "peak_reserved": None, "process_peak_rss": rss}


def load_pipeline(path: str, precision: str, device: str):
    from dalle_hf.pipeline_dalle import DallePipeline
    from dalle_hf.quantization import precision_kwargs

    pipe = DallePipeline.from_pretrained(path, **precision_kwargs(precision, device)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_weight_bytes(pipe) -> int:
    from dalle_hf.quantization import weight_bytes

    return sum(weight_bytes(m) for m in (pipe.transformer, pipe.vae, pipe.clip_model) if m is not None)


@torch.no_grad()
def measure_batch(pipe, batch: int, precision: str, args) -> dict:
    model, device = pipe.transformer, args.device
    config = model.config
    N, L = config.image_seq_len, config.text_seq_len
    text = torch.randint(3, len(pipe.tokenizer), (batch, L), generator=torch.Generator().manual_seed(0)).to(device)
    ids = torch.randint(0, config.image_vocab_size, (batch, 1), generator=torch.Generator().manual_seed(1)).to(device)
    middle = 1 + L + N // 2
    reset_peak(device)
    prefill = timed(lambda: model(input_ids=text, use_cache=True, logits_to_keep=1), device, args.repeats)
    cache = model(input_ids=text, use_cache=True, logits_to_keep=1).cache

    def steps():
        cache.length = middle  # a step's cost depends on its position, not on the cached values
        for _ in range(args.steps):
            model.decode_step(ids, cache)

    steps()  # warm-up
    step = [t / args.steps for t in timed(steps, device, args.repeats)]
    memory = peak_memory(device)
    kv_bytes = 2 * cache._key_buffer.numel() * cache._key_buffer.element_size()
    sampling = statistics.median(prefill) + (N - 1) * statistics.median(step)
    return {
        "batch": batch, "image_tokens": N, "prefill_s": prefill, "step_s": step,
        "image_tokens_per_s": batch * N / sampling, **memory, "kv_cache_bytes": kv_bytes,
        "kv_cache_bytes_computed": computed_kv_cache_bytes(config, batch, precision, device),
    }


@torch.no_grad()
def measure_grid(pipe, args) -> dict:
    candidates, keep = args.grid
    device = args.device
    reset_peak(device)

    def grid():
        pipe(PROMPT, num_images_per_prompt=candidates, num_images_to_keep=keep, output_type="pt",
             generator=torch.Generator(device).manual_seed(0))

    seconds = timed(grid, device, args.grid_repeats)
    guidance = pipe.config.default_guidance_scale
    return {"candidates": candidates, "keep": keep, "guidance_scale": guidance,
            "rows": candidates * (2 if guidance > 1 else 1), "seconds": seconds, **peak_memory(device)}


def run_config(name: str, path: str, precisions: list[str], args, results: list, skipped: list, start: float):
    from transformers import CLIPConfig

    from dalle_hf.configuration_dalle import DalleConfig
    from dalle_hf.configuration_dvae import DalleVAEConfig

    clip_path = os.path.join(path, "clip_model")  # configs for the computed bytes
    configs = (DalleConfig.from_pretrained(os.path.join(path, "transformer")),
               DalleVAEConfig.from_pretrained(os.path.join(path, "vae")),
               CLIPConfig.from_pretrained(clip_path) if os.path.exists(clip_path) else None)
    models = meta_models(*configs)
    for precision in precisions:
        cell = {"config": name, "precision": precision, "layers": configs[0].n_layer, "width": configs[0].n_embd}
        if time.perf_counter() - start > args.budget_s:
            skipped.append({**cell, "reason": f"time budget of {args.budget_s} s spent"})
            continue
        try:
            load_start = time.perf_counter()
            pipe = load_pipeline(path, precision, args.device)
            load_s = time.perf_counter() - load_start
            weights = pipeline_weight_bytes(pipe)
            computed = computed_pipeline_bytes(models, precision, args.device)
            for batch in args.batches:
                if time.perf_counter() - start > args.budget_s:
                    skipped.append({**cell, "batch": batch, "reason": f"time budget of {args.budget_s} s spent"})
                    continue
                row = {**cell, "load_s": load_s, "weight_bytes": weights, "weight_bytes_computed": computed,
                       **measure_batch(pipe, batch, precision, args)}
                results.append(row)
                print(format_row(row, args.device), flush=True)
            if time.perf_counter() - start <= args.budget_s:
                grid = measure_grid(pipe, args)
                results.append({**cell, "grid": grid, "weight_bytes": weights, "weight_bytes_computed": computed})
                print(f"  {name} {precision}: {grid['keep']}-of-{grid['candidates']} grid "
                      f"{statistics.median(grid['seconds']):.2f} s", flush=True)
            else:
                skipped.append({**cell, "grid": True, "reason": f"time budget of {args.budget_s} s spent"})
        except Exception as e:  # one failing precision must not cost the rest of a GPU lease
            results.append({**cell, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})
            print(f"{name} {precision}: FAILED {type(e).__name__}: {e}", flush=True)
        pipe = None
        empty_cache(args.device)


# ---------------------------------------------------------------------------------------------------------------
# 4. DALL·E mini and Mega: random weights made on the device
# ---------------------------------------------------------------------------------------------------------------
# --small: width 128 (bitsandbytes' CPU kernels want K and N multiples of 32 and of two 4-bit blocks), a 4 x 4 grid
BART_SMALL = dict(text_vocab_size=300, d_model=128, encoder_layers=2, decoder_layers=2, attention_heads=4,
                  glu_dim=256, image_seq_len=16, image_vocab_size=64, sampled_image_vocab_size=64,
                  decoder_start_token_id=64)
VQGAN_SMALL = dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                   up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, latent_channels=4,
                   num_vq_embeddings=64, vq_embed_dim=4, norm_num_groups=4, sample_size=8)  # 4 x 4 codes, 8 x 8 px


def bart_config(name: str, small: bool):
    from dalle_hf.configuration_dalle_bart import DalleBartConfig

    preset = {"mini": DalleBartConfig.mini, "mega": DalleBartConfig.mega}[name]
    return preset(**(BART_SMALL if small else {}))


def load_bart(name: str, config, precision: str, args):
    """fp32 / fp16 / bf16: made on the device in that dtype. bnb: `from_pretrained` with `precision_kwargs(...,
    model=True)` from a random bf16 copy saved under `--folder` (made on the device, saved once per config)."""
    from dalle_hf.memory_plan import random_dalle_bart
    from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
    from dalle_hf.quantization import precision_kwargs

    kwargs = precision_kwargs(precision, args.device, model=True)
    if "quantization_config" not in kwargs:
        return random_dalle_bart(config, args.device, kwargs["dtype"])
    path = os.path.join(args.folder, f"{name}{'-small' if args.small else ''}-random-bf16")
    if not os.path.exists(os.path.join(path, "config.json")):
        random_dalle_bart(config, args.device, torch.bfloat16).save_pretrained(path)
        empty_cache(args.device)
    return DalleBartForImageGeneration.from_pretrained(path, device_map={"": args.device}, **kwargs).eval()


def random_vqgan(vqgan_config: dict, device: str, dtype: torch.dtype):
    """A `VQModel` with random weights made on `device` in `dtype` (built on `meta`, then materialized)."""
    from diffusers import VQModel

    with torch.device("meta"):
        vqgan = VQModel(**vqgan_config)
    vqgan = vqgan.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for p in vqgan.parameters():
            p.normal_(std=0.02)
    return vqgan.eval()


def guided_text(config, images: int, device: str) -> torch.LongTensor:
    """`[uncond ; cond]` (2 x images, text_seq_len): `[<s>, </s>]` then padding, and a random 8-token prompt."""
    ids = torch.full((2 * images, config.text_seq_len), config.text_pad_token_id, dtype=torch.long)
    ids[:, 0], ids[:images, 1] = config.text_bos_token_id, config.text_eos_token_id
    ids[images:, 1:9] = torch.randint(3, config.text_vocab_size, (8,), generator=torch.Generator().manual_seed(0))
    ids[images:, 9] = config.text_eos_token_id
    return ids.to(device)


def device_used_bytes(device: str) -> int | None:
    """Memory in use on the GPU (all processes: the CUDA context and the allocator's reserve included)."""
    if torch.device(device).type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


@torch.no_grad()
def measure_bart(model, vqgan, precision: str, images: int, args) -> dict:
    """One cell: prefill and guided greedy steps at the middle of the image, then the VQGAN decode."""
    from dalle_hf.memory_plan import dalle_bart_memory_plan
    from dalle_hf.pipeline_dalle_mini import DalleMiniFamily

    config, device, scale = model.config, args.device, 10.0
    N, rows = config.image_seq_len, 2 * images
    text = guided_text(config, images, device)
    empty_cache(device)
    reset_peak(device)
    prefill = timed(lambda: model(input_ids=text, use_cache=True, logits_to_keep=1), device, args.repeats)
    out = model(input_ids=text, use_cache=True, logits_to_keep=1)
    cache, code = out.cache, torch.zeros(rows, 1, dtype=torch.long, device=device)
    # The jump below skips positions the cache never wrote (`torch.empty`: whatever memory was there, NaN included);
    # zeros keep the timed steps finite. Only the timing needs them: the values sampled here are discarded.
    cache.keys[:, :, :, cache.length:].zero_()
    cache.values[:, :, :, cache.length:].zero_()

    def steps():
        nonlocal code
        cache.length = N // 2  # a step's cost depends on its position, not on the cached values
        for _ in range(args.steps):
            logits = model.decode_step(code, cache)  # (2 * images, V)
            guided = logits[:images] + scale * (logits[images:] - logits[:images])  # (images, V)
            code = guided.argmax(-1, keepdim=True).repeat(2, 1)  # (2 * images, 1)

    steps()  # warm-up
    step = [t / args.steps for t in timed(steps, device, args.repeats)]
    sampling_memory = peak_memory(device)
    kv_bytes = sum(t.numel() * t.element_size() for t in [cache.keys, cache.values, *cache.encoder_keys,
                                                          *cache.encoder_values])
    out = cache = None  # freed before decoding, as in the pipeline
    empty_cache(device)
    reset_peak(device)
    tokens = torch.randint(0, config.sampled_image_vocab_size, (images, N), device=device)
    decoder = DalleMiniFamily.__new__(DalleMiniFamily)  # the pipeline's decode, without a tokenizer to build it with
    decoder.transformer, decoder.vae = model, vqgan
    decode_s = timed(lambda: decoder.decode_image_tokens(tokens), device, 1)
    decode_memory = peak_memory(device)
    plan = dalle_bart_memory_plan(config, precision, images, device=device,
                                  vqgan_config=VQGAN_SMALL if args.small else None)
    seconds = (statistics.median(prefill) + (N - 1) * statistics.median(step)) / images
    return {
        "images": images, "rows": rows, "image_tokens": N, "prefill_s": prefill, "step_s": step,
        "seconds_per_image": seconds, "sampling": sampling_memory, "decode": {**decode_memory, "seconds": decode_s},
        "kv_cache_bytes": kv_bytes, "kv_cache_bytes_computed": plan["self_cache"] + plan["cross_cache"],
        "device_used_bytes": device_used_bytes(device), "plan": plan,
    }


def run_bart_config(name: str, precisions: list[str], args, results: list, skipped: list, start: float):
    from dalle_hf.memory_plan import dalle_bart_memory_plan, dalle_bart_weight_bytes
    from dalle_hf.quantization import precision_kwargs, weight_bytes

    config = bart_config(name, args.small)
    for precision in precisions:
        cell = {"config": name, "precision": precision, "layers": config.decoder_layers, "width": config.d_model}
        if precision == "fp16" and torch.device(args.device).type != "cuda":
            skipped.append({**cell, "reason": "fp16 is CUDA only (no CPU fp16 matmul kernels)"})
            continue
        if torch.device(args.device).type == "cuda":
            needed = dalle_bart_memory_plan(config, precision, max(args.bart_images), device=args.device)["total"]
            if needed > torch.cuda.mem_get_info()[0]:
                skipped.append({**cell, "reason": f"computed {needed / MB:,.0f} MB exceeds the free GPU memory"})
                continue
        if time.perf_counter() - start > args.budget_s:
            skipped.append({**cell, "reason": f"time budget of {args.budget_s} s spent"})
            continue
        model = vqgan = None
        try:
            load_start = time.perf_counter()
            model = load_bart(name, config, precision, args)
            sync(args.device)
            load_s = time.perf_counter() - load_start
            dtype = precision_kwargs(precision, args.device)["dtype"]  # the VQGAN's, as the pipeline loads it
            vqgan = random_vqgan(VQGAN_SMALL if args.small else VQGAN_F16_16384, args.device, dtype)
            weights = {"weight_bytes": weight_bytes(model),
                       "weight_bytes_computed": dalle_bart_weight_bytes(config, precision, args.device)}
            for images in args.bart_images:
                if time.perf_counter() - start > args.budget_s:
                    skipped.append({**cell, "images": images, "reason": f"time budget of {args.budget_s} s spent"})
                    continue
                row = {**cell, "load_s": load_s, **weights, **measure_bart(model, vqgan, precision, images, args)}
                results.append(row)
                print(format_bart_row(row, args.device), flush=True)
        except Exception as e:  # one failing precision must not cost the rest of a GPU lease
            results.append({**cell, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})
            print(f"{name} {precision}: FAILED {type(e).__name__}: {e}", flush=True)
        model = vqgan = None
        empty_cache(args.device)


def bart_table_row(row: dict, device: str) -> dict:
    on_gpu = torch.device(device).type == "cuda"
    plan = row["plan"]
    weights = plan["weights"] + plan["vqgan_weights"]  # the VQGAN is loaded while sampling, as in the pipeline
    sampling_plan = weights + plan["self_cache"] + plan["cross_cache"] + plan["step_activations"]
    decode_plan = weights + plan["vqgan_decode_activations"]
    if on_gpu:
        measured = (f"{row['sampling']['peak_allocated'] / MB:,.0f} / {row['decode']['peak_allocated'] / MB:,.0f}")
    else:
        measured = f"{(row['weight_bytes'] + row['kv_cache_bytes']) / MB:,.1f} / —"
    used = row["device_used_bytes"]
    return {
        "config": f"{row['config']} {row['layers']}+{row['layers']}x{row['width']}", "precision": row["precision"],
        "images (rows)": f"{row['images']} ({row['rows']})",
        "weights MB (measured / computed)": f"{row['weight_bytes'] / MB:,.1f} / "
                                            f"{row['weight_bytes_computed'] / MB:,.1f}",
        "KV MB (measured / computed)": f"{row['kv_cache_bytes'] / MB:,.1f} / "
                                       f"{row['kv_cache_bytes_computed'] / MB:,.1f}",
        ("peak GPU MB, sampling / decode" if on_gpu else "weights+KV MB (tensors)"): measured,
        "computed MB, sampling / decode": f"{sampling_plan / MB:,.0f} / {decode_plan / MB:,.0f}",
        "device used MB (computed total)": (f"{used / MB:,.0f} " if used is not None else "— ")
        + f"({plan['total'] / MB:,.0f})",
        "step ms": f"{1e3 * statistics.median(row['step_s']):.1f}",
        "s per image": f"{row['seconds_per_image']:.2f}",
        "decode s": f"{statistics.median(row['decode']['seconds']):.2f}",
    }


def format_bart_row(row: dict, device: str) -> str:
    return " | ".join(str(v) for v in bart_table_row(row, device).values())


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def format_row(row: dict, device: str) -> str:
    return " | ".join(str(v) for v in table_row(row, device).values())


def table_row(row: dict, device: str) -> dict:
    on_gpu = torch.device(device).type == "cuda"
    if "grid" in row:
        grid = row["grid"]
        return {"config": f"{row['config']} {row['layers']}x{row['width']}", "precision": row["precision"],
                "batch": f"grid {grid['keep']} of {grid['candidates']} ({grid['rows']} rows)",
                "peak GPU MB" if on_gpu else "weights+KV MB (tensors)":
                    f"{grid['peak_allocated'] / MB:,.0f}" if on_gpu else "",
                "weights MB (computed)": f"{row['weight_bytes_computed'] / MB:,.1f}", "KV MB (computed)": "",
                "step ms": "", "image tokens/s": "", "grid s": f"{statistics.median(grid['seconds']):.2f}",
                "peak RSS MB": f"{grid['process_peak_rss'] / MB:,.0f}"}
    if "error" in row:
        return {"config": row["config"], "precision": row["precision"], "batch": "", "error": row["error"][:80]}
    measured = row["peak_allocated"] if on_gpu else row["weight_bytes"] + row["kv_cache_bytes"]
    return {
        "config": f"{row['config']} {row['layers']}x{row['width']}", "precision": row["precision"],
        "batch": row["batch"],
        "peak GPU MB" if on_gpu else "weights+KV MB (tensors)": f"{measured / MB:,.1f}",
        "weights MB (computed)": f"{row['weight_bytes_computed'] / MB:,.1f}",
        "KV MB (computed)": f"{row['kv_cache_bytes_computed'] / MB:,.1f}",
        "step ms": f"{1e3 * statistics.median(row['step_s']):.2f}",
        "image tokens/s": f"{row['image_tokens_per_s']:,.0f}", "grid s": "",
        "peak RSS MB": f"{row['process_peak_rss'] / MB:,.0f}",
    }


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


def computed_table(shipped_path: str, batches: list[int]) -> list[dict]:
    """Memory from the configs alone, on a GPU: the shipped pipeline, `large` and the paper's 64 x 3968, each
    precision, weights of the whole pipeline and the KV cache of B images with the shipped guidance (2B rows)."""
    from dalle_hf.configuration_dalle import DalleConfig
    from dalle_hf.configuration_dvae import DalleVAEConfig
    from dalle_hf.pipeline_dalle import DallePipeline
    from dalle_hf.quantization import PRECISIONS

    shipped = DallePipeline.from_pretrained(shipped_path)
    clip_config = shipped.clip_model.config
    configs = {
        "shipped": (shipped.transformer.config, shipped.vae.config),
        "large": (DalleConfig(**LARGE), DalleVAEConfig()),
        "paper": (DalleConfig(**PAPER), DalleVAEConfig()),
    }
    rows = []
    for name, (config, vae_config) in configs.items():
        models = meta_models(config, vae_config, clip_config)
        params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        for precision in PRECISIONS:
            weights = computed_pipeline_bytes(models, precision, "cuda")
            kv = [computed_kv_cache_bytes(config, 2 * b, precision, "cuda") for b in batches]
            rows.append({
                "config": f"{name} {config.n_layer}x{config.n_embd}, {config.image_seq_len} image tokens",
                "params (transformer / dVAE / CLIP)": " / ".join(f"{v / 1e6:,.1f}M" for v in params.values()),
                "precision": precision, "weights MB": f"{weights / MB:,.1f}",
                f"KV cache MB, {' / '.join(map(str, batches))} images guided": " / ".join(f"{k / MB:,.0f}" for k in kv),
                "weights + KV MB": " / ".join(f"{(weights + k) / MB:,.0f}" for k in kv),
            })
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny large config, batches 1,2, fewer steps (CPU)")
    parser.add_argument("--pipeline", default=str(ROOT / "checkpoints" / "dalle-shapes"), help="the shipped model")
    parser.add_argument("--configs", default="shipped,large,mini,mega")
    parser.add_argument("--precisions", default=None, help="default: PRECISIONS for shipped and large, "
                        "CUDA_PRECISIONS (fp16 too) for mini and mega")
    parser.add_argument("--bart-images", default="1,9", help="mini and Mega: images per prompt, guided (9: 3 x 3)")
    parser.add_argument("--batches", default=None, help="default 1,16,64 (--small: 1,2)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed per repeat (default 16; small 2)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (--small: 1)")
    parser.add_argument("--grid", default=None, help="candidates:keep, default 16:4 (--small: 4:2)")
    parser.add_argument("--grid-repeats", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=400.0, help="skip cells started after this many seconds")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda first")
    parser.add_argument("--computed", action="store_true", help="print the computed memory table and exit")
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "dalle_hf_gpu_check"))
    parser.add_argument("--out", default=None, help="write everything as JSON here")
    args = parser.parse_args(argv)
    args.bart_images = [int(b) for b in args.bart_images.split(",")]
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.small else "1,16,64")).split(",")]
    args.steps = args.steps or (2 if args.small else 16)
    args.repeats = args.repeats or (1 if args.small else 3)
    args.grid = tuple(int(x) for x in (args.grid or ("4:2" if args.small else "16:4")).split(":"))
    if len(args.grid) != 2 or not 1 <= args.grid[1] <= args.grid[0]:
        parser.error(f"--grid must be candidates:keep with 1 <= keep <= candidates, got {args.grid}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU (use --device cpu --small)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    env = environment(args.device)
    print(" ".join(f"{k}={v}" for k, v in env.items() if k != "missing"), flush=True)
    for line in env["missing"]:
        print(f"MISSING {line}; wheels: benchmarks/gpu_wheels.sh (docs/performance.md, 'The GPU check')", flush=True)
    if env["diffusers"] is None or env["transformers"] is None:
        return 2
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    # LLM.int8 on the CPU runs in float32 and logs that it casts to float16 at every matmul (see precision_kwargs)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

    if args.computed:
        from dalle_hf.memory_plan import what_fits_where_table

        print_table(computed_table(args.pipeline, args.batches))
        print()
        print(what_fits_where_table())
        return 0
    report = {"environment": env, "settings": {k: v for k, v in vars(args).items()}, "tests": None,
              "results": [], "skipped": []}
    if not args.skip_tests:
        report["tests"] = run_cuda_tests()
        print(f"pytest -m cuda tests/test_cuda.py: {report['tests']['summary']} ({report['tests']['seconds']} s)")
        if report["tests"]["returncode"] not in (0, None):
            print(report["tests"]["output_tail"][-3000:], flush=True)
    from dalle_hf.quantization import CUDA_PRECISIONS, PRECISIONS

    os.makedirs(args.folder, exist_ok=True)
    for name in args.configs.split(","):
        requested = args.precisions.split(",") if args.precisions else list(
            CUDA_PRECISIONS if name in ("mini", "mega") else PRECISIONS)
        precisions = precisions_available(requested, env)
        report["skipped"] += [{"config": name, "precision": p, "reason": "bitsandbytes is missing"}
                              for p in requested if p not in precisions]
        if name in ("mini", "mega"):
            run_bart_config(name, precisions, args, report["results"], report["skipped"], start)
            continue
        path = args.pipeline if name == "shipped" else save_large_pipeline(
            args.pipeline, args.folder, args.small, args.device)
        run_config(name, path, precisions, args, report["results"], report["skipped"], start)
    report["elapsed_s"] = round(time.perf_counter() - start, 1)

    print()
    print_table([table_row(r, args.device) for r in report["results"] if "error" not in r and "plan" not in r])
    print()
    print_table([bart_table_row(r, args.device) for r in report["results"] if "error" not in r and "plan" in r])
    for r in report["results"]:
        if "error" in r:
            print(f"FAILED {r['config']} {r['precision']}: {r['error']}")
    for s in report["skipped"]:
        print(f"skipped {s}")
    print(f"elapsed {report['elapsed_s']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    failed = any("error" in r for r in report["results"]) or (
        report["tests"] is not None and report["tests"]["returncode"] != 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
