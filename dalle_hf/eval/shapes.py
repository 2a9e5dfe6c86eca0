"""ShapesEval: a GenEval-style benchmark for the shapes world, scored by reading pixels.

`evaluate_pipeline` runs a text-to-image pipeline on the fixed evaluation prompts of the six GenEval
tasks (Ghosh et al. 2023) plus `novel` (held-out color/shape pairs) and writes `report.json` and sample
sheets. The checker it scores with (`ShapesEval`, `check`, `detect_objects`) and `evaluate_vae_fidelity` (how
often a dVAE round trip keeps an image's caption true) belong to the world, `dalle_hf.data.shapes`, which uses
them itself (CLIP's candidate banks, the dVAE's training report); they are importable from here too.

Example:

```python
>>> import random
>>> from dalle_hf.data.shapes import sample_example
>>> from dalle_hf.eval.shapes import check, detect_objects
>>> image, caption, scene = sample_example(random.Random(0), "colors")
>>> check(image, caption), [(o.color, o.shape) for o in detect_objects(image)]
(True, [('pink', 'diamond')])
```
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..data.shapes import (
    EVAL_TASKS,
    IMAGE_SIZE,
    NOVEL_TASK,
    TASKS,
    DetectedObject,
    EvalPrompt,
    ShapesEval,
    _mean,
    _validate_positive_int,
    _validate_tasks,
    check,
    check_caption,
    detect_objects,
    evaluate_vae_fidelity,
    evaluation_prompts,
)


# ----------------------------------------------------------------------------------------------------
# Evaluating a pipeline

EVAL_PROMPT_SEED = 0  # the benchmark's prompts are fixed; `seed` only changes the samples
_SHEET_PROMPTS = 8  # rows of each task's sample sheet
_SHEET_SCALE = 2  # 64 px samples are shown at 128 px
_SHEET_BORDER = 4  # px of the green (pass) / red (fail) frame
_PASS_RGB, _FAIL_RGB = (40, 170, 60), (220, 30, 30)


def _call_seed(seed: int, task: str, batch_index: int, stage: str) -> int:
    """A distinct, reproducible generator seed per (seed, task, batch, stage)."""
    return (seed * 1_000_003 + EVAL_TASKS.index(task) * 10_007 + batch_index * 101 + (stage == "rerank")) % 2**63


def _plan_calls(
    tasks: Sequence[str], stages: Sequence[tuple[str, int]], prompts_per_task: int, prompt_seed: int, batch_size: int
) -> list[tuple[str, str, int, list[EvalPrompt]]]:
    """
    Every pipeline call of an evaluation, in order: `(task, stage, batch_index, prompts)`.

    Each stage `(name, samples_per_prompt)` splits a task's prompts into calls of at most `batch_size` samples
    (at least one prompt); with `_call_seed`, the batch index fixes what a call draws.
    """
    plan = []
    for task in tasks:
        prompts = evaluation_prompts(task, prompts_per_task, seed=prompt_seed)
        for stage, per_prompt in stages:
            step = max(1, batch_size // per_prompt)
            for batch_index, start in enumerate(range(0, len(prompts), step)):
                plan.append((task, stage, batch_index, prompts[start : start + step]))
    return plan


def _generate(
    pipe, prompts: list[str], per_prompt: int, keep: int, seed: int, sampling: dict
) -> tuple[list, torch.Tensor | None]:
    output = pipe(
        prompt=prompts,
        num_images_per_prompt=per_prompt,
        num_images_to_keep=keep,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
        **sampling,
    )
    images = output.images if hasattr(output, "images") else output[0]
    if len(images) != len(prompts) * keep:
        raise ValueError(f"pipeline returned {len(images)} images for {len(prompts)} prompts x {keep} kept")
    return list(images), getattr(output, "clip_scores", None)


def _frame(image: Image.Image, passed: bool) -> Image.Image:
    side = IMAGE_SIZE * _SHEET_SCALE
    framed = Image.new("RGB", (side + 2 * _SHEET_BORDER,) * 2, _PASS_RGB if passed else _FAIL_RGB)
    framed.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (_SHEET_BORDER, _SHEET_BORDER))
    return framed


def _save_sheet(path: str, rows: list[tuple[str, list[tuple[Image.Image, bool]]]], title: str) -> None:
    """A PNG grid: one row per prompt (caption above), each sample framed green (pass) or red (fail)."""
    cell, gap, caption_height = IMAGE_SIZE * _SHEET_SCALE + 2 * _SHEET_BORDER, 6, 14
    columns = max(len(images) for _, images in rows)
    width = gap + columns * (cell + gap)
    height = caption_height + gap + len(rows) * (caption_height + cell + gap)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 2), title, fill=(0, 0, 0))
    y = caption_height + gap
    for prompt, images in rows:
        draw.text((gap, y), prompt, fill=(0, 0, 0))
        for i, (image, passed) in enumerate(images):
            sheet.paste(_frame(image, passed), (gap + i * (cell + gap), y + caption_height))
        y += caption_height + cell + gap
    sheet.save(path)


def evaluate_pipeline(
    pipe,
    out_dir: str,
    *,
    images_per_prompt: int = 4,
    candidates: int = 1,
    seed: int = 0,
    prompts_per_task: int = 100,
    tasks: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    prompt_seed: int = EVAL_PROMPT_SEED,
    sampling: dict | None = None,
) -> dict:
    """
    Score a text-to-image pipeline on ShapesEval and write `report.json` and sample sheets to `out_dir`.

    For every evaluation prompt (`evaluation_prompts(task, prompts_per_task)`) the pipeline draws
    `images_per_prompt` samples, each of which is checked. With `candidates > 1` a second pass draws
    `candidates` samples per prompt, all returned in the pipeline's order (CLIP-best first, as in DALL-E;
    without a CLIP model, as drawn): the first is the reranked pick, and checking all of them tells whether
    the reranker or the generator limits the score.

    Report keys: `accuracy` (per task, mean pass over all images), `shapes_eval` (mean accuracy of the
    six GenEval tasks evaluated), `novel`, `any_of_k` (per task, a prompt passes if any of its samples
    does) and `shapes_eval_any_of_k`; with `candidates > 1` also `reranked_accuracy` (per task),
    `shapes_eval_reranked`, `novel_reranked`, `reranked_by_clip` (whether the pipeline returned CLIP
    scores), `best_of_n_oracle` (per task, a prompt passes if any of its `candidates` samples does: what a
    perfect reranker would reach) and `shapes_eval_best_of_n_oracle`; plus `config`. Per-prompt results go
    to `results.jsonl`, sheets to `samples_{task}.png`.

    Args:
        pipe (`DallePipeline`): any callable obeying the pipeline call contract of docs/design.md.
        out_dir (`str`): where to write `report.json`, `results.jsonl` and `samples_{task}.png`.
        images_per_prompt (`int`, *optional*, defaults to 4): samples checked per prompt.
        candidates (`int`, *optional*, defaults to 1): samples reranked per prompt in the best-of-N pass;
            1 skips that pass.
        seed (`int`, *optional*, defaults to 0): seeds the generators; the same seed gives the same report.
        prompts_per_task (`int`, *optional*, defaults to 100): prompts per task.
        tasks (`Sequence[str]`, *optional*, defaults to `None`): tasks to run; `None` runs the six GenEval
            tasks and `novel`.
        batch_size (`int`, *optional*, defaults to 16): most samples drawn per pipeline call (at least one
            prompt per call).
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar.
        prompt_seed (`int`, *optional*, defaults to 0): selects the prompts (`EVAL_PROMPT_SEED`). Reported numbers
            use the default; tune sampling settings on another seed (a dev split) so they are not fitted
            to the reported prompts.
        sampling (`dict`, *optional*, defaults to `None`): extra pipeline arguments for every call, e.g.
            `{"guidance_scale": 3.0, "top_k": 64}`; `None` uses the pipeline's defaults. Recorded in the report.

    Returns:
        `dict`: the report written to `out_dir/report.json`.

    Example:

    ```python
    >>> report = evaluate_pipeline(pipe, "outputs/eval", images_per_prompt=4, candidates=8)
    >>> report["shapes_eval"], report["novel"], report["shapes_eval_reranked"]
    ```
    """
    # 1. Check inputs.
    _validate_positive_int("images_per_prompt", images_per_prompt)
    _validate_positive_int("candidates", candidates)
    _validate_positive_int("prompts_per_task", prompts_per_task)
    _validate_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    tasks = _validate_tasks(tasks)
    if isinstance(prompt_seed, bool) or not isinstance(prompt_seed, int):
        raise ValueError(f"prompt_seed must be an int, got {prompt_seed!r}")
    sampling = dict(sampling or {})
    reserved = {"prompt", "num_images_per_prompt", "num_images_to_keep", "generator", "output_type"}
    if reserved & set(sampling):
        raise ValueError(f"sampling must not set {sorted(reserved & set(sampling))}: the evaluation controls them")
    os.makedirs(out_dir, exist_ok=True)

    # 2. Plan every pipeline call: the sampling pass, then (candidates > 1) the reranked best-of-N pass.
    stages = [("sample", images_per_prompt)] + ([("rerank", candidates)] if candidates > 1 else [])
    plan = _plan_calls(tasks, stages, prompts_per_task, prompt_seed, batch_size)

    # 3. Generate and check every image.
    passes = {task: {"sample": [], "rerank": []} for task in tasks}  # per prompt: list of bools
    sheet_rows = {task: [] for task in tasks}
    reranked_by_clip = None
    records = []
    for task, stage, batch_index, batch in tqdm(plan, desc="ShapesEval", disable=not progress):
        per_prompt = keep = images_per_prompt if stage == "sample" else candidates
        call_seed = _call_seed(seed, task, batch_index, stage)
        images, clip_scores = _generate(pipe, [p.prompt for p in batch], per_prompt, keep, call_seed, sampling)
        if stage == "rerank":
            reranked_by_clip = clip_scores is not None
        for i, eval_prompt in enumerate(batch):
            prompt_images = images[i * keep : (i + 1) * keep]
            results = [check(image, eval_prompt) for image in prompt_images]
            prompt_index = len(passes[task][stage])
            passes[task][stage].append(results)
            record = {
                "task": task,
                "stage": stage,
                "prompt_index": prompt_index,
                "prompt": eval_prompt.prompt,
                "passed": results,
            }
            if clip_scores is not None:
                record["clip_scores"] = [float(score) for score in clip_scores[i]]
            records.append(record)
            if prompt_index < _SHEET_PROMPTS:
                if stage == "sample":
                    sheet_rows[task].append((eval_prompt.prompt, list(zip(prompt_images, results))))
                elif prompt_index < len(sheet_rows[task]):  # the reranked pick (first), as the last column
                    sheet_rows[task][prompt_index][1].append((prompt_images[0], results[0]))

    # 4. Score and write the report, per-prompt results and sample sheets.
    accuracy = {t: _mean([r for prompt in passes[t]["sample"] for r in prompt]) for t in tasks}
    any_of_k = {t: _mean([any(prompt) for prompt in passes[t]["sample"]]) for t in tasks}
    geneval_tasks = [t for t in tasks if t in TASKS]
    report = {
        "shapes_eval": _mean([accuracy[t] for t in geneval_tasks]) if geneval_tasks else None,
        "novel": accuracy.get(NOVEL_TASK),
        "accuracy": accuracy,
        "any_of_k": any_of_k,
        "shapes_eval_any_of_k": _mean([any_of_k[t] for t in geneval_tasks]) if geneval_tasks else None,
    }
    if candidates > 1:
        reranked = {t: _mean([prompt[0] for prompt in passes[t]["rerank"]]) for t in tasks}
        report["reranked_accuracy"] = reranked
        report["shapes_eval_reranked"] = _mean([reranked[t] for t in geneval_tasks]) if geneval_tasks else None
        report["novel_reranked"] = reranked.get(NOVEL_TASK)
        report["reranked_by_clip"] = reranked_by_clip
        oracle = {t: _mean([any(prompt) for prompt in passes[t]["rerank"]]) for t in tasks}
        report["best_of_n_oracle"] = oracle
        report["shapes_eval_best_of_n_oracle"] = _mean([oracle[t] for t in geneval_tasks]) if geneval_tasks else None
    report["config"] = {
        "images_per_prompt": images_per_prompt,
        "candidates": candidates,
        "seed": seed,
        "prompts_per_task": prompts_per_task,
        "prompt_seed": prompt_seed,
        "sampling": sampling,
        # What a call without guidance_scale uses (a DallePipeline's, from its model_index.json).
        "pipeline_default_guidance_scale": getattr(getattr(pipe, "config", None), "default_guidance_scale", None),
        "tasks": list(tasks),
        "batch_size": batch_size,
    }
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    for task in tasks:
        title = f"{task}: accuracy {accuracy[task]:.3f}"
        if candidates > 1:
            title += f" (last column: the pick of {candidates} candidates)"
        _save_sheet(os.path.join(out_dir, f"samples_{task}.png"), sheet_rows[task], title)
    return report



def evaluate_during_training(pipe, output_dir: str, prompts_per_task: int) -> dict:
    """`train_dalle.py --eval_prompts_per_task N`: best-of-1 ShapesEval and `novel` on N prompts per task, with the
    report and sheets written to `output_dir`."""
    report = evaluate_pipeline(pipe, output_dir, images_per_prompt=1, prompts_per_task=prompts_per_task,
                               progress=False)  # fmt: skip
    return {"ShapesEval (best-of-1)": report["shapes_eval"], "novel": report["novel"]}


__all__ = [
    "DetectedObject",
    "ShapesEval",
    "check",
    "check_caption",
    "detect_objects",
    "evaluate_during_training",
    "evaluate_pipeline",
    "evaluate_vae_fidelity",
]
