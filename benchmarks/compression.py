"""The likelihood view, measured on a checkpoint: compression, zero-shot classification, reranking.

`compression` and `classify` take a world (`--dataset shapes` by default, `--dataset emoji --data-dir CACHE`):
its held-out examples (`World.held_out_examples`) and its caption-ranking set (`World.caption_ranking_set`).

    # 200 held-out shapes renders: exact round trips (1 and 2 threads), bits per image token against the uniform
    # code and the model's cross-entropy, bytes against PNG and lossless WebP, seconds per image, refusals
    OMP_NUM_THREADS=1 python benchmarks/compression.py compression --pipeline checkpoints/dalle-shapes \
        --n-images 200 --json benchmarks/results/compression_dalle-shapes.json
    # zero-shot classification by likelihood beside CLIP (the renders and candidates of `dalle-hf eval clip`)
    OMP_NUM_THREADS=1 python benchmarks/compression.py classify --pipeline checkpoints/dalle-shapes \
        --n-images 300 --n-captions 8 --json benchmarks/results/zero_shot_classification_dalle-shapes.json
    # the same two on the emoji world: compression on renders of held-out (concept, style) pairs; classification on
    # its caption-ranking set (a fixed draw of all renders, seen pairs included: the set `dalle-hf eval clip` uses)
    OMP_NUM_THREADS=1 python benchmarks/compression.py compression --pipeline checkpoints/dalle-emoji \
        --dataset emoji --data-dir /work/emoji-cache --n-images 200 \
        --json benchmarks/results/compression_dalle-emoji.json
    OMP_NUM_THREADS=1 python benchmarks/compression.py classify --pipeline checkpoints/dalle-emoji --dataset emoji \
        --data-dir /work/emoji-cache --n-images 300 --n-captions 8 \
        --json benchmarks/results/zero_shot_classification_dalle-emoji.json
    # likelihood reranking against CLIP's on one bank of drawn candidates (ShapesEval checker)
    OMP_NUM_THREADS=1 python benchmarks/compression.py rerank --pipeline checkpoints/dalle-shapes \
        --prompts-per-task 20 --candidates 12 --json benchmarks/results/likelihood_rerank_dalle-shapes.json

Numbers are quoted in benchmarks/results/likelihood_dalle-shapes.md and docs/likelihood.md, never asserted.
"""

