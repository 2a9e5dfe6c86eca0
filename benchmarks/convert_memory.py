"""Peak memory of converting DALL·E Mega's Flax checkpoint (10.4 GB of float32): it must stay under 1.5x the weights.

Writes a Mega-shaped snapshot of random weights (`config.json` + `flax_model.msgpack` in flax's exact format, the
scanned layout dalle-mini trains with, whose stacked leaves are the largest; a tiny BPE; the VQGAN f16 16384 at its
published names and shapes), then converts it in a child process per path and reads the child's peak resident set
size from `os.wait4`:

- `stream`: `flax_msgpack_shapes` + `config_kwargs_from_flax` (config checked against the tensors),
  `flax_to_state_dict(iter_flax_msgpack(...))` (the leaves streamed, each converted and dropped), the transformer
  written with `safetensors.torch.save_file`, the VQGAN through `vqgan_from_flax` and `save_pretrained`;
- `pipeline`: `convert_flax` itself, the whole CLI path (`save_converted_pipeline` builds the model on the meta device
  and saves the diffusers folder); measured when `dalle_hf.convert_dalle_mini` is importable.

    flock /tmp/cpu-heavy.lock env OMP_NUM_THREADS=1 python benchmarks/convert_memory.py --work /tmp/convert-memory \
        --json benchmarks/results/convert_memory.json

Needs about 25 GB of free disk (the msgpack, the converted copy) and deletes both unless `--keep`. At Mega's shapes
no leaf exceeds flax's 2**30-byte chunk size (the largest, a stack of 24 GLU kernels, is 805 MB), so flax writes no
`__msgpack_chunked_array__` here; the chunked path is covered by the tests.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

MEGA = dict(  # dalle-mini/dalle-mega's config.json fields that set shapes (min-dalle's shapes, read off the weights)
    model_type="dallebart", encoder_vocab_size=50272, image_vocab_size=16415, image_length=256, max_text_length=64,
    encoder_layers=24, decoder_layers=24, encoder_attention_heads=32, decoder_attention_heads=32,
    encoder_ffn_dim=4096, decoder_ffn_dim=4096, d_model=2048, use_scan=True, decoder_start_token_id=16384,
    normalize_text=True,
)  # fmt: skip
VQGAN_SHAPES = Path(__file__).parent.parent / "tests" / "fixtures" / "dalle_mini" / "vqgan_f16_16384_shapes.json"


def dalle_mini_flax_shapes(c: dict) -> dict:
    """dalle-mini's scanned parameter tree (`dalle_mini/model/modeling.py`, normformer GLU, no bias): key -> shape."""
    d, glu = c["d_model"], c["encoder_ffn_dim"]
    shapes = {"lm_head/kernel": (d, c["image_vocab_size"] + 1)}
    for side, layers, vocab, positions in (
        ("encoder", c["encoder_layers"], c["encoder_vocab_size"], c["max_text_length"]),
        ("decoder", c["decoder_layers"], c["image_vocab_size"] + 1, c["image_length"]),
    ):
        prefix = f"model/{side}"
        shapes[f"{prefix}/embed_tokens/embedding"] = (vocab, d)
        shapes[f"{prefix}/embed_positions/embedding"] = (positions, d)
        shapes |= {f"{prefix}/layernorm_embedding/scale": (d,), f"{prefix}/layernorm_embedding/bias": (d,),
                   f"{prefix}/final_ln/bias": (d,)}  # fmt: skip
        stack = f"{prefix}/layers/FlaxBart{side.capitalize()}Layers"
        attentions = ["FlaxBartAttention_0"] + (["FlaxBartAttention_1"] if side == "decoder" else [])
        norms = {"LayerNorm_0/bias": d, "LayerNorm_1/scale": d, "LayerNorm_1/bias": d}
        if side == "decoder":
            norms |= {"LayerNorm_2/bias": d, "LayerNorm_3/scale": d, "LayerNorm_3/bias": d}
        for name, size in norms.items():
            shapes[f"{stack}/{name}"] = (layers, size)
        for attention in attentions:
            for proj in ("q", "k", "v", "out"):
                shapes[f"{stack}/{attention}/{proj}_proj/kernel"] = (layers, d, d)
        shapes |= {f"{stack}/GLU_0/LayerNorm_0/bias": (layers, d), f"{stack}/GLU_0/Dense_0/kernel": (layers, d, glu),
                   f"{stack}/GLU_0/Dense_1/kernel": (layers, d, glu), f"{stack}/GLU_0/LayerNorm_1/bias": (layers, glu),
                   f"{stack}/GLU_0/Dense_2/kernel": (layers, glu, d)}  # fmt: skip
    return shapes


def random_leaves(shapes: dict, seed: int) -> dict:
    """Zero-argument callables, so the writer makes one random float32 array at a time."""
    def leaf(shape, index):
        def make():
            values = np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32)
            values *= 0.02
            return values
        return make

    return {key: leaf(tuple(shape), i) for i, (key, shape) in enumerate(shapes.items())}


