"""Training step time of DALL-E transformers of several sizes on one image-token grid: what sizes a model for a
fixed CPU budget.

    OMP_NUM_THREADS=1 python benchmarks/transformer_step_time.py --grid 8 --sizes 6x256,8x320,8x384 --steps 8

Each size runs `--steps` timed AdamW updates (after two warm-up updates) on random codes, batch `--batch`, under
bf16 autocast as `train_dalle --mixed_precision bf16` runs them, and reports the CPU seconds per update (the
process's CPU time, which a paused process does not accumulate), the captions per CPU-hour and the parameters.
"""

import argparse
import json
import time

import torch

from dalle_hf.configuration_dalle import DalleConfig
from dalle_hf.modeling_dalle import DalleForImageGeneration


def parse_size(text: str) -> tuple[int, int]:
    """`"6x256"` -> `(6, 256)`: layers x width."""
    layers, width = text.lower().split("x")
    return int(layers), int(width)


def time_size(n_layer: int, n_embd: int, args) -> dict:
    torch.manual_seed(0)
    config = DalleConfig(text_vocab_size=2048, text_seq_len=args.text_seq_len, image_vocab_size=args.vocab,
                         image_grid_size=args.grid, n_layer=n_layer, n_head=max(1, n_embd // 64),
                         n_embd=n_embd)  # fmt: skip
    model = DalleForImageGeneration(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(1, 2048, (args.batch, args.text_seq_len))
    image_ids = torch.randint(0, args.vocab, (args.batch, args.grid * args.grid))
    cpu = []
    for step in range(args.steps + 2):
        start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=input_ids, image_ids=image_ids, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            cpu.append(time.process_time() - start)
    seconds = sum(cpu) / len(cpu)
    return {"size": f"{n_layer}x{n_embd}", "n_head": config.n_head,
            "parameters": sum(p.numel() for p in model.parameters()), "cpu_seconds_per_step": round(seconds, 3),
            "captions_per_cpu_hour": round(args.batch * 3600 / seconds)}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=int, default=8, help="image tokens per side (8: 64 image tokens)")
    parser.add_argument("--sizes", default="6x256,8x320,8x384", help="comma-separated LAYERSxWIDTH")
    parser.add_argument("--text_seq_len", type=int, default=20, help="the emoji model's caption length")
    parser.add_argument("--vocab", type=int, default=1024, help="image codes")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed updates per size")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 instead of bf16 autocast")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "grid": args.grid, "batch": args.batch, "bf16": args.bf16,
               "sizes": [time_size(*parse_size(s), args) for s in args.sizes.split(",")]}  # fmt: skip
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