import argparse
import copy
import io
import json
import random
import statistics
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from dalle_hf import DallePipeline
from dalle_hf.compression import CompressionError, LikelihoodCoder, NextCodeDistribution, pinned_num_threads
from dalle_hf.data.shapes import EVAL_TASKS
from dalle_hf.data.world import load_world

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load(path: str, dtype: str = "float32") -> DallePipeline:
    pipe = DallePipeline.from_pretrained(path, dtype=DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encoded_size(image, format: str, **kwargs) -> int:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return len(buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Determinism probe: how far apart are the probabilities of two code paths?


@torch.no_grad()
def cached_probabilities(transformer, input_ids, codes, threads: int, float64_head: bool) -> np.ndarray:
    """(N, V) next-code probabilities along the KV-cached path on `threads` threads."""
    with pinned_num_threads(threads):
        if float64_head:
            return NextCodeDistribution(transformer, input_ids).along(codes.numpy())
        out = transformer(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        logits = transformer.image_logits(out.logits[:, -1])
        rows = []
        for i, code in enumerate(codes.tolist()):
            rows.append(logits.float().softmax(-1)[0].double().numpy())
            if i + 1 < len(codes):
                logits = transformer.decode_step(torch.tensor([[code]]), out.cache)
        return np.stack(rows)


@torch.no_grad()
def forced_probabilities(transformer, input_ids, codes, threads: int, float64_head: bool) -> np.ndarray:
    """(N, V) next-code probabilities of one teacher-forced pass on `threads` threads."""
    with pinned_num_threads(threads):
        out = transformer(input_ids=input_ids, image_ids=codes[None, :-1])
        L = transformer.config.text_seq_len
        if float64_head:
            return transformer.image_log_probs(out.last_hidden_state[0, L:]).exp().numpy()
        return transformer.image_logits(out.logits[0, L:]).float().softmax(-1).double().numpy()


def determinism_probe(pipe, examples) -> dict:
    result = {}
    for float64_head in (False, True):
        diffs = {"cached 1 vs 2 threads": [], "cached vs teacher-forced": [], "teacher-forced 1 vs 2 threads": []}
        for _, image, caption in examples:
            codes = pipe.encode_images([image])[0].flatten()
            ids = pipe.encode_prompt([caption])
            c1 = cached_probabilities(pipe.transformer, ids, codes, 1, float64_head)
            c2 = cached_probabilities(pipe.transformer, ids, codes, 2, float64_head)
            f1 = forced_probabilities(pipe.transformer, ids, codes, 1, float64_head)
            f2 = forced_probabilities(pipe.transformer, ids, codes, 2, float64_head)
            diffs["cached 1 vs 2 threads"].append(float(np.abs(c1 - c2).max()))
            diffs["cached vs teacher-forced"].append(float(np.abs(c1 - f1).max()))
            diffs["teacher-forced 1 vs 2 threads"].append(float(np.abs(f1 - f2).max()))
        result["float64 head" if float64_head else "float32 head"] = {k: max(v) for k, v in diffs.items()}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Compression


def summarize_compression(records: list[dict], N: int, raw_bits: int, vocab_size: int) -> dict:
    """The compression summary from per-image records (`resummarize` recomputes it from a saved JSON).

    Besides means, it fits `payload_bits = slope * cross_entropy_bits + intercept` over the images: the slope is the
    coder's rate against the model's cross-entropy, the intercept its fixed cost per file (a file is whole bytes, so
    even an ideal code pays rounding up to a byte, about 4 bits on average; `payload_over_byte_rounded_cross_entropy`
    compares the payload with the cross-entropy rounded up to whole bytes)."""

    def mean(key, rows=records):
        return statistics.fmean(r[key] for r in rows)

    cross_entropy = np.array([r["cross_entropy_bits"] for r in records])
    payload = np.array([r["payload_bits"] for r in records], dtype=float)
    slope, intercept = np.polyfit(cross_entropy, payload, 1) if len(records) > 1 else (float("nan"), float("nan"))
    byte_rounded = 8 * np.ceil(cross_entropy / 8)
    uniform_bits = N * raw_bits
    summary = {
        "n_images": len(records),
        "image_tokens": N,
        "codebook": vocab_size,
        "exact_round_trips_1_thread": sum(r["exact_1_thread"] for r in records),
        "exact_round_trips_2_threads": sum(r["exact_2_threads"] for r in records),
        "flipped_bit_refused": sum(r["flipped_bit_refused"] for r in records),
        "other_model_refused": sum(r["other_model_refused"] for r in records),
        "raw_fallbacks": sum(r["raw_fallback"] for r in records),
        "uniform_bits_per_token": raw_bits,
        "payload_bits_per_token": mean("payload_bits") / N,
        "cross_entropy_bits_per_token": mean("cross_entropy_bits") / N,
        "unconditional_cross_entropy_bits_per_token": mean("unconditional_bits") / N,
        "payload_over_cross_entropy": mean("payload_bits") / mean("cross_entropy_bits"),
        "mean_payload_minus_cross_entropy_bits": mean("payload_bits") - mean("cross_entropy_bits"),
        "payload_vs_cross_entropy_fit": {"slope": float(slope), "intercept_bits": float(intercept)},
        "payload_over_byte_rounded_cross_entropy": float(payload.sum() / byte_rounded.sum()),
        "payload_over_uniform": mean("payload_bits") / uniform_bits,
        "file_over_uniform": 8 * mean("file_bytes") / uniform_bits,
        "mean_header_bytes": mean("header_bytes"),
        "mean_file_bytes": mean("file_bytes"),
        "uniform_bytes": uniform_bits / 8,
        "mean_png_bytes": mean("png_bytes"),
        "mean_webp_lossless_bytes": mean("webp_lossless_bytes"),
        "mean_compress_s": mean("compress_s"),
        "mean_decompress_s_1_thread": mean("decompress_s_1_thread"),
        "mean_decompress_s_2_threads": mean("decompress_s_2_threads"),
        "per_task": {
            task: {
                "n": len(rows),
                "cross_entropy_bits_per_token": mean("cross_entropy_bits", rows) / N,
                "payload_bits_per_token": mean("payload_bits", rows) / N,
                "mean_file_bytes": mean("file_bytes", rows),
                "mean_png_bytes": mean("png_bytes", rows),
                "mean_webp_lossless_bytes": mean("webp_lossless_bytes", rows),
            }
            for task in dict.fromkeys(r["task"] for r in records)  # shapes: EVAL_TASKS order
            if (rows := [r for r in records if r["task"] == task])
        },
    }
    return summary


def compression(args) -> dict:
    pipe = load(args.pipeline)
    coder = LikelihoodCoder(pipe)
    # Another model: the same checkpoint with one weight changed in its last significant bits.
    other = DallePipeline(tokenizer=pipe.tokenizer, transformer=copy.deepcopy(pipe.transformer), vae=pipe.vae)
    with torch.no_grad():
        other.transformer.lm_head.weight[0, 0] += 1e-6
    other_coder = LikelihoodCoder(other)
    # (group, image, caption): a shapes task or an emoji style, kept as "task" in the records and "per_task"
    examples = load_world(args.dataset, args.data_dir).held_out_examples(args.n_images, args.seed)
    codes = pipe.encode_images([image for _, image, _ in examples])  # (n, g, g)
    captions = [caption for _, _, caption in examples]
    scores = pipe.score(image_tokens=codes, captions=captions)
    N = codes[0].numel()
    flip_rng = random.Random(f"flip/{args.seed}")
    records = []
    for i, (task, image, caption) in enumerate(tqdm(examples, desc="compress")):
        with pinned_num_threads(1):
            start = time.perf_counter()
            data = coder.compress_codes(codes[i], caption)
            compress_s = time.perf_counter() - start
        header, payload = coder.read_header(data)
        exact = {}
        decompress_s = {}
        for threads in (1, 2):
            with pinned_num_threads(threads):
                start = time.perf_counter()
                decoded, _ = coder.decompress_codes(data)
                decompress_s[threads] = time.perf_counter() - start
            exact[threads] = bool(torch.equal(decoded, codes[i]))
        reconstruction = pipe.postprocess(pipe.decode_image_tokens(codes[i].flatten()[None]), "pil")[0]
        # A flipped bit at a random position, and another model: both must be refused, never decoded.
        flipped = bytearray(data)
        position = flip_rng.randrange(len(data))
        flipped[position] ^= 1 << flip_rng.randrange(8)
        try:
            coder.decompress_codes(bytes(flipped))
            flipped_refused = False
        except CompressionError:
            flipped_refused = True
        try:
            other_coder.decompress_codes(data)
            other_refused = False
        except CompressionError as error:
            other_refused = "another model" in str(error)
        records.append({
            "task": task,
            "caption": caption,
            "cross_entropy_bits": -scores.log_likelihood_bits[i].item(),
            "unconditional_bits": -scores.unconditional_log_likelihood_bits[i].item(),
            "payload_bits": 8 * len(payload),
            "raw_fallback": bool(header.flags),
            "header_bytes": len(data) - len(payload),
            "file_bytes": len(data),
            "png_bytes": encoded_size(reconstruction, "PNG", optimize=True),
            "webp_lossless_bytes": encoded_size(reconstruction, "WEBP", lossless=True, quality=100, method=6),
            "compress_s": compress_s,
            "decompress_s_1_thread": decompress_s[1],
            "decompress_s_2_threads": decompress_s[2],
            "exact_1_thread": exact[1],
            "exact_2_threads": exact[2],
            "flipped_bit_refused": flipped_refused,
            "other_model_refused": other_refused,
        })

    summary = summarize_compression(records, N, coder.raw_bits, coder.vocab_size)
    probe = determinism_probe(pipe, examples[: args.probe_images])
    return {"summary": summary, "determinism_probe": probe, "records": records,
            "config": {k: v for k, v in vars(args).items() if k not in ("func", "json")}, "threads_note":
            "the coder pins its own thread count (CODING_THREADS = 1); 1 and 2 are the caller's settings"}  # fmt: skip


def resummarize(args) -> dict:
    """A saved `compression` result with its summary recomputed from its records (no model is run)."""
    with open(args.json) as f:
        result = json.load(f)
    old = result["summary"]
    result["summary"] = summarize_compression(result["records"], old["image_tokens"], old["uniform_bits_per_token"],
                                              old["codebook"])  # fmt: skip
    return result


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot classification


def classify(args) -> dict:
    from dalle_hf.eval.classification import zero_shot_classification

    world = load_world(args.dataset, args.data_dir)
    pipe = load(args.pipeline, args.dtype)
    ranking = world.caption_ranking_set(args.n_images, args.n_captions, args.seed)
    pixel_values, candidates, tasks = ranking.pixel_values, ranking.candidates, ranking.groups
    start = time.perf_counter()
    report = zero_shot_classification(pipe, pixel_values, candidates, tasks, batch_size=args.batch_size)
    report["seconds"] = time.perf_counter() - start
    report["config"] = {k: v for k, v in vars(args).items() if k not in ("func", "json")}
    return report


# ----------------------------------------------------------------------------------------------------------------
# Reranking


@torch.no_grad()
def rerank(args) -> dict:
    """One bank of candidates (the calls and generator seeds of ShapesEval's reranked pass, as
    benchmarks/rerank_bank.py draws them), every candidate checked, then each reranker's pick."""
    from dalle_hf.clip import clip_text_image_scores
    from dalle_hf.eval.shapes import _call_seed, _plan_calls, check

    pipe = load(args.pipeline, args.dtype)
    generator_only = DallePipeline(tokenizer=pipe.tokenizer, transformer=pipe.transformer, vae=pipe.vae,
                                   default_guidance_scale=pipe.config.default_guidance_scale)  # fmt: skip
    generator_only.set_progress_bar_config(disable=True)
    tasks = list(EVAL_TASKS)
    N = args.candidates
    plan = _plan_calls(tasks, [("rerank", N)], args.prompts_per_task, args.prompt_seed, args.batch_size)
    rows = []
    for task, stage, batch_index, batch in tqdm(plan, desc="bank"):
        prompts = [p.prompt for p in batch]
        out = generator_only(prompts, num_images_per_prompt=N, output_type="pt",
                             generator=torch.Generator().manual_seed(_call_seed(args.seed, task, batch_index, stage)))
        texts = [p for p in prompts for _ in range(N)]
        clip = clip_text_image_scores(pipe.clip_model, pipe.clip_processor, out.images, texts).float().cpu()
        scores = pipe.score(image_tokens=out.image_tokens, captions=texts, batch_size=args.batch_size)
        for i, eval_prompt in enumerate(batch):
            part = slice(i * N, (i + 1) * N)
            rows.append({
                "task": task,
                "prompt": eval_prompt.prompt,
                "passed": [bool(check(image, eval_prompt)) for image in pipe.postprocess(out.images[part], "pil")],
                "clip": clip[part].tolist(),
                "log_likelihood": scores.log_likelihood[part].tolist(),
                "unconditional": scores.unconditional_log_likelihood[part].tolist(),
            })

    def z(values):
        values = np.asarray(values, dtype=np.float64)
        return (values - values.mean()) / max(values.std(), 1e-12)

    def ratio(r):
        return np.asarray(r["log_likelihood"]) - np.asarray(r["unconditional"])

    rankers = {  # the pipeline's rerank= options, then the likelihood ratio to empty text (not shipped) and with CLIP
        "clip": lambda r: np.asarray(r["clip"]),
        "likelihood": lambda r: np.asarray(r["log_likelihood"]),
        "both": lambda r: z(r["clip"]) + z(r["log_likelihood"]),
        "likelihood ratio to empty text": ratio,
        "clip + likelihood ratio": lambda r: z(r["clip"]) + z(ratio(r)),
    }
    picks = {name: [r["passed"][int(np.argmax(fn(r)))] for r in rows] for name, fn in rankers.items()}
    table = {"random pick": {t: float(np.mean([np.mean(r["passed"]) for r in rows if r["task"] == t])) for t in tasks}}
    for name, hits in picks.items():
        table[name] = {t: float(np.mean([h for h, r in zip(hits, rows) if r["task"] == t])) for t in tasks}
    table["checker best-of-N"] = {t: float(np.mean([any(r["passed"]) for r in rows if r["task"] == t])) for t in tasks}
    six = [t for t in tasks if t != "novel"]
    summary = {name: {"six_task_mean": float(np.mean([row[t] for t in six])), "novel": row["novel"]}
               for name, row in table.items()}  # fmt: skip
    paired = {
        name: {"wins": sum(a and not b for a, b in zip(picks[name], picks["clip"])),
               "losses": sum(b and not a for a, b in zip(picks[name], picks["clip"]))}
        for name in picks if name != "clip"
    }  # fmt: skip
    return {"per_task": table, "summary": summary, "paired_vs_clip": paired, "n_prompts": len(rows), "rows": rows,
            "config": {k: v for k, v in vars(args).items() if k not in ("func", "json")}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(required=True)
    c = sub.add_parser("compression", help="round trips, sizes and speed on held-out renders")
    c.add_argument("--pipeline", required=True)
    c.add_argument("--n-images", dest="n_images", type=int, default=200)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--probe-images", dest="probe_images", type=int, default=3, help="images for the determinism probe")
    c.set_defaults(func=compression)
    z = sub.add_parser("classify", help="zero-shot classification by likelihood beside CLIP")
    z.add_argument("--pipeline", required=True)
    z.add_argument("--n-images", dest="n_images", type=int, default=300)
    z.add_argument("--n-captions", dest="n_captions", type=int, default=8)
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    z.add_argument("--dtype", choices=DTYPES, default="float32")
    z.set_defaults(func=classify)
    r = sub.add_parser("rerank", help="likelihood reranking against CLIP's on one bank of candidates")
    r.add_argument("--pipeline", required=True)
    r.add_argument("--prompts-per-task", dest="prompts_per_task", type=int, default=20)
    r.add_argument("--candidates", type=int, default=12)
    r.add_argument("--prompt-seed", dest="prompt_seed", type=int, default=1, help="1: the dev prompts")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--batch-size", dest="batch_size", type=int, default=48)
    r.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    r.set_defaults(func=rerank)
    s = sub.add_parser("resummarize", help="recompute a compression JSON's summary from its records")
    s.set_defaults(func=resummarize)
    for p in (c, z):
        p.add_argument("--dataset", default="shapes", help="the world: shapes, emoji, ...")
        p.add_argument("--data-dir", dest="data_dir", default=None, help="its data (emoji: the cache folder)")
    for p in (c, z, r):
        p.add_argument("--json", help="write the result here")
    s.add_argument("--json", required=True, help="a `compression` result, rewritten in place")
    args = parser.parse_args()
    result = args.func(args)
    shown = result.get("summary", result)
    print(json.dumps({"summary": shown, **({"per_task": result["per_task"]} if "per_task" in result else {}),
                      **({"determinism_probe": result["determinism_probe"]} if "determinism_probe" in result else {}),
                      **({"paired_vs_clip": result["paired_vs_clip"]} if "paired_vs_clip" in result else {})},
                     indent=2))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
