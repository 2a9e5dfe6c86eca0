"""Inpainting on the shapes world, checked exactly: replace one object of a two-object scene, keep the other.

Each edit renders "a {A} {relation} a {B}" (training colors and shapes, colored position captions as in training),
masks one object's bounding box (plus `--mask-margin` px), and asks for the scene with that object replaced by one
of another color and shape: "a red circle left of a blue square", the square masked, prompt "a red circle left of a
green triangle". An edit passes when the checker (`dalle_hf.eval.shapes.detect_objects`, which reads pixels) finds
exactly two objects: the kept one with its color, shape and size class within 2 px of where it was, and the new
color and shape centered inside the mask, with the prompt's relation holding (`caption_holds`).

For every edit the N candidates are drawn once (`DalleInpaintPipeline`, N kept), and every ranking is scored on
those same candidates:

- unranked: the candidates in drawn order; best-of-1 is the mean pass rate over all N (the exact expectation);
- clip: CLIP similarity of the pasted image to the prompt;
- likelihood: `log p(codes | prompt)` of the whole code grid (`DallePipeline.score`; the pipeline's
  `rerank="likelihood"`);
- likelihood_ratio: `log p(codes | prompt) - log p(codes | empty text)`;
- both: CLIP and likelihood z-scored over the N candidates and added (the pipeline's `rerank="both"`, its default);
- both_ratio: the same with `likelihood_ratio`;
- oracle: any of the N passes (the ceiling of any ranking).

best-of-k for k < N takes the ranking's top among random k-subsets of the N (disjoint subsets of a seeded
permutation, averaged), so best-of-4 is what a user asking for 4 candidates would see.

    flock /tmp/cpu-heavy.lock python benchmarks/inpaint_shapes.py --edits 300 \
        --out benchmarks/results/inpaint_shapes_dalle-shapes.json
"""

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from dalle_hf.data.shapes import (
    COLORS,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    caption_holds,
    format_caption,
    render_scene,
    scene_from_caption,
)
from dalle_hf.eval.shapes import detect_objects
from dalle_hf.pipeline_dalle import DallePipeline, standardize_per_group
from dalle_hf.pipeline_dalle_inpaint import DalleInpaintPipeline

RANKINGS = ("unranked", "clip", "likelihood", "likelihood_ratio", "both", "both_ratio", "context", "clip_context",
            "masked_ratio", "clip_masked_ratio", "clip_context_masked_ratio", "oracle")
SWEEP_WEIGHTS = (0.25, 0.5, 1.0, 2.0)  # weights of the likelihood term added to CLIP in the summary's sweep
KEPT_TOLERANCE_PX = 2.0  # the kept object's center may move this much (it is pasted back, so it should not move)
TRAINING_PAIRS = [(c, s) for s in SHAPES for c in COLORS if (c, s) not in HELD_OUT_PAIRS]


@dataclass
class Edit:
    image: object  # PIL image of the original scene
    mask: np.ndarray  # (64, 64) bool, True = repaint
    prompt: str  # the caption of the edited scene
    kept: ShapeObject
    new_color: str
    new_shape: str
    mask_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) exclusive
    target: Scene  # the ideal edit: the new object drawn in the old one's box


def position_caption(a: tuple[str, str], relation: str, b: tuple[str, str]) -> str:
    """ "a red circle left of an orange square": (colour, shape) pairs in the world's own wording."""
    objects = [{"shape": shape, "color": color, "size": None} for color, shape in (a, b)]
    return format_caption({"objects": objects, "relation": relation, "count": None})


