"""EmojiEval: composition on the emoji world, scored by a trained judge.

A concept drawn in a style it was never shown in is the world's test of composition. `evaluate_emoji` runs a
text-to-image pipeline on fixed prompts and asks the judge (`dalle_hf.eval.emoji_judge`, the role Inception plays for
FID) what each image shows. Splits (`--splits`, any subset, in any order):

- `seen`: `"{label} in {style} style"` on training pairs; `novel`: the same on held-out pairs (never in training).
  Concept accuracy (the judge's accept rule), style accuracy (style argmax) and both, for best-of-1 and for CLIP
  best-of-N. One pipeline call per prompt draws `candidates` samples and returns them in CLIP order: the first is
  the CLIP pick (best-of-N); best-of-1 is the mean verdict over **all** N samples, the expected score of a single
  unranked sample (the N are independent draws, so their mean is an unbiased, lower-variance estimate of it).
  `oracle_any_of_n` says whether any sample passed (what a perfect reranker would reach).
- `plain`: `"{label}"` prompts: concept accuracy, best-of-1 and best-of-N.
- `vae`: dVAE fidelity on held-out renders: PSNR, and the judge's concept accuracy on reconstructions vs originals.
- `clip`: top-1 retrieval of the true caption among 100 (`EmojiWorld.caption_ranking_set`), seen and held-out renders.

Each generated split also reports a Fréchet distance between the judge's penultimate features of all its samples and
of the real renders of its population (seen: training renders; novel: held-out renders; plain: all renders).

Prompts are fixed for `prompt_seed` (pairs drawn per style in turn, so the styles are balanced), every pipeline call
is seeded from `seed`, and the report records the configuration. Sample sheets (`samples_{split}.png`) show the
first prompts' samples in CLIP order (first column: the pick), framed green when the judge passes them.

Example:

```python
>>> from dalle_hf.eval.emoji import evaluate_emoji
>>> report = evaluate_emoji(pipe, "runs/emoji-judge", "/work/emoji-cache", "eval/emoji", prompts_per_split=60)
>>> report["novel"]["clip_best_of_n"]["both"], report["vae"]["psnr_held_out"]  # doctest: +SKIP
```
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.emoji import STYLES, EmojiWorld, plain_prompt, reconstruction_metrics, style_prompt
from .emoji_judge import EmojiJudge, accepts, to_pixels
from .shapes import _save_sheet, _validate_positive_int

SPLITS = ("seen", "novel", "plain", "vae", "clip")
GENERATED_SPLITS = ("seen", "novel", "plain")
EMOJI_PROMPT_SEED = 0  # the benchmark's prompts are fixed; `seed` only changes the samples
CLIP_CAPTIONS = 100  # the true caption among 100: many near confusions (same concept, other styles), still fast
SHEET_PROMPTS, SHEET_COLUMNS = 8, 8  # rows of each sheet; samples shown per row (CLIP order)
FRECHET_REAL_MAX = 2000  # real renders per Fréchet reference (a fixed draw): the 128-d covariance is well estimated


# ----------------------------------------------------------------------------------------------------
# Pure helpers.


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """
    The Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID's formula):
    `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`. The trace of the square root is computed as the sum of
    the square roots of the eigenvalues of the symmetric `S_a^(1/2) S_b S_a^(1/2)` (same eigenvalues, float64).
    """
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"expected two (N, D) feature sets of the same D, got {tuple(features_a.shape)} and "
                         f"{tuple(features_b.shape)}")  # fmt: skip
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError(f"expected at least 2 feature vectors per set, got {len(features_a)} and {len(features_b)}")
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D)
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(0.0, float(distance))


def parse_splits(splits: Sequence[str] | str | None) -> tuple[str, ...]:
    """`None` -> every split; `"seen,novel"` or a list -> those, in `SPLITS` order."""
    if splits is None:
        return SPLITS
    names = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else list(splits)
    names = [s for s in names if s]
    unknown = [s for s in names if s not in SPLITS]
    if unknown or not names:
        raise ValueError(f"expected splits among {', '.join(SPLITS)} (comma-separated), got {unknown or splits!r}")
    return tuple(s for s in SPLITS if s in names)


def _seed_of(*parts) -> int:
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest(), 16) % 2**63


def evaluation_pairs(world: EmojiWorld, split: str, n: int, prompt_seed: int = EMOJI_PROMPT_SEED) -> list[tuple]:
    """
    `n` fixed `(key, label, style)` pairs of `split`: `"seen"` (training pairs) or `"novel"` (held-out pairs), drawn
    per style in turn (in `STYLES` order, each style's pairs shuffled by `prompt_seed`) so the styles are balanced;
    fewer when the split has fewer pairs. `"plain"`: `n` concepts (style `None`).
    """
    cache = world.cache
    rng = random.Random(f"emoji-eval/{split}/{prompt_seed}")
    if split == "plain":
        labels = dict(zip(cache.keys.tolist(), cache.labels.tolist()))
        keys = rng.sample(sorted(labels), min(n, len(labels)))
        return [(key, labels[key], None) for key in keys]
    held = split == "novel"
    by_style: dict[str, list[tuple]] = {}
    for key, label, style, is_held in zip(cache.keys.tolist(), cache.labels.tolist(), cache.styles.tolist(),
                                          cache.held_out.tolist()):  # fmt: skip
        if bool(is_held) == held:
            by_style.setdefault(style, []).append((key, label, style))
    queues = []
    for style in STYLES:
        pairs = sorted(set(by_style.get(style, [])))
        rng.shuffle(pairs)
        queues.append(pairs)
    chosen: list[tuple] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return chosen


def _load_judge(judge) -> tuple[EmojiJudge, str | None]:
    if isinstance(judge, EmojiJudge):
        return judge.eval(), None
    if isinstance(judge, str) and os.path.isdir(judge):
        return EmojiJudge.from_pretrained(judge).eval(), judge
    raise ValueError(f"expected an EmojiJudge or the folder of one (train_judge's --out), got {judge!r}")


def _check_judge(judge: EmojiJudge, world: EmojiWorld) -> None:
    concepts = sorted(set(world.cache.keys.tolist()))
    if list(judge.config.concepts) != concepts:
        raise ValueError(f"expected a judge trained on this cache's {len(concepts)} concepts, got one with "
                         f"{len(judge.config.concepts)} concepts that differ: train it on this cache "
                         "(python -m dalle_hf.eval.emoji_judge --cache DIR --out JUDGE)")  # fmt: skip
    missing = sorted(set(world.cache.styles.tolist()) - set(judge.config.styles))
    if missing:
        raise ValueError(f"expected a judge that knows every style of the cache, it lacks {missing}")


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


# ----------------------------------------------------------------------------------------------------
# The benchmark.


@torch.no_grad()
def evaluate_emoji(
    pipe,
    judge,
    cache_dir: str,
    out_dir: str,
    *,
    prompts_per_split: int = 60,
    candidates: int = 16,
    seed: int = 0,
    splits: Sequence[str] | str | None = None,
    batch_size: int = 16,
    n_vae: int = 300,
    n_clip: int = 300,
    prompt_seed: int = EMOJI_PROMPT_SEED,
    sampling: dict | None = None,
    progress: bool = True,
) -> dict:
    """
    Score a text-to-image pipeline on EmojiEval and write `report.json`, `results.jsonl` and `samples_{split}.png`.

    Report keys (only the splits run): `seen` and `novel` (`best_of_1` and `clip_best_of_n` each with `concept`,
    `style`, `both`; `oracle_any_of_n`; `real_renders`, the judge on the real renders of the same pairs, an
    optimistic ceiling; `frechet_distance`; `n_prompts`; `reranked_by_clip`), `plain` (the same with `concept` only, no
    `real_renders`), `vae` (`psnr_held_out`, `judge_concept_accuracy_originals`, `..._reconstructions`, `ratio`),
    `clip` (`caption_top1_seen`, `caption_top1_novel`) and `config` (the settings, the pipeline, and the judge's
    path, accept rule and threshold). With `candidates == 1`, `clip_best_of_n` and `oracle_any_of_n` are `None`.
    Splits run separately into the same `out_dir` with the same configuration are merged into one report; another
    configuration there raises `ValueError`.

    Args:
        pipe (`DallePipeline`): the pipeline to evaluate (its `vae` and `clip_model` serve the `vae` and `clip`
            splits).
        judge (`EmojiJudge` or `str`): the judge or its folder (`train_judge`), trained on this cache's concepts.
        cache_dir (`str`): the emoji cache (`dalle-hf data emoji --cache DIR`).
        out_dir (`str`): where to write the report and the sheets.
        prompts_per_split (`int`, *optional*, defaults to 60): prompts of each of `seen`, `novel`, `plain` (fewer
            when a split has fewer pairs).
        candidates (`int`, *optional*, defaults to 16): samples per prompt; the CLIP pick of them is best-of-N, their
            mean verdict best-of-1.
        seed (`int`, *optional*, defaults to 0): seeds every pipeline call and the `vae` / `clip` draws.
        splits (`Sequence[str] | str`, *optional*, defaults to `None`): among `SPLITS`; `None` runs all.
        batch_size (`int`, *optional*, defaults to 16): most samples per pipeline call (at least one prompt).
        n_vae (`int`, *optional*, defaults to 300): held-out renders for the `vae` split.
        n_clip (`int`, *optional*, defaults to 300): renders per group (seen, held out) for the `clip` split.
        prompt_seed (`int`, *optional*, defaults to 0): selects the prompts; reported numbers use the default.
        sampling (`dict`, *optional*, defaults to `None`): extra pipeline arguments (`temperature`, `top_k`,
            `top_p`, `guidance_scale`); recorded in the report.
        progress (`bool`, *optional*, defaults to `True`): show progress bars.

    Returns:
        `dict`: the report written to `out_dir/report.json`.
    """
    # 1. Check inputs.
    for name, value in (("prompts_per_split", prompts_per_split), ("candidates", candidates),
                        ("batch_size", batch_size), ("n_vae", n_vae), ("n_clip", n_clip)):  # fmt: skip
        _validate_positive_int(name, value)
    for name, value in (("seed", seed), ("prompt_seed", prompt_seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected {name} to be an int, got {value!r}")
    splits = parse_splits(splits)
    sampling = dict(sampling or {})
    reserved = {"prompt", "num_images_per_prompt", "num_images_to_keep", "generator", "output_type", "rerank"}
    if reserved & set(sampling):
        raise ValueError(f"expected sampling without {sorted(reserved & set(sampling))}: the evaluation sets them")
    world = EmojiWorld(cache_dir)
    judge, judge_path = _load_judge(judge)
    _check_judge(judge, world)
    if "clip" in splits and getattr(pipe, "clip_model", None) is None:
        raise ValueError("expected a pipeline with a CLIP model for the `clip` split (or leave `clip` out of splits)")
    concept_index = {c: i for i, c in enumerate(judge.config.concepts)}
    style_index = {s: i for i, s in enumerate(judge.config.styles)}
    threshold = judge.config.accept_threshold
    pipeline_path = getattr(pipe, "name_or_path", None)
    config = {
        "pipeline": os.path.abspath(pipeline_path) if pipeline_path else None,
        "prompts_per_split": prompts_per_split, "candidates": candidates, "seed": seed, "prompt_seed": prompt_seed,
        "batch_size": batch_size, "n_vae": n_vae, "n_clip": n_clip, "sampling": sampling,
        "cache": os.path.abspath(cache_dir), "cache_images": int(len(world.cache.keys)),
        "pipeline_default_guidance_scale": getattr(getattr(pipe, "config", None), "default_guidance_scale", None),
        "judge": {"path": os.path.abspath(judge_path) if judge_path else None, "accept_threshold": threshold,
                  "concepts": len(judge.config.concepts),
                  "accept_rule": "concept accepted iff the judge's argmax is the asked concept and its probability >= "
                                 "accept_threshold; style right iff the style argmax is the asked style"},
        "best_of_1": "the mean verdict over all candidates of a prompt (each an independent, unranked sample)",
        "clip_best_of_n": "the verdict on the pipeline's CLIP pick (first returned) of the candidates",
    }  # fmt: skip
    previous, previous_records = _previous_run(out_dir, config)
    os.makedirs(out_dir, exist_ok=True)

    report: dict = {}
    records: list[dict] = []
    # 2. Generated splits: one call per batch of prompts, every sample judged.
    for split in (s for s in splits if s in GENERATED_SPLITS):
        pairs = evaluation_pairs(world, split, prompts_per_split, prompt_seed)
        if not pairs:
            raise ValueError(f"expected {split} pairs in the cache {cache_dir!r}, found none")
        per_call = max(1, batch_size // candidates)
        verdicts, features, sheet_rows, reranked_by_clip = [], [], [], None
        batches = [pairs[i : i + per_call] for i in range(0, len(pairs), per_call)]
        for batch_index, batch in enumerate(tqdm(batches, desc=f"EmojiEval {split}", disable=not progress)):
            prompts = [plain_prompt(lab) if style is None else style_prompt(lab, style) for _, lab, style in batch]
            output = pipe(prompt=prompts, num_images_per_prompt=candidates, num_images_to_keep=candidates,
                          generator=torch.Generator().manual_seed(_seed_of("emoji-eval", seed, split, batch_index)),
                          output_type="pt", **sampling)  # fmt: skip
            images = output.images if hasattr(output, "images") else output[0]  # (P * N, 3, H, W), CLIP-best first
            if len(images) != len(batch) * candidates:
                raise ValueError(f"pipeline returned {len(images)} images for {len(batch)} prompts x {candidates}")
            reranked_by_clip = getattr(output, "clip_scores", None) is not None
            result = judge.predict(images.float().clamp(0, 1))
            features.append(result["features"])
            for i, (key, label, style) in enumerate(batch):
                rows = slice(i * candidates, (i + 1) * candidates)
                asked = torch.full((candidates,), concept_index[key])
                concept_ok = accepts(result["concept_probs"][rows], asked, threshold).tolist()
                if style is None:
                    style_ok = [None] * candidates
                    both = concept_ok
                else:
                    style_ok = (result["style_probs"][rows].argmax(1) == style_index[style]).tolist()
                    both = [c and s for c, s in zip(concept_ok, style_ok)]
                verdicts.append({"concept": concept_ok, "style": style_ok, "both": both})
                records.append({"split": split, "prompt": prompts[i], "key": key, "style": style,
                                "concept": concept_ok, "style_ok": style_ok, "both": both})  # fmt: skip
                if len(sheet_rows) < SHEET_PROMPTS:
                    shown = images[rows][:SHEET_COLUMNS]
                    sheet_rows.append((prompts[i], [(_to_pil(image), ok) for image, ok in zip(shown, both)]))
        report[split] = _split_scores(verdicts, candidates, with_style=split != "plain")
        report[split]["reranked_by_clip"] = reranked_by_clip
        report[split]["frechet_distance"] = _frechet_to_real(judge, world, split, torch.cat(features), seed)
        if split != "plain":
            report[split]["real_renders"] = _judge_real_renders(judge, world, pairs, concept_index, style_index)
        field = "concept" if split == "plain" else "both"
        title = f"{split}: {field} best-of-1 {report[split]['best_of_1'][field]:.3f}"
        if candidates > 1:
            title += f", CLIP best-of-{candidates} {report[split]['clip_best_of_n'][field]:.3f}; samples in CLIP order"
        title += f" (green: {'concept' if split == 'plain' else 'concept and style'} right)"
        _save_sheet(os.path.join(out_dir, f"samples_{split}.png"), sheet_rows, title)

    # 3. dVAE fidelity on held-out renders.
    if "vae" in splits:
        report["vae"] = _vae_fidelity(pipe.vae, judge, world, n_vae, seed, concept_index, threshold)

    # 4. CLIP caption retrieval among 100, on seen and on held-out renders, at the side the pipeline draws (what its
    #    CLIP will rank: a 32 px model's renders are resized as the world resizes them, then upsampled by CLIP).
    if "clip" in splits:
        from ..train_clip import caption_ranking_hits, resized

        side = pipe.vae.config.image_size
        report["clip"] = {"n_captions": CLIP_CAPTIONS, "image_size": side}
        for group, world_split in (("seen", "train"), ("novel", "novel")):
            ranking = world.caption_ranking_set(n_clip, CLIP_CAPTIONS, seed=seed, split=world_split)
            pixels = resized(ranking.pixel_values, side)  # (N, 3, side, side)
            hits = caption_ranking_hits(pipe.clip_model, pipe.clip_processor, pixels, ranking.candidates)
            report["clip"][f"caption_top1_{group}"] = float(hits.float().mean())
            report["clip"][f"n_images_{group}"] = len(hits)

    # 5. Write the report, merged with the other splits of an earlier run of the same configuration in `out_dir`.
    report = {split: report[split] if split in report else previous[split] for split in SPLITS
              if split in report or split in previous}  # fmt: skip
    report["config"] = {"splits": [split for split in SPLITS if split in report], **config}
    records = [r for r in previous_records if r["split"] not in splits] + records
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return report


def _previous_run(out_dir: str, config: dict) -> tuple[dict, list[dict]]:
    """The report and records of an earlier run in `out_dir` (empty if none); a run of another configuration there
    is an error rather than silently mixed or overwritten."""
    path = os.path.join(out_dir, "report.json")
    if not os.path.isfile(path):
        return {}, []
    with open(path) as f:
        previous = json.load(f)
    old = {k: v for k, v in previous.get("config", {}).items() if k != "splits"}
    new = json.loads(json.dumps(config))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        raise ValueError(f"expected {out_dir!r} to hold no report or one of the same configuration (its splits are "
                         f"merged), but {', '.join(differ)} differ: choose another --out or delete that report")
    records_path = os.path.join(out_dir, "results.jsonl")
    records = []
    if os.path.isfile(records_path):
        with open(records_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    return previous, records


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0).float().clamp(0, 1) * 255 + 0.5).byte().numpy())


def _split_scores(verdicts: list[dict], candidates: int, with_style: bool) -> dict:
    """Per-prompt verdict lists -> best-of-1 (mean over samples), CLIP best-of-N (first sample) and any-of-N."""
    fields = ("concept", "style", "both") if with_style else ("concept",)
    scores = {"n_prompts": len(verdicts), "candidates": candidates}
    scores["best_of_1"] = {f: _mean(np.mean(v[f]) for v in verdicts) for f in fields}
    scores["clip_best_of_n"] = {f: _mean(v[f][0] for v in verdicts) for f in fields} if candidates > 1 else None
    scores["oracle_any_of_n"] = {f: _mean(any(v[f]) for v in verdicts) for f in fields} if candidates > 1 else None
    return scores


def _judge_real_renders(judge: EmojiJudge, world: EmojiWorld, pairs: list[tuple], concept_index: dict,
                        style_index: dict) -> dict:  # fmt: skip
    """The judge's verdicts on the real renders of the split's pairs: about the most a generator can score with this
    judge (optimistic: the judge trained on about 90% of these renders, held-out pairs included)."""
    row = {(k, s): i for i, (k, s) in enumerate(zip(world.cache.keys.tolist(), world.cache.styles.tolist()))}
    index = np.array([row[(key, style)] for key, _, style in pairs])
    result = judge.predict(to_pixels(world.cache.images[index]))
    concept_ok = accepts(result["concept_probs"], torch.tensor([concept_index[k] for k, _, _ in pairs]),
                         judge.config.accept_threshold)  # fmt: skip
    style_ok = result["style_probs"].argmax(1) == torch.tensor([style_index[s] for _, _, s in pairs])
    return {"concept": float(concept_ok.float().mean()), "style": float(style_ok.float().mean()),
            "both": float((concept_ok & style_ok).float().mean())}  # fmt: skip


def _frechet_to_real(judge: EmojiJudge, world: EmojiWorld, split: str, generated: torch.Tensor, seed: int):
    """Fréchet distance of the judge's features: generated samples vs a fixed draw of the split's real renders."""
    cache = world.cache
    population = {"seen": ~cache.held_out, "novel": cache.held_out, "plain": np.ones_like(cache.held_out)}[split]
    index = np.flatnonzero(population)
    rng = np.random.default_rng(_seed_of("emoji-eval-frechet", seed, split) % 2**32)
    index = np.sort(rng.choice(index, size=min(len(index), FRECHET_REAL_MAX), replace=False))
    if len(index) < 2 or len(generated) < 2:
        return None
    real = judge.predict(to_pixels(cache.images[index]))["features"]
    return frechet_distance(generated, real)


def _vae_fidelity(vae, judge: EmojiJudge, world: EmojiWorld, n: int, seed: int, concept_index: dict,
                  threshold: float) -> dict:  # fmt: skip
    """The world's PSNR on `n` held-out renders (`EmojiWorld.evaluate_vae`, the same draw) and the judge's concept
    accuracy (accept rule) on those reconstructions and on the originals."""
    drawn = world.held_out_reconstructions(vae, n, seed)
    fidelity = reconstruction_metrics(drawn)
    asked = torch.tensor([concept_index[k] for k in drawn["keys"]])
    on_originals = float(accepts(judge.predict(drawn["originals"])["concept_probs"], asked, threshold).float().mean())
    on_reconstructions = float(accepts(judge.predict(drawn["reconstructions"])["concept_probs"], asked, threshold)
                               .float().mean())  # fmt: skip
    return {
        **fidelity,
        "judge_concept_accuracy_originals": on_originals,
        "judge_concept_accuracy_reconstructions": on_reconstructions,
        "ratio": on_reconstructions / on_originals if on_originals > 0 else None,
        "image_size": vae.config.image_size,
    }


__all__ = ["SPLITS", "evaluate_emoji", "evaluation_pairs", "frechet_distance", "parse_splits"]
