"""benchmarks/inpaint_shapes.py: its edits are well posed (the ideal edit passes its checker, the unedited input
and wrong edits fail), and the script runs end to end on a tiny saved pipeline."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from dalle_hf.data.shapes import Scene, ShapeObject, render_scene

from .conftest import load_script, tiny_dalle_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script(ROOT / "benchmarks" / "inpaint_shapes.py")


def test_edits_are_well_posed(bench):
    rng = random.Random(0)
    for _ in range(40):
        edit = bench.sample_edit(rng, margin=1)
        assert bench.edit_passes(render_scene(edit.target), edit)  # the ideal edit passes
        assert not bench.edit_passes(edit.image, edit)  # the input (the old object still there) fails
        assert edit.mask.sum() > 0 and not edit.mask.all()
        x0, y0, x1, y1 = edit.kept.bbox
        assert not edit.mask[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))].any()  # the kept object is out
        new = next(o for o in edit.target.objects if o != edit.kept)
        # the right object in the wrong colour, or the kept object erased, fails
        recoloured = ShapeObject(new.shape, edit.kept.color, new.size_name, new.cx, new.cy, new.size_px)
        assert not bench.edit_passes(render_scene(Scene((edit.kept, recoloured), "", "position")), edit)
        assert not bench.edit_passes(render_scene(Scene((new,), "", "position")), edit)


def test_best_of_uses_common_subsets(bench):
    passed = np.array([0, 0, 1, 0], dtype=float)
    order = np.array([0, 1, 2, 3])
    assert bench.best_of(passed, None, 2, order) == 0.25  # unranked: the mean
    assert bench.best_of(passed, passed, 2, order) == 0.5  # oracle: one of the two pairs holds a pass
    assert bench.best_of(passed, np.array([0, 0, 5, 1.0]), 4, order) == 1.0


def save_tiny_64px_pipeline(path, tokenizer):
    """Random tiny models on the shapes world's 64 px images (a 16 x 16 grid), with CLIP."""
    import torch
    from transformers import CLIPModel

    from dalle_hf.clip import make_clip_config, make_clip_processor
    from dalle_hf.configuration_dvae import DalleVAEConfig
    from dalle_hf.modeling_dalle import DalleForImageGeneration
    from dalle_hf.modeling_dvae import DalleVAE
    from dalle_hf.pipeline_dalle import DallePipeline

    torch.manual_seed(0)
    vae = DalleVAE(DalleVAEConfig(image_size=64, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32))
    clip = CLIPModel(make_clip_config(len(tokenizer), text_seq_len=8, image_size=64, patch_size=16, vision_width=32,
                                      vision_layers=1, text_width=32, text_layers=1, projection_dim=32, head_dim=16))
    DallePipeline(tokenizer=tokenizer, transformer=DalleForImageGeneration(tiny_dalle_config(image_grid_size=16)),
                  vae=vae, clip_model=clip, clip_processor=make_clip_processor(tokenizer, 64)).save_pretrained(path)
    return path


def test_script_runs_on_a_tiny_pipeline(bench, tokenizer, tmp_path):
    """Random models fail every edit, but every number is computed, and the pixels outside the masks are kept."""
    path = save_tiny_64px_pipeline(tmp_path / "pipe", tokenizer)
    out = tmp_path / "result.json"
    bench.main(bench.parse_args(["--checkpoint", str(path), "--edits", "2", "--candidates", "4", "--best_of", "1",
                                 "2", "4", "--out", str(out)]))
    result = json.loads(out.read_text())
    assert set(result["accuracy"]) == {"best_of_1", "best_of_2", "best_of_4"}
    assert set(result["accuracy"]["best_of_4"]) == set(bench.RANKINGS)
    assert result["pixels_outside_mask_identical"] is True and len(result["records"]) == 2
    assert result["checker_sanity"] == {"input_image_passes": 0.0, "ideal_edit_passes": 1.0}
    assert set(result["clip_plus_weighted_likelihood_best_of_4"]) == {"likelihood", "likelihood_ratio", "context",
                                                                      "masked_ratio"}  # fmt: skip
    # --summarize_only recomputes the same summary from the saved records, without a model.
    again = tmp_path / "again.json"
    again.write_text(out.read_text())
    bench.main(bench.parse_args(["--summarize_only", "--best_of", "1", "2", "4", "--out", str(again)]))
    recomputed = json.loads(again.read_text())
    for key in ("accuracy", "clip_plus_weighted_likelihood_best_of_4", "checker_sanity", "edits", "seed"):
        assert recomputed[key] == result[key], key


def test_region_log_likelihoods_split_the_whole_grid(bench, tokenizer, tmp_path):
    """masked + context + the kept cells before the first masked one = the whole grid's log p(codes | prompt)."""
    import torch

    from dalle_hf.pipeline_dalle import DallePipeline

    pipe = DallePipeline.from_pretrained(save_tiny_64px_pipeline(tmp_path / "pipe", tokenizer))
    codes = torch.randint(0, 32, (3, 16, 16), generator=torch.Generator().manual_seed(0))
    cells = torch.zeros(16, 16, dtype=torch.bool)
    cells[5:8, 4:9] = True
    regions = bench.region_log_likelihoods(pipe, codes, cells, "a red circle")
    per_code = pipe.code_log_probs(codes.reshape(3, -1), pipe.encode_prompt(["a red circle"] * 3))  # (3, 256)
    first = 5 * 16 + 4
    torch.testing.assert_close(regions["whole"], pipe.score(image_tokens=codes, captions="a red circle").log_likelihood)
    torch.testing.assert_close(regions["masked"] + regions["after"] + per_code[:, :first].sum(-1), regions["whole"])
    torch.testing.assert_close(regions["masked"], per_code[:, cells.reshape(-1)].sum(-1))

