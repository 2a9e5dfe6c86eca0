"""KV-cached sampling vs. full recomputation (the reference: re-run the whole sequence for every new token).

    OMP_NUM_THREADS=2 python benchmarks/bench_kv_cache.py [--batch 16] [--grid 8] [--repeats 3]

Prints tokens/s of both and the speed-up, medians of repeats, with the thread count. Quoted in issue notes and
docs; never asserted in tests.
"""

import argparse
import statistics
import time

import torch

from dalle_hf.configuration_dalle import DalleConfig
from dalle_hf.modeling_dalle import DalleForImageGeneration


@torch.no_grad()
def sample_cached(model, text, generator):
    out = model(input_ids=text, use_cache=True, logits_to_keep=1)
    tokens = []
    for i in range(model.config.image_seq_len):
        nxt = torch.multinomial(model.image_logits(out.logits[:, -1]).float().softmax(-1), 1, generator=generator)
        tokens.append(nxt)
        if i + 1 < model.config.image_seq_len:
            out = model(image_ids=nxt, cache=out.cache, logits_to_keep=1)
    return torch.cat(tokens, 1)


@torch.no_grad()
def sample_full(model, text, generator):
    tokens = torch.zeros(text.shape[0], 0, dtype=torch.long)
    for _ in range(model.config.image_seq_len):
        logits = model(input_ids=text, image_ids=tokens, logits_to_keep=1).logits[:, -1]
        nxt = torch.multinomial(model.image_logits(logits).float().softmax(-1), 1, generator=generator)
        tokens = torch.cat([tokens, nxt], 1)
    return tokens


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grid", type=int, default=8, help="image grid side: 8 -> 64 image tokens")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--text_seq_len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = DalleConfig(text_vocab_size=512, text_seq_len=args.text_seq_len, image_vocab_size=512,
                         image_grid_size=args.grid, n_layer=args.layers, n_head=max(1, args.width // 64),
                         n_embd=args.width)
    model = DalleForImageGeneration(config).eval()
    text = torch.randint(3, 512, (args.batch, args.text_seq_len))
    n_tokens = args.batch * config.image_seq_len
    print(f"threads={torch.get_num_threads()} batch={args.batch} image_tokens={config.image_seq_len} "
          f"layers={args.layers} width={args.width} text_seq_len={args.text_seq_len}")
    results = {}
    for name, fn in (("cached", sample_cached), ("full", sample_full)):
        times = []
        for r in range(args.repeats):
            start = time.perf_counter()
            tokens = fn(model, text, torch.Generator().manual_seed(r))
            times.append(time.perf_counter() - start)
        results[name] = (tokens, times)
        print(f"{name:>6}: median {statistics.median(times):.3f}s min {min(times):.3f}s  "
              f"{n_tokens / statistics.median(times):,.0f} image tokens/s")
    same = torch.equal(sample_cached(model, text, torch.Generator().manual_seed(0)),
                       sample_full(model, text, torch.Generator().manual_seed(0)))
    speedup = statistics.median(results["full"][1]) / statistics.median(results["cached"][1])
    print(f"speed-up (median full / median cached): {speedup:.1f}x; identical tokens for the same seed: {same}")


if __name__ == "__main__":
    main()
