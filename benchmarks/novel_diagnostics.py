"""Where `novel` (held-out colour/shape pairs) is lost: the dVAE's codes, the transformer's likelihood, CLIP's binding.

    # the dVAE and the transformer, on fresh renders of each held-out pair and of the same shape in seen colours
    OMP_NUM_THREADS=2 python benchmarks/novel_diagnostics.py likelihood --pipeline checkpoints/dalle-shapes
    # CLIP, on the passing candidates of a rerank_bank.py bank (dev prompts): true caption vs its shape swap
    OMP_NUM_THREADS=2 python benchmarks/novel_diagnostics.py binding --pipeline checkpoints/dalle-shapes \
        --bank runs/rerank-bank-novel-g3 --bank runs/rerank-bank-dev-g3

`likelihood` asks two questions of every held-out pair ("a purple triangle") and of the same shape in two seen
colours ("a red triangle", "a blue triangle"), 64 fresh renders each:
- are the dVAE codes of the renders ones the transformer was trained on? (the share of object codes, those of
  grid cells with any non-white pixel, that occur fewer than 20 times, or never, in 800 training renders per task);
- how many nats the transformer spends on the renders' codes, teacher-forced, under the true caption and under
  other captions, and per object code from the 5th object code on (raster order: the apex or top edge has set
  the colour by then).

`binding` takes every candidate the checker passes for a two-phrase prompt ("an orange diamond and a green
circle") and asks whether CLIP scores it higher under its true caption or under the caption with its two shape
words swapped ("an orange circle and a green diamond"). For `color_attr` (seen pairs) the swap describes a
different scene CLIP was trained to tell apart; for `novel` it names two seen pairs.
"""

import argparse
import collections
import json
import os
import random

import numpy as np
import torch
import torch.nn.functional as F

from dalle_hf import DallePipeline
from dalle_hf.clip import clip_text_image_scores
from dalle_hf.data.imagefolder import pil_to_tensor
from dalle_hf.data.shapes import HELD_OUT_PAIRS, TASKS, render_scene, sample_example, scene_from_caption

SEEN_COLOURS = ("red", "blue")  # every shape is drawn in these in training
TAIL_FROM = 4  # object codes after the first 4 in raster order: the object's colour is drawn by then
WHITE = 240  # a grid cell with any channel of any pixel below this shows part of an object


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _codes(vae, images) -> torch.LongTensor:
    pixels = torch.stack([pil_to_tensor(image) for image in images])  # (B, 3, H, W) in [0, 1]
    return vae.get_codebook_indices(pixels).flatten(1)  # (B, g * g)


