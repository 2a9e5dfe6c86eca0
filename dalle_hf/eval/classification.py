"""Zero-shot classification by likelihood, beside CLIP: which of `C` captions does each image belong to?

The transformer picks the caption under which the image's dVAE codes are most likely ([`DallePipeline.classify`]:
Bayes with a uniform prior over the candidates); CLIP picks the caption whose embedding is closest. Both rank the
same images and candidates. World-agnostic: a world supplies images, candidate lists with the true caption first,
and a group per image (a world's `caption_ranking_set`, `dalle_hf.data.world`).

Example:

```python
>>> from dalle_hf.data.world import load_world
>>> ranking = load_world("shapes").caption_ranking_set(n_images=120, n_captions=8)
>>> pixel_values, candidates, tasks = ranking.pixel_values, ranking.candidates, ranking.groups
>>> zero_shot_classification(pipe, pixel_values, candidates, tasks)["likelihood_top1"]
```
"""

from collections import defaultdict

import torch


@torch.no_grad()
def zero_shot_classification(
    pipe, pixel_values: torch.Tensor, candidates: list[list[str]], tasks: list[str] | None = None, batch_size: int = 64
) -> dict:
    r"""
    Top-1 accuracy of picking each image's true caption (`candidates[i][0]`) among its candidates, by the
    transformer's likelihood and, when the pipeline has one, by CLIP.

    A pick is a hit only when the true caption scores strictly above every other candidate (a tie is a miss), as in
    `dalle_hf.train_clip.caption_ranking_hits`.

    Args:
        pipe ([`DallePipeline`]): transformer, dVAE, tokenizer and optionally CLIP.
        pixel_values (`torch.Tensor` of shape `(n, 3, H, W)`): images in [0, 1].
        candidates (`list[list[str]]`): per image, the true caption first, then the false ones (the same count each).
        tasks (`list[str]`, *optional*, defaults to `None`): a label per image for per-task accuracies.
        batch_size (`int`, *optional*, defaults to 64): (image, caption) pairs per teacher-forced forward.

    Returns:
        `dict`: `likelihood_top1`, `clip_top1` (`None` without CLIP), `per_task` (`{task: {"likelihood": ...,
        "clip": ...}}`), `n_images`, `n_captions`, and `chance` (`1 / n_captions`).
    """
    n = len(pixel_values)
    if n != len(candidates) or n == 0:
        raise ValueError(f"need one candidate list per image, got {n} images and {len(candidates)} lists")
    C = len(candidates[0])
    if C < 2 or any(len(c) != C for c in candidates):
        raise ValueError("every image needs the same number (>= 2) of candidate captions")
    if tasks is not None and len(tasks) != n:
        raise ValueError(f"need one task per image, got {len(tasks)} for {n} images")

    # 1. The likelihood of each image's codes under each of its captions: n * C teacher-forced rows
    codes = pipe.check_image_tokens(pipe.encode_images(pixel_values))  # (n, N)
    text_ids = pipe.encode_prompt([caption for cands in candidates for caption in cands])  # (n * C, L)
    rows = codes.repeat_interleave(C, dim=0)  # (n * C, N)
    log_likelihood = pipe.code_log_likelihood(rows, text_ids, batch_size).view(n, C)  # (n, C)
    likelihood_hits = (log_likelihood[:, 1:] < log_likelihood[:, :1]).all(dim=1)  # (n,)

    # 2. CLIP on the same images and candidates
    clip_hits = None
    if pipe.clip_model is not None and pipe.clip_processor is not None:
        from ..train_clip import caption_ranking_hits

        clip_hits = caption_ranking_hits(pipe.clip_model, pipe.clip_processor, pixel_values, candidates)

    per_task = defaultdict(lambda: {"likelihood": [], "clip": []})
    for i, task in enumerate(tasks or ["all"] * n):
        per_task[task]["likelihood"].append(bool(likelihood_hits[i]))
        if clip_hits is not None:
            per_task[task]["clip"].append(bool(clip_hits[i]))

    def mean(hits):
        return sum(hits) / len(hits) if hits else None

    return {
        "likelihood_top1": likelihood_hits.double().mean().item(),
        "clip_top1": None if clip_hits is None else clip_hits.double().mean().item(),
        "per_task": {task: {name: mean(hits) for name, hits in scores.items()} for task, scores in per_task.items()},
        "n_images": n,
        "n_captions": C,
        "chance": 1 / C,
    }


__all__ = ["zero_shot_classification"]
