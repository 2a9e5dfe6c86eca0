"""
What `train_dalle --held_out_images` costs a run: preparing the images once, and one measurement.

Builds the measurement exactly as `train_dalle` does (`held_out_draw`, `training_draw` from a saved codes file,
`HeldOutLoss`), for a randomly initialised transformer of the given shape (the time does not depend on the weights),
and times it under each `--mixed_precision`. Run it on one thread, as training runs:

    OMP_NUM_THREADS=1 python benchmarks/held_out_loss_cost.py --cache /work/emoji-cache \
        --vae /work/runs/dvae-emoji32/vae --codes /work/runs/codes/emoji32-k7.safetensors \
        --tokenizer checkpoints/dalle-emoji/tokenizer --n_layer 6 --n_head 4 --n_embd 256 --text_seq_len 20
"""

import argparse
import contextlib
import functools
import json
import time

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dalle_hf.configuration_dalle import DalleConfig
from dalle_hf.data.world import load_world
from dalle_hf.modeling_dalle import DalleForImageGeneration
from dalle_hf.train_dalle import HELD_OUT_IMAGES, EncodedImages, HeldOutLoss, held_out_draw, training_draw
from dalle_hf.training_utils import load_frozen_vae


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="The emoji cache.")
    parser.add_argument("--vae", required=True, help="The run's dVAE.")
    parser.add_argument("--codes", required=True, help="The run's image codes (train_dalle's --image_codes).")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--n_images", type=int, default=HELD_OUT_IMAGES, help="--held_out_images.")
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--text_seq_len", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32, help="--train_batch_size (rows per forward).")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    world, vae = load_world("emoji", args.cache), load_frozen_vae(args.vae)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    encoded = EncodedImages(world.train_dataset(vae.config.image_size, 0), load_file(args.codes)["image_ids"])

    def tokenize(captions):
        return tokenizer(captions, padding="max_length", truncation=True, max_length=args.text_seq_len,
                         return_tensors="pt")["input_ids"]  # fmt: skip

    start = time.perf_counter()
    held_out = held_out_draw(world, args.n_images, vae)
    train = training_draw(world, len(held_out[1]), vae, encoded, seed=0)
    measure = HeldOutLoss((tokenize(held_out[0]), held_out[1]), (tokenize(train[0]), train[1]), args.batch_size)
    prepare_s = time.perf_counter() - start

    config = DalleConfig(text_vocab_size=len(tokenizer), text_seq_len=args.text_seq_len,
                         image_vocab_size=vae.config.vocab_size, image_grid_size=vae.config.grid_size,
                         pad_token_id=tokenizer.pad_token_id, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd, dropout=0.1)  # fmt: skip
    torch.manual_seed(0)
    model = DalleForImageGeneration(config).train()
    report = {"threads": torch.get_num_threads(), "held_out_images": len(held_out[1]), "train_images": len(train[1]),
              "grid": vae.config.grid_size, "prepare_seconds": round(prepare_s, 2), "measure_seconds": {}}  # fmt: skip
    # what `accelerator.autocast` is on a CPU for --mixed_precision no and bf16
    autocasts = {"no": contextlib.nullcontext, "bf16": functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)}
    for precision, autocast in autocasts.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            losses = measure(model, autocast)
            times.append(time.perf_counter() - start)
        report["measure_seconds"][precision] = {"min": round(min(times), 2), "all": [round(t, 2) for t in times],
                                                "losses": losses}  # fmt: skip
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
