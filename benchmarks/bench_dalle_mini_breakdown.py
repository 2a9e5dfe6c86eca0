"""Where one guided DALL·E mini image spends its time, in dalle-hf and in min-dalle 0.4.11, on the same random weights.

    python benchmarks/bench_dalle_mini_breakdown.py [--threads 2] [--tiny] [--weights DIR] [--out FILE.json]

One image in float32, super-conditioning 10 (batch `[uncond ; cond]`), top-k 256, the weights of
`bench_dalle_mini.py` (min-dalle's own modules, default init, seed 0) loaded the same way. Parts, each timed on its
own (perf_counter around the part, nothing overlapping):

- text: the encoder on `[uncond ; cond]` (dalle-hf: with the cross-attention keys and values of every decoder
  layer and the first decoder step, the model's prefill forward; min-dalle: its encoder, whose decoder projects the
  text again at every step);
- steps: the 256 decoder forwards (dalle-hf: `decode_step`; min-dalle: `DalleBartDecoder.forward`), total and
  per step (median) at positions 1-64, 65-128, 129-192 and 193-255;
- sampling: guidance, top-k and the draw (dalle-hf: the lines of `sample_image_tokens`; min-dalle: the lines of
  `sample_tokens` after its forward);
- VQGAN: one 16 x 16 grid of codes to a 256 x 256 image with the VQGAN f16 16384's shapes (dalle-hf: diffusers'
  `VQModel` through `decode_codes`; min-dalle: `VQGanDetokenizer`), random default-init weights. `bench_dalle_mini.py`
  does not time it (it is the same work whichever transformer drew the codes).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_dalle_mini import SUPERCONDITION, bench_config, make_weights, text_rows  # noqa: E402

TOP_K = 256


def summarize(step_seconds: list[float]) -> dict:
    """255 step times -> their total and the median of each run of 64 positions (ms)."""
    quarters = [step_seconds[i : i + 64] for i in range(0, len(step_seconds), 64)]
    return {"total_s": sum(step_seconds), "median_ms_by_quarter": [statistics.median(q) * 1e3 for q in quarters]}


@torch.no_grad()
def dalle_hf_parts(config, weights: str) -> dict:
    from dalle_hf.convert_dalle_mini import expected_shapes, load_state_dict, prefixed_state_dict
    from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
    from dalle_hf.pipeline_dalle import DallePipeline, filter_logits

    expected = expected_shapes(config)
    state = {}
    for prefix in ("encoder", "decoder"):
        path = os.path.join(weights, f"{prefix}.pt")
        state |= prefixed_state_dict(load_state_dict(path), f"{prefix}.", expected, path)
    with torch.device("meta"):
        model = DalleBartForImageGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    out = model(input_ids=text_rows(config), use_cache=True, logits_to_keep=1)
    text_s = time.perf_counter() - start
    cache, logits = out.cache, model.image_logits(out.logits[:, -1])
    steps, sampling = [], []
    for i in range(config.image_seq_len):
        start = time.perf_counter()
        uncond, cond = logits.float().chunk(2)
        guided = filter_logits(uncond + SUPERCONDITION * (cond - uncond), TOP_K, None)  # (1, V_i)
        token = DallePipeline.draw(guided.softmax(-1), generator)  # (1, 1)
        sampling.append(time.perf_counter() - start)
        if i + 1 < config.image_seq_len:
            start = time.perf_counter()
            logits = model.decode_step(token.repeat(2, 1), cache)  # (2, V_i)
            steps.append(time.perf_counter() - start)
    return {"text_s": text_s, "steps": summarize(steps), "sampling_s": sum(sampling)}


@torch.no_grad()
def min_dalle_parts(config, weights: str) -> dict:
    from dalle_hf.convert_dalle_mini import load_state_dict
    from tests.dalle_bart_reference import min_dalle_modules

    with torch.device("meta"):
        encoder, decoder = min_dalle_modules(config)
    for module, name in ((encoder, "encoder.pt"), (decoder, "decoder.pt")):
        module.load_state_dict(load_state_dict(os.path.join(weights, name)), strict=True, assign=True)
    torch.manual_seed(0)
    text = text_rows(config)
    start = time.perf_counter()
    encoder_state = encoder.forward(text)  # (2, L, C)
    text_s = time.perf_counter() - start
    attention_mask = text.not_equal(1)[:, None, None, :]
    attention_state = torch.zeros(decoder.layer_count, 4, 256, decoder.embed_count)
    tokens = torch.full((1, 257), config.decoder_start_token_id, dtype=torch.long)
    steps, sampling = [], []
    for i in range(256):  # `sample_tokens`: its forward, then its sampling lines
        start = time.perf_counter()
        logits, attention_state = decoder.forward(
            attention_mask=attention_mask, encoder_state=encoder_state, attention_state=attention_state,
            prev_tokens=tokens[:, [i]], token_index=torch.tensor([i]),
        )  # fmt: skip
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        logits = logits[:, -1, : 2**14]
        logits = logits[:1] * (1 - SUPERCONDITION) + logits[1:] * SUPERCONDITION
        logits_sorted, _ = logits.sort(descending=True)
        is_kept = logits >= logits_sorted[:, TOP_K - 1]
        logits -= logits_sorted[:, [0]]
        logits.exp_()
        logits *= is_kept.to(torch.float32)
        tokens[:, i + 1] = torch.multinomial(logits, 1)[:, 0]
        sampling.append(time.perf_counter() - start)
    # the first step counts with the text, as in dalle-hf's prefill
    return {"text_s": text_s + steps[0], "steps": summarize(steps[1:]), "sampling_s": sum(sampling)}


@torch.no_grad()
def vqgan_seconds(repeats: int = 3) -> dict:
    from diffusers import VQModel

    from dalle_hf.convert_vqgan import decode_codes, vqgan_config
    from tests.dalle_bart_reference import load_min_dalle_models

    torch.manual_seed(0)
    ours, theirs = VQModel(**vqgan_config()).eval(), load_min_dalle_models().VQGanDetokenizer().eval()
    codes = torch.randint(0, 16384, (1, 256))
    times = {"dalle-hf": [], "min-dalle": []}
    for _ in range(repeats):
        start = time.perf_counter()
        decode_codes(ours, codes)  # (1, 3, 256, 256)
        times["dalle-hf"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs.forward(False, codes)  # (256, 256, 3)
        times["min-dalle"].append(time.perf_counter() - start)
    return {impl: statistics.median(t) for impl, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, no VQGAN: a smoke run of the script")
    parser.add_argument("--weights", help="a folder with bench_dalle_mini's encoder.pt and decoder.pt (else written)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_dalle_mini_breakdown.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = bench_config(args.tiny)
    with tempfile.TemporaryDirectory() as scratch:
        weights = args.weights or scratch
        if not args.weights:
            make_weights(weights, args.tiny)
        results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "top_k": TOP_K,
                   "supercondition": SUPERCONDITION}  # fmt: skip
        for impl, parts in (("dalle-hf", dalle_hf_parts), ("min-dalle", min_dalle_parts)):
            parts(config, weights)  # untimed: pages the weights in
            results[impl] = parts(config, weights)
            print(impl, json.dumps(results[impl]), flush=True)
    if not args.tiny:
        vqgan = vqgan_seconds()
        for impl in ("dalle-hf", "min-dalle"):
            results[impl]["vqgan_decode_s"] = vqgan[impl]
        print("VQGAN decode 256 x 256:", json.dumps(vqgan))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