def _object_cells(images, grid: int) -> torch.BoolTensor:
    """(B, g * g) True where the grid cell has a non-white pixel, in the codes' raster order."""
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]))  # (B, H, W, 3)
    dark = (pixels < WHITE).any(dim=-1).float()[:, None]  # (B, 1, H, W)
    return F.max_pool2d(dark, pixels.shape[1] // grid).flatten(1).bool()  # (B, g * g)


def _image_nll(pipe, captions: list[str], codes: torch.LongTensor) -> torch.Tensor:
    """(B, n) nats per image code, teacher-forced, each row under its own caption."""
    transformer, L = pipe.transformer, pipe.transformer.config.text_seq_len
    input_ids = pipe.encode_prompt(captions)  # (B, L), as the pipeline samples from them
    logits = transformer(input_ids=input_ids, image_ids=codes).logits  # (B, 1 + L + n, V)
    logits = transformer.image_logits(logits[:, L : L + codes.shape[1]]).float()  # position L predicts code 0
    return F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")  # (B, n)


@torch.no_grad()
def likelihood(args) -> dict:
    pipe = DallePipeline.from_pretrained(args.pipeline)
    rng = random.Random("novel-diagnostics/train")
    train_codes = torch.cat([_codes(pipe.vae, [sample_example(rng, task)[0] for _ in range(args.train_renders)])
                             for task in TASKS])  # fmt: skip
    counts = collections.Counter(train_codes.flatten().tolist())
    grid = pipe.vae.config.grid_size
    result = {"train_renders": len(train_codes), "codes_in_training": len(counts), "captions": {}}
    for colour, shape in sorted(HELD_OUT_PAIRS):
        for c in (colour,) + SEEN_COLOURS:
            caption = f"{_article(c)} {c} {shape}"
            rng = random.Random(f"novel-diagnostics/{caption}")
            images = [render_scene(scene_from_caption(caption, rng)) for _ in range(args.renders)]
            codes, cells = _codes(pipe.vae, images), _object_cells(images, grid)  # (B, g * g) each
            objects = codes[cells].tolist()
            others = [f"{_article(SEEN_COLOURS[0])} {SEEN_COLOURS[0]} {shape}",
                      f"{_article(colour)} {colour} {'square' if shape == 'circle' else 'circle'}", f"a {shape}"]
            nats = {}
            for text in dict.fromkeys([caption] + others):  # the true caption first, no repeats
                nats[text] = float(_image_nll(pipe, [text] * len(codes), codes).sum(1).mean())
            per_code = _image_nll(pipe, [caption] * len(codes), codes)
            rank = cells.long().cumsum(1) * cells  # 1-based rank among the object's codes, 0 off the object
            result["captions"][caption] = {
                "held_out": (c, shape) in HELD_OUT_PAIRS,
                "object_codes_seen_under_20_times": float(np.mean([counts[k] < 20 for k in objects])),
                "object_codes_never_seen": float(np.mean([counts[k] == 0 for k in objects])),
                "nats_per_image": {k: round(v, 1) for k, v in nats.items()},
                "nats_per_object_code": round(float(per_code[cells].mean()), 3),
                f"nats_per_object_code_after_{TAIL_FROM}": round(float(per_code[rank > TAIL_FROM].mean()), 3),
                "nats_per_blank_code": round(float(per_code[~cells].mean()), 3),
            }
            row = result["captions"][caption]
            print(f"{caption:20} held-out={row['held_out']!s:5} rare={row['object_codes_seen_under_20_times']:.3f} "
                  f"unseen={row['object_codes_never_seen']:.3f} nats/object code {row['nats_per_object_code']:.2f} "
                  f"(after {TAIL_FROM}: {row[f'nats_per_object_code_after_{TAIL_FROM}']:.2f}), "
                  f"nats/blank code {row['nats_per_blank_code']:.3f}; "
                  f"nats: " + ", ".join(f"{k!r} {v}" for k, v in row["nats_per_image"].items()), flush=True)
    return result


def _shape_swap(prompt: str) -> str | None:
    """'an orange diamond and a green circle' -> 'an orange circle and a green diamond' (None if not that form)."""
    words = prompt.split()
    if words.count("and") != 1 or len(words) != 7:
        return None
    words[2], words[6] = words[6], words[2]
    return " ".join(words)


@torch.no_grad()
def binding(args) -> dict:
    pipe = DallePipeline.from_pretrained(args.pipeline, dtype=torch.bfloat16)
    result = {}
    for bank in args.bank:
        with np.load(os.path.join(bank, "bank.npz")) as data:  # each key access decompresses: read once
            images, passed = data["images"], data["passed"]  # (P, N, H, W, 3) uint8, (P, N) bool
        with open(os.path.join(bank, "bank.json")) as f:
            meta = json.load(f)
        prefers_swap = collections.defaultdict(list)
        for i, (prompt, task) in enumerate(zip(meta["prompts"], meta["tasks"])):
            swapped = _shape_swap(prompt)
            passing = np.flatnonzero(passed[i])
            if task not in ("novel", "color_attr") or swapped is None or len(passing) == 0:
                continue
            pixels = torch.from_numpy(images[i][passing]).permute(0, 3, 1, 2).float() / 255  # (P, 3, H, W)
            true = clip_text_image_scores(pipe.clip_model, pipe.clip_processor, pixels, [prompt] * len(pixels))
            swap = clip_text_image_scores(pipe.clip_model, pipe.clip_processor, pixels, [swapped] * len(pixels))
            prefers_swap[task] += (swap > true).tolist()
        for task, flags in prefers_swap.items():
            result[f"{bank}:{task}"] = {"passing_candidates": len(flags), "clip_prefers_swap": float(np.mean(flags))}
            print(f"{bank} {task}: {len(flags)} passing two-phrase candidates; CLIP scores the shape-swapped "
                  f"caption higher on {np.mean(flags):.3f} of them", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(required=True)
    lk = sub.add_parser("likelihood", help="dVAE code coverage and teacher-forced nats, held-out vs seen pairs")
    lk.add_argument("--pipeline", required=True)
    lk.add_argument("--renders", type=int, default=64, help="renders per caption")
    lk.add_argument("--train-renders", type=int, default=800, help="training renders per task for code counts")
    lk.add_argument("--json", help="also write the result here")
    lk.set_defaults(func=likelihood)
    bd = sub.add_parser("binding", help="CLIP on passing two-phrase candidates: true caption vs shape swap")
    bd.add_argument("--pipeline", required=True, help="its CLIP scores")
    bd.add_argument("--bank", action="append", required=True, help="a rerank_bank.py build --out folder")
    bd.add_argument("--json", help="also write the result here")
    bd.set_defaults(func=binding)
    args = parser.parse_args()
    if getattr(args, "renders", 1) < 1 or getattr(args, "train_renders", 1) < 1:
        raise ValueError("--renders and --train-renders must be at least 1")
    result = args.func(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