def sample_edit(rng: random.Random, margin: int) -> Edit:
    """A two-object position scene, one object masked, and a new object of another color and shape for its place."""
    (ca, sa) = rng.choice(TRAINING_PAIRS)
    (cb, sb) = rng.choice([(c, s) for c, s in TRAINING_PAIRS if c != ca and s != sa])
    relation = rng.choice(RELATIONS)
    scene = scene_from_caption(position_caption((ca, sa), relation, (cb, sb)), rng, allow_held_out=False)
    m = rng.randrange(2)  # which object to replace
    old, kept = scene.objects[m], scene.objects[1 - m]
    new_color, new_shape = rng.choice(
        [(c, s) for c, s in TRAINING_PAIRS if c not in (ca, cb) and s not in (sa, sb)]
    )
    new = ShapeObject(new_shape, new_color, old.size_name, old.cx, old.cy, old.size_px)
    objects = (new, kept) if m == 0 else (kept, new)
    prompt = position_caption((objects[0].color, objects[0].shape), relation, (objects[1].color, objects[1].shape))
    x0, y0, x1, y1 = old.bbox
    box = (max(0, math.floor(x0) - margin), max(0, math.floor(y0) - margin),
           min(IMAGE_SIZE, math.ceil(x1) + margin), min(IMAGE_SIZE, math.ceil(y1) + margin))  # fmt: skip
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    target = Scene(objects, prompt, "position", relation)
    return Edit(render_scene(scene), mask, prompt, kept, new_color, new_shape, box, target)


def edit_passes(image, edit: Edit) -> bool:
    """Exactly two objects: the kept one unchanged, the new one inside the mask, and the prompt holds."""
    objects = detect_objects(image)
    if len(objects) != 2:
        return False
    k = edit.kept
    kept_ok = any(
        o.color == k.color and o.shape == k.shape and o.size_name == k.size_name
        and abs(o.cx - k.cx) <= KEPT_TOLERANCE_PX and abs(o.cy - k.cy) <= KEPT_TOLERANCE_PX
        for o in objects
    )
    x0, y0, x1, y1 = edit.mask_box
    new_ok = any(
        o.color == edit.new_color and o.shape == edit.new_shape and x0 <= o.cx <= x1 and y0 <= o.cy <= y1
        for o in objects
    )
    return kept_ok and new_ok and caption_holds(edit.prompt, objects)


def region_log_likelihoods(pipe, image_tokens, cells, prompt: str) -> dict[str, torch.Tensor]:
    """Each candidate's code log-likelihood (nats, float64, (N,)) split by region of the raster order: the masked
    cells ("masked"), and the kept cells after the first masked one ("after"), which the sampler could not see
    when it filled the mask; "whole" is the whole grid (the kept cells before the mask add the same to every
    candidate). `*_ratio` subtracts the same region's log-likelihood given empty text."""
    n = len(image_tokens)
    codes = image_tokens.reshape(n, -1)  # (N, g*g) raster order
    masked = cells.reshape(-1).bool()  # (g*g,)
    first = int(masked.nonzero()[0])
    after = ~masked & (torch.arange(masked.numel()) > first)
    cond = pipe.code_log_probs(codes, pipe.encode_prompt([prompt] * n))  # (N, g*g)
    uncond = pipe.code_log_probs(codes, pipe.unconditional_ids(n))  # (N, g*g)
    out = {"whole": cond.sum(-1), "whole_ratio": (cond - uncond).sum(-1)}
    for name, region in (("masked", masked), ("after", after)):
        out[name] = cond[:, region].sum(-1)
        out[f"{name}_ratio"] = (cond - uncond)[:, region].sum(-1)
    return out


