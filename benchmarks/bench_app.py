"""Time from request to grid in the Gradio app: 16 candidates -> 4 shown, through `gradio_client` on 127.0.0.1.

    OMP_NUM_THREADS=2 python benchmarks/bench_app.py [--checkpoint checkpoints/dalle-shapes] [--threads 2] [--repeats 5]

Starts `python app.py` on a free port with the checkpoint (default: `checkpoints/dalle-shapes`; when it is missing,
a random-weight pipeline of the shapes model's size, saved to a temporary folder: same speed, meaningless images),
then times `/generate` from submit to the final grid, and to the first streamed partial grid. Prints the medians of
`--repeats` requests after one warm-up, with the thread count. Quoted in docs/app.md, never asserted in tests.
"""

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES_CHECKPOINT = REPO / "checkpoints" / "dalle-shapes"

# The shapes model's size as the training scripts' defaults give it: 64 px images, a 16x16 grid of 512 codes.
SIZES = {
    "shapes": dict(text_seq_len=16, text_vocab_size=1024, grid=16, image_vocab=512, n_layer=8, n_head=4, n_embd=256,
                   image_size=64, num_groups=3, n_hid=64, n_init=128, n_blk_per_group=2,
                   clip=dict(image_size=64, patch_size=8)),
    "tiny": dict(text_seq_len=8, text_vocab_size=300, grid=4, image_vocab=32, n_layer=2, n_head=2, n_embd=32,
                 image_size=16, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1,
                 clip=dict(image_size=16, patch_size=4, vision_width=32, vision_layers=2, text_width=32,
                           text_layers=2, projection_dim=32, head_dim=16)),
}


def save_random_pipeline(path, size: str = "shapes", seed: int = 0) -> Path:
    """Save a `DallePipeline` with random weights of a given size (see SIZES) to `path`; returns `path`."""
    import torch
    from transformers import CLIPModel

    from dalle_hf.clip import make_clip_config, make_clip_processor
    from dalle_hf.configuration_dalle import DalleConfig
    from dalle_hf.configuration_dvae import DalleVAEConfig
    from dalle_hf.data.shapes import all_captions
    from dalle_hf.modeling_dalle import DalleForImageGeneration
    from dalle_hf.modeling_dvae import DalleVAE
    from dalle_hf.pipeline_dalle import DallePipeline
    from dalle_hf.tokenization import train_text_tokenizer

    s = SIZES[size]
    torch.manual_seed(seed)
    captions = list(all_captions(2000, seed=seed))
    tokenizer = train_text_tokenizer(captions, vocab_size=s["text_vocab_size"], text_seq_len=s["text_seq_len"])
    transformer = DalleForImageGeneration(DalleConfig(
        text_vocab_size=len(tokenizer), text_seq_len=s["text_seq_len"], image_vocab_size=s["image_vocab"],
        image_grid_size=s["grid"], n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"])).eval()
    vae = DalleVAE(DalleVAEConfig(image_size=s["image_size"], num_groups=s["num_groups"], n_hid=s["n_hid"],
                                  n_init=s["n_init"], n_blk_per_group=s["n_blk_per_group"],
                                  vocab_size=s["image_vocab"])).eval()
    assert vae.config.grid_size == s["grid"]
    clip = CLIPModel(make_clip_config(len(tokenizer), text_seq_len=s["text_seq_len"], **s["clip"])).eval()
    pipe = DallePipeline(tokenizer=tokenizer, transformer=transformer, vae=vae, clip_model=clip,
                         clip_processor=make_clip_processor(tokenizer, image_size=s["image_size"]))
    pipe.save_pretrained(path)
    return Path(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(checkpoints, port: int, *flags: str, env: dict | None = None, log=None) -> subprocess.Popen:
    """`python app.py --checkpoints ... --port ...` in a subprocess; returns once it answers HTTP (or raises)."""
    import urllib.request

    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--checkpoints", str(checkpoints), "--port",
                             str(port), *flags], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("app.py did not start within 180 s")


def stop_app(proc: subprocess.Popen):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def time_request(client, prompt: str, candidates: int, keep: int, seed: int) -> tuple[float, float | None, float]:
    """(seconds to the final grid, seconds to the first partial grid or None when none was streamed, seconds the
    app reports for sampling + decoding + ranking)."""
    start = time.perf_counter()
    job = client.submit(None, prompt, candidates, keep, 1.0, 0, 1.0, 1.0, seed, False, api_name="/generate")
    first_preview = None
    while not job.done():
        if first_preview is None and any(
            gallery and gallery[0]["caption"] == "sampling…" for gallery, *_ in job.outputs()
        ):
            first_preview = time.perf_counter() - start
        time.sleep(0.01)
    result = job.result()
    total = time.perf_counter() - start
    assert len(result[0]) == keep, result
    server = float(re.search(r" in ([0-9.]+) s", result[2]).group(1))
    return total, first_preview, server


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(SHAPES_CHECKPOINT))
    parser.add_argument(
        "--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)), help="torch threads in the app."
    )
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", default="a red circle left of a blue square")
    args = parser.parse_args()

    from gradio_client import Client

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint)
        if (checkpoint / "model_index.json").is_file():
            what = f"checkpoint {checkpoint}"
        else:
            checkpoint = save_random_pipeline(Path(tmp) / "random-shapes", "shapes")
            what = f"random weights, shapes size ({args.checkpoint} not found)"
        port = free_port()
        env = {"OMP_NUM_THREADS": str(args.threads)}
        proc = start_app(checkpoint, port, "--threads", str(args.threads), env=env)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            time_request(client, args.prompt, args.candidates, args.keep, seed=0)  # warm-up
            runs = [
                time_request(client, args.prompt, args.candidates, args.keep, seed=i + 1) for i in range(args.repeats)
            ]
        finally:
            stop_app(proc)
    totals = [t for t, _, _ in runs]
    previews = [p for _, p, _ in runs if p is not None]
    server = [s for _, _, s in runs]
    print(f"app request -> grid: {args.candidates} candidates -> {args.keep} shown, {what}, "
          f"server threads={args.threads}, cpus={os.cpu_count()}, repeats={args.repeats}")
    print(f"  median {statistics.median(totals):.2f} s  (min {min(totals):.2f}, max {max(totals):.2f}); "
          f"of which sampling + decoding + CLIP in the app: median {statistics.median(server):.2f} s")
    if previews:
        print(f"  first partial grid after median {statistics.median(previews):.2f} s")


if __name__ == "__main__":
    main()