def write_snapshots(work: Path) -> int:
    """The Mega and VQGAN snapshots under `work`; returns the transformer's weight bytes."""
    from tokenizers import ByteLevelBPETokenizer

    from dalle_hf.flax_msgpack import write_flax_msgpack

    mega, vqgan = work / "dalle-mega", work / "vqgan"
    mega.mkdir(parents=True, exist_ok=True)
    vqgan.mkdir(parents=True, exist_ok=True)
    shapes = dalle_mini_flax_shapes(MEGA)
    (mega / "config.json").write_text(json.dumps(MEGA, indent=2))
    write_flax_msgpack(random_leaves(shapes, 0), mega / "flax_model.msgpack")
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(["a cat wearing a hat"] * 4, vocab_size=300, min_frequency=2,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # fmt: skip
    tokenizer.save_model(str(mega))
    (vqgan / "config.json").write_text(json.dumps({"n_embed": 16384, "embed_dim": 256}))
    write_flax_msgpack(random_leaves(json.loads(VQGAN_SHAPES.read_text()), 1), vqgan / "flax_model.msgpack")
    return 4 * sum(int(np.prod(shape)) for shape in shapes.values())


def convert_stream(work: Path, out: Path):
    """Read + map + write, without the pipeline assembly (what `convert_flax` does before `save_converted_pipeline`)."""
    import safetensors.torch

    from dalle_hf.convert_flax_dalle_mini import config_kwargs_from_flax, flax_key_to_ours, flax_to_state_dict
    from dalle_hf.convert_vqgan import vqgan_from_flax
    from dalle_hf.flax_msgpack import flax_msgpack_shapes, iter_flax_msgpack

    weights = work / "dalle-mega" / "flax_model.msgpack"
    shapes = flax_msgpack_shapes(weights)
    kwargs = config_kwargs_from_flax(json.loads((work / "dalle-mega" / "config.json").read_text()), shapes)
    expected = {}  # our keys and shapes from the file's own (the tests check them against min-dalle's)
    for key, shape in shapes.items():
        name, is_kernel, scanned = flax_key_to_ours(key)
        shape = shape[1:] if scanned else shape
        shape = shape[::-1] if is_kernel else shape
        layers = kwargs["encoder_layers" if name.startswith("encoder") else "decoder_layers"]
        expected |= {name.format(i=i): shape for i in range(layers)} if scanned else {name: shape}
    state = flax_to_state_dict(iter_flax_msgpack(weights), SimpleNamespace(**kwargs), expected_shapes=expected,
                               source=str(weights))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, out / "transformer.safetensors")
    del state
    vqgan_from_flax(str(work / "vqgan")).save_pretrained(out / "vae")


def convert_pipeline(work: Path, out: Path):
    from dalle_hf.convert_flax_dalle_mini import convert_flax

    convert_flax(str(work / "dalle-mega"), str(work / "vqgan"), str(out))


def measure(mode: str, work: Path) -> dict:
    """Runs one conversion in a child process; its peak RSS from `os.wait4`."""
    out = work / f"out-{mode}"
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--child", mode, "--work", str(work)])
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "exit_status": os.waitstatus_to_exitcode(status), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "seconds": round(seconds, 1), "bytes_written": written}  # fmt: skip


def main(args):
    work = Path(args.work)
    if args.child:
        (convert_stream if args.child == "stream" else convert_pipeline)(work, work / f"out-{args.child}")
        return
    start = time.perf_counter()
    weights = write_snapshots(work)
    write_seconds = time.perf_counter() - start
    modes = ["stream"]
    try:
        from dalle_hf.convert_dalle_mini import save_converted_pipeline  # noqa: F401

        modes.append("pipeline")
    except ImportError:
        print("dalle_hf.convert_dalle_mini is not importable: measuring the stream path only")
    results = [measure(mode, work) for mode in modes]
    for result in results:
        result["peak_over_weights"] = round(result["peak_rss_bytes"] / weights, 3)
    report = {
        "what": "peak RSS of converting a Mega-shaped random flax_model.msgpack (scanned layout, float32)",
        "weights_bytes": weights, "msgpack_bytes": (work / "dalle-mega" / "flax_model.msgpack").stat().st_size,
        "write_seconds": round(write_seconds, 1), "results": results, "threads": os.environ.get("OMP_NUM_THREADS"),
        "note": args.note,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="a scratch folder with ~25 GB free (deleted unless --keep)")
    parser.add_argument("--json", help="where to write the result")
    parser.add_argument("--keep", action="store_true", help="keep the generated snapshots")
    parser.add_argument("--note", default="", help="recorded in the result (which code was measured)")
    parser.add_argument("--child", choices=["stream", "pipeline"], help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