def best_of(passed: np.ndarray, score: np.ndarray | None, k: int, order: np.ndarray) -> float:
    """Mean pass of the top-scored candidate over the disjoint k-subsets of the N that `order` (a random
    permutation, the same for every ranking) cuts; `score=None` is the unranked draw (the mean over all N)."""
    if score is None:
        return float(passed.mean())
    groups = order[: len(passed) // k * k].reshape(-1, k)  # (n_groups, k)
    best = groups[np.arange(len(groups)), score[groups].argmax(1)]
    return float(passed[best].mean())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/dalle-shapes")
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--candidates", type=int, default=16, help="N drawn once per edit")
    parser.add_argument("--best_of", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask_margin", type=int, default=1, help="px added around the masked object's box")
    parser.add_argument("--mask_dilation", type=int, default=0)
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--out", default="benchmarks/results/inpaint_shapes_dalle-shapes.json")
    parser.add_argument("--summarize_only", action="store_true",
                        help="recompute --out's summary from its saved records (no model is run)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.edits < 1 or args.candidates < 1 or any(not 1 <= k <= args.candidates for k in args.best_of):
        parser.error("--edits and --candidates must be >= 1 and every --best_of in [1, candidates]")
    return args


def resummarize(args) -> dict:
    """--out's saved result with its summary recomputed from its records (its run's settings and sanity kept)."""
    with open(args.out) as f:
        saved = json.load(f)
    for key in ("edits", "candidates", "seed", "mask_margin", "mask_dilation"):
        setattr(args, key, saved[key])
    n = len(saved["records"])
    sanity = {"input_passes": saved["checker_sanity"]["input_image_passes"] * n,
              "ideal_edit_passes": saved["checker_sanity"]["ideal_edit_passes"] * n}  # fmt: skip
    result = summarize(saved["records"], sanity, args, saved["seconds"], saved["complete"])
    result["checkpoint"], result["torch_threads"] = saved["checkpoint"], saved["torch_threads"]
    result["guidance_scale"] = saved["guidance_scale"]
    return result


def main(args):
    if args.summarize_only:
        result = resummarize(args)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))
        return
    torch.manual_seed(args.seed)
    pipe = DallePipeline.from_pretrained(args.checkpoint)
    # the checkpoint's default guidance is a pipeline setting, not a component: pass it on
    inpaint = DalleInpaintPipeline(**pipe.components, default_guidance_scale=pipe.config.default_guidance_scale)
    inpaint.set_progress_bar_config(disable=True)
    if pipe.vae.config.image_size != IMAGE_SIZE:
        raise ValueError(f"the shapes world is {IMAGE_SIZE} px, {args.checkpoint} {pipe.vae.config.image_size} px")
    rng = random.Random(args.seed)
    N, records, start = args.candidates, [], time.time()
    sanity = {"input_passes": 0, "ideal_edit_passes": 0}
    for i in range(args.edits):
        edit = sample_edit(rng, args.mask_margin)
        sanity["input_passes"] += edit_passes(edit.image, edit)
        sanity["ideal_edit_passes"] += edit_passes(render_scene(edit.target), edit)
        out = inpaint(edit.prompt, image=edit.image, mask_image=edit.mask, num_images_per_prompt=N,
                      num_images_to_keep=N, rerank="clip", guidance_scale=args.guidance_scale,
                      mask_dilation=args.mask_dilation, generator=torch.Generator().manual_seed(args.seed * 100003 + i),
                      output_type="np")  # fmt: skip
        outside_same = bool((np.round(out.images * 255)[:, ~edit.mask] == np.asarray(edit.image)[~edit.mask]).all())
        regions = region_log_likelihoods(pipe, out.image_tokens, out.cell_mask, edit.prompt)
        clip = out.clip_scores[0].double()
        z = lambda s: standardize_per_group(s, 1)  # noqa: E731 (over this edit's N candidates)
        scores = {
            "clip": clip, "likelihood": regions["whole"], "likelihood_ratio": regions["whole_ratio"],
            "both": z(clip) + z(regions["whole"]), "both_ratio": z(clip) + z(regions["whole_ratio"]),
            "context": regions["after"], "clip_context": z(clip) + z(regions["after"]),
            "masked_ratio": regions["masked_ratio"], "clip_masked_ratio": z(clip) + z(regions["masked_ratio"]),
            "clip_context_masked_ratio": z(clip) + z(regions["after"]) + z(regions["masked_ratio"]),
        }
        passed = np.array([edit_passes(image, edit) for image in out.images])
        records.append({
            "prompt": edit.prompt, "mask_box": edit.mask_box, "cells": int(out.cell_mask.sum()), "passed":
            passed.astype(int).tolist(), "outside_identical": outside_same,
            **{name: [round(v, 4) for v in s.tolist()] for name, s in scores.items()},
        })  # fmt: skip
        if (i + 1) % 10 == 0:
            mean = np.mean([r["passed"] for r in records])
            print(f"{i + 1}/{args.edits} edits, {time.time() - start:.0f} s, single-sample pass {mean:.3f}", flush=True)
        if (i + 1) % 20 == 0 or i + 1 == args.edits:  # partial results survive an interrupted run
            result = summarize(records, sanity, args, time.time() - start, complete=i + 1 == args.edits)
            result["guidance_scale"] = args.guidance_scale or inpaint.config.default_guidance_scale
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))


def summarize(records: list[dict], sanity: dict, args, seconds: float, complete: bool) -> dict:
    """Accuracy per best-of-k and ranking (the same random k-subsets for every ranking), and paired counts of the
    edits where one ranking's best-of-N passes and the other's does not."""
    N, n = args.candidates, len(records)
    np_rng = np.random.default_rng(args.seed)
    accuracy, orders = {}, [np_rng.permutation(N) for _ in records]  # one set of k-subsets per edit for all rankings
    picked = {}  # ranking -> (n,) pass of its best-of-N pick
    for k in args.best_of:
        for name in RANKINGS:
            values = []
            for r, order in zip(records, orders):
                passed = np.array(r["passed"], dtype=float)
                score = {"unranked": None, "oracle": passed}.get(name, np.array(r.get(name, [])))
                values.append(best_of(passed, score, k, order))
            accuracy.setdefault(f"best_of_{k}", {})[name] = round(float(np.mean(values)), 4)
            if k == N:
                picked[name] = np.array(values)
    paired = {}
    if N in args.best_of:
        for a, b in (("both", "clip"), ("both", "likelihood"), ("both", "unranked"), ("clip", "unranked")):
            paired[f"{a}_vs_{b}"] = {f"{a}_better": round(float(np.clip(picked[a] - picked[b], 0, None).sum()), 2),
                                     f"{b}_better": round(float(np.clip(picked[b] - picked[a], 0, None).sum()), 2)}
    # CLIP plus a weighted likelihood term, z-scored per edit: does any weight of any region's score help CLIP?
    sweep = {}
    z_of = lambda values: standardize_per_group(torch.tensor(values), 1)  # noqa: E731 (over one edit's candidates)
    if N in args.best_of:
        for name in ("likelihood", "likelihood_ratio", "context", "masked_ratio"):
            if all(name in r for r in records):
                sweep[name] = {str(w): round(float(np.mean([
                    r["passed"][int(torch.argmax(z_of(r["clip"]) + w * z_of(r[name])))] for r in records
                ])), 4) for w in SWEEP_WEIGHTS}  # fmt: skip
    single = [np.mean(r["passed"]) for r in records]
    return {
        "checkpoint": args.checkpoint, "complete": complete, "edits": n, "candidates": N, "seed": args.seed,
        "mask_margin": args.mask_margin, "mask_dilation": args.mask_dilation,
        "accuracy": accuracy,
        f"paired_best_of_{N}": paired,
        f"clip_plus_weighted_likelihood_best_of_{N}": sweep,
        "standard_error_best_of_1": round(float(np.std(single) / n**0.5), 4),
        "pixels_outside_mask_identical": all(r["outside_identical"] for r in records),
        "checker_sanity": {"input_image_passes": sanity["input_passes"] / n,
                           "ideal_edit_passes": sanity["ideal_edit_passes"] / n},
        "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
        "records": records,
    }  # fmt: skip


if __name__ == "__main__":
    main(parse_args())
