"""EmojiEval (dalle_hf/eval/emoji.py) and its judge (dalle_hf/eval/emoji_judge.py) on the tiny emoji cache of
tests/test_worlds.py and the tiny random pipeline of conftest.py: no network, no real cache, seconds each."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_hf.data.emoji import EmojiWorld, is_held_out
from dalle_hf.eval.emoji import SPLITS, evaluate_emoji, evaluation_pairs, frechet_distance, parse_splits
from dalle_hf.eval.emoji_judge import (
    QUALITY_FILE,
    EmojiJudge,
    EmojiJudgeConfig,
    accepts,
    augment,
    choose_threshold,
    false_accept_rate,
    gaussian_blur,
    non_emoji_images,
    shift,
    train_judge,
)
from dalle_hf.eval.shapes import _FAIL_RGB, _PASS_RGB
from tests.test_worlds import CONCEPTS, TINY_STYLES, write_tiny_cache


@pytest.fixture(scope="module")
def emoji_cache(tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("emoji-cache"))


@pytest.fixture(scope="module")
def judge_dir(emoji_cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("judge"))
    train_judge(emoji_cache, out, epochs=1, max_steps=2, batch_size=8, log=lambda line: None)
    return out


def test_judge_trains_reports_its_quality_and_round_trips(judge_dir, emoji_cache):
    with open(os.path.join(judge_dir, QUALITY_FILE)) as f:
        quality = json.load(f)
    assert set(quality["accuracy"]) == {"clean", "blur_sigma_1", "noise_std_0.05", "jpeg_quality_30", "shift_4px"}
    for scores in quality["accuracy"].values():
        assert 0 <= scores["concept"] <= 1 and 0 <= scores["style"] <= 1
    assert {"white", "uniform_noise", "wrong_concept"} <= set(quality["false_accept"])
    assert all(0 <= quality["false_accept"][k] <= 1 for k in ("white", "uniform_noise", "wrong_concept"))
    assert quality["n_validation_images"] == 4  # the fixed 10% rule holds out 4 of the 30 tiny renders
    assert quality["training"]["steps"] == 2 and "argmax" in quality["accept_rule"]
    assert os.path.isfile(os.path.join(judge_dir, "model.safetensors"))

    judge = EmojiJudge.from_pretrained(judge_dir).eval()
    assert judge.config.concepts == sorted(CONCEPTS) and judge.config.styles == ["noto", "noto mono", "twemoji",
                                                                                 "fluent 3d", "symbola"]
    assert judge.config.accept_threshold == pytest.approx(quality["accept_threshold"])
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    again = EmojiJudge.from_pretrained(judge_dir).eval()
    torch.testing.assert_close(judge(pixels).concept_logits, again(pixels).concept_logits)
    out = judge(torch.rand(2, 3, 16, 16))  # other sizes are resized to 64
    assert out.concept_logits.shape == (2, 6) and out.style_logits.shape == (2, 5) and out.features.shape == (2, 128)
    with pytest.raises(ValueError, match=r"expected `pixel_values` of shape \(B, 3, H, W\)"):
        judge(torch.rand(3, 64, 64))


def test_accept_rule_and_false_accepts_on_a_constructed_case():
    probs = torch.tensor([
        [0.70, 0.20, 0.10],  # confident concept 0
        [0.40, 0.35, 0.25],  # unsure concept 0
        [0.10, 0.85, 0.05],  # confident concept 1
        [0.30, 0.30, 0.40],  # unsure concept 2
    ])  # fmt: skip
    assert accepts(probs, torch.tensor([0, 0, 0, 2]), 0.5).tolist() == [True, False, False, False]
    assert accepts(probs, torch.tensor([0, 0, 1, 2]), 0.4).tolist() == [True, True, True, True]
    # Blank images: each asked for its most likely concept; accepted iff that probability reaches the threshold.
    assert false_accept_rate(probs, 0.5) == 0.5
    assert false_accept_rate(probs, 0.9) == 0.0
    # Wrong concept: true concepts [1, 0, 1, 2]: image 0 is confidently wrong (0 != 1), image 1's hardest wrong
    # prompt (1) is not its argmax, image 2 is right, image 3 is right: one false accept of four at 0.5.
    assert false_accept_rate(probs, 0.5, torch.tensor([1, 0, 1, 2])) == 0.25
    assert false_accept_rate(probs, 0.75, torch.tensor([1, 0, 1, 2])) == 0.0
    # The threshold keeps 95% of the correct answers: the 5% quantile of their top probabilities.
    threshold, source = choose_threshold(probs, torch.tensor([0, 0, 1, 2]))
    assert threshold == pytest.approx(torch.quantile(torch.tensor([0.70, 0.40, 0.85, 0.40]), 0.05).item())
    assert source == "correct validation answers"
    with pytest.raises(ValueError, match=r"expected \(N, C\) probabilities and \(N,\) asked"):
        accepts(probs, torch.tensor([0, 1]), 0.5)


def test_frechet_distance_is_zero_for_identical_sets_and_positive_otherwise():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 8, generator=generator)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    shifted = features + 1.0  # the same covariance, the mean moved by 1 in each of 8 dims: distance 8
    assert frechet_distance(features, shifted) == pytest.approx(8.0, rel=1e-6)
    assert frechet_distance(features, 2 * features) > 1.0
    with pytest.raises(ValueError, match="expected two \\(N, D\\) feature sets of the same D"):
        frechet_distance(features, features[:, :4])
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        frechet_distance(features[:1], features)


def test_augmentations_keep_shape_and_range():
    images = torch.ones(4, 3, 64, 64)
    images[:, :, 20:40, 20:40] = 0.0
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    blurred = gaussian_blur(images, torch.tensor([0.0, 1.0, 2.0, 0.5]))
    torch.testing.assert_close(blurred[0], images[0], atol=1e-4, rtol=0)  # sigma ~0: unchanged
    assert blurred[2, 0, 30, 19] < 1.0  # ink spread outwards
    moved = shift(images, torch.tensor([4, 0, 0, 0]), torch.tensor([0, 0, 0, 0]))
    torch.testing.assert_close(moved[0, :, 20:40, 24:44], images[0, :, 20:40, 20:40])
    assert moved[0, :, :, :4].eq(1).all()  # white fill
    black = torch.zeros(64, 3, 64, 64)  # stand-in round trips: about 30% of the images are replaced by them
    means = augment(torch.ones(64, 3, 64, 64), torch.Generator().manual_seed(0), round_trips=black).mean((1, 2, 3))
    assert 5 <= int((means < 0.5).sum()) <= 35


def test_non_emoji_images_and_outlier_exposure(emoji_cache, tmp_path):
    images = non_emoji_images(30, torch.Generator().manual_seed(0))
    assert images.shape == (30, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    per_image_std = images.std((1, 2, 3))
    assert (per_image_std < 0.06).any() and (per_image_std > 0.25).any()  # flat colours and uniform noise both drawn
    # Outlier exposure pushes a non-emoji image's concept distribution toward uniform: after the same few steps from
    # the same seed, the judge trained with it is less sure of any concept on noise images than the one without.
    noise = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    top = {}
    for fraction in (0.0, 0.5):
        train_judge(emoji_cache, str(tmp_path / f"j{fraction}"), max_steps=30, batch_size=8, learning_rate=1e-2,
                    outlier_fraction=fraction, log=lambda line: None)  # fmt: skip
        judge = EmojiJudge.from_pretrained(str(tmp_path / f"j{fraction}"))
        top[fraction] = judge.predict(noise)["concept_probs"].max(1).values.mean().item()
    assert top[0.5] < top[0.0]
    with pytest.raises(ValueError, match="outlier_fraction"):
        train_judge(emoji_cache, str(tmp_path / "bad"), outlier_fraction=1.0)


def test_evaluation_pairs_are_fixed_balanced_and_respect_the_held_out_rule(emoji_cache):
    world = EmojiWorld(emoji_cache)
    seen = evaluation_pairs(world, "seen", 10)
    assert seen == evaluation_pairs(world, "seen", 10) and seen != evaluation_pairs(world, "seen", 10, prompt_seed=1)
    assert not any(is_held_out(key, style) for key, _, style in seen)
    assert {style for _, _, style in seen[:5]} == set(TINY_STYLES)  # one per style before any style repeats
    novel = evaluation_pairs(world, "novel", 10)
    assert sorted((key, style) for key, _, style in novel) == [("1f43d", "noto"), ("1f43d", "twemoji"),
                                                               ("1f98a", "fluent 3d")]  # fmt: skip
    plain = evaluation_pairs(world, "plain", 4)
    assert len(plain) == 4 and all(style is None and CONCEPTS[key][0] == label for key, label, style in plain)


def _sheet_has_marks(path) -> bool:
    colors = {tuple(c) for c in np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).tolist()}
    return _PASS_RGB in colors or _FAIL_RGB in colors


def test_evaluate_emoji_writes_every_field_and_sheets(pipe, judge_dir, emoji_cache, tmp_path):
    report = evaluate_emoji(pipe, judge_dir, emoji_cache, str(tmp_path), prompts_per_split=2, candidates=2,
                            batch_size=4, n_vae=3, n_clip=4, progress=False)  # fmt: skip
    for split in ("seen", "novel"):
        scores = report[split]
        assert scores["n_prompts"] == 2 and scores["candidates"] == 2 and scores["reranked_by_clip"] is True
        for key in ("best_of_1", "clip_best_of_n", "oracle_any_of_n"):
            assert set(scores[key]) == {"concept", "style", "both"}
            assert all(0 <= v <= 1 for v in scores[key].values())
            assert scores[key]["both"] <= min(scores[key]["concept"], scores[key]["style"])
        assert scores["frechet_distance"] >= 0
        assert set(scores["real_renders"]) == {"concept", "style", "both"}
        assert all(0 <= v <= 1 for v in scores["real_renders"].values())
    assert set(report["plain"]["best_of_1"]) == {"concept"}
    vae = report["vae"]
    assert vae["n"] == 3 and vae["image_size"] == 16 and np.isfinite(vae["psnr_held_out"])
    # the same renders and number as training's `World.evaluate_vae` with the same seed
    assert EmojiWorld(emoji_cache).evaluate_vae(pipe.vae, 3, seed=0) == {k: vae[k] for k in ("psnr_held_out",
                                                                                             "reconstruction_mse", "n")}
    assert 0 <= vae["judge_concept_accuracy_originals"] <= 1 and 0 <= vae["judge_concept_accuracy_reconstructions"] <= 1
    assert report["clip"]["n_captions"] == 100 and report["clip"]["n_images_seen"] == 4
    assert report["clip"]["image_size"] == 16  # ranked at the side the pipeline draws, not the renders' 64 px
    from dalle_hf.train_clip import caption_ranking_hits, resized

    ranking = EmojiWorld(emoji_cache).caption_ranking_set(4, 100, seed=0, split="train")
    hits = caption_ranking_hits(pipe.clip_model, pipe.clip_processor, resized(ranking.pixel_values, 16),
                                ranking.candidates)  # fmt: skip
    assert report["clip"]["caption_top1_seen"] == float(hits.float().mean())
    assert report["clip"]["n_images_novel"] == 3  # all the tiny cache's held-out renders
    assert 0 <= report["clip"]["caption_top1_seen"] <= 1 and 0 <= report["clip"]["caption_top1_novel"] <= 1
    assert report["config"]["splits"] == list(SPLITS) and report["config"]["judge"]["path"] == judge_dir
    with open(tmp_path / "report.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    records = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert len(records) == 6 and all(len(r["both"]) == 2 for r in records)
    for split in ("seen", "novel", "plain"):
        assert _sheet_has_marks(tmp_path / f"samples_{split}.png")

    # The same seed gives the same verdicts; best-of-1 is the mean over every candidate of a prompt.
    again = evaluate_emoji(pipe, judge_dir, emoji_cache, str(tmp_path / "again"), prompts_per_split=2, candidates=2,
                           batch_size=4, splits="seen", progress=False)  # fmt: skip
    assert again["seen"] == report["seen"]
    seen_records = [r for r in records if r["split"] == "seen"]
    assert report["seen"]["best_of_1"]["both"] == pytest.approx(np.mean([np.mean(r["both"]) for r in seen_records]))
    assert report["seen"]["clip_best_of_n"]["both"] == pytest.approx(np.mean([r["both"][0] for r in seen_records]))


def test_splits_run_separately_merge_into_one_report(pipe, judge_dir, emoji_cache, tmp_path):
    options = {"prompts_per_split": 1, "candidates": 2, "n_vae": 2, "progress": False}
    first = evaluate_emoji(pipe, judge_dir, emoji_cache, str(tmp_path), splits="novel", **options)
    merged = evaluate_emoji(pipe, judge_dir, emoji_cache, str(tmp_path), splits="vae,seen", **options)
    assert merged["config"]["splits"] == ["seen", "novel", "vae"] and merged["novel"] == first["novel"]
    with open(tmp_path / "report.json") as f:
        assert json.load(f) == json.loads(json.dumps(merged))
    assert sorted({json.loads(line)["split"] for line in open(tmp_path / "results.jsonl")}) == ["novel", "seen"]
    with pytest.raises(ValueError, match="same configuration .* but seed differ: choose another --out"):
        evaluate_emoji(pipe, judge_dir, emoji_cache, str(tmp_path), splits="plain", **{**options, "seed": 1})


def test_evaluate_emoji_rejects_bad_input(pipe, judge_dir, emoji_cache, tmp_path):
    def run(**kwargs):
        options = {"prompts_per_split": 1, "candidates": 1, "splits": "seen", "progress": False, **kwargs}
        judge = options.pop("judge", judge_dir)
        return evaluate_emoji(pipe, judge, emoji_cache, str(tmp_path), **options)

    with pytest.raises(ValueError, match="expected splits among seen, novel, plain, vae, clip"):
        run(splits="seen,pictures")
    with pytest.raises(ValueError, match="prompts_per_split must be a positive int, got 0"):
        run(prompts_per_split=0)
    with pytest.raises(ValueError, match="candidates must be a positive int"):
        run(candidates=-1)
    with pytest.raises(ValueError, match="expected sampling without \\['num_images_per_prompt'\\]"):
        run(sampling={"num_images_per_prompt": 4})
    other = EmojiJudge(EmojiJudgeConfig(concepts=["1f34e", "1f350"], styles=list(TINY_STYLES)))
    with pytest.raises(ValueError, match="expected a judge trained on this cache's 6 concepts, got one with 2"):
        run(judge=other)
    with pytest.raises(ValueError, match="expected an EmojiJudge or the folder of one"):
        run(judge=str(tmp_path / "missing"))
    assert parse_splits("clip, seen") == ("seen", "clip") and parse_splits(None) == SPLITS
    with pytest.raises(ValueError, match="expected epochs > 0"):
        train_judge(emoji_cache, str(tmp_path / "j"), epochs=0)


def test_cli_trains_a_judge_and_evaluates(tokenizer, emoji_cache, tmp_path, capsys):
    from dalle_hf.cli import main
    from tests.conftest import save_tiny_pipeline

    judge = str(tmp_path / "judge")
    assert main(["eval", "emoji-judge", "--cache", emoji_cache, "--out", judge, "--max-steps", "1",
                 "--batch-size", "8"]) == 0  # fmt: skip
    assert os.path.isfile(os.path.join(judge, QUALITY_FILE))
    pipeline = save_tiny_pipeline(str(tmp_path / "pipe"), tokenizer, with_clip=True)
    out = str(tmp_path / "eval")
    assert main(["eval", "emoji", "--pipeline", pipeline, "--judge", judge, "--cache", emoji_cache, "--out", out,
                 "--prompts", "1", "--candidates", "2", "--splits", "novel,vae", "--n-vae", "2"]) == 0  # fmt: skip
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert set(report) == {"novel", "vae", "config"} and report["config"]["candidates"] == 2
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "emoji", "--pipeline", pipeline, "--judge", judge, "--cache", emoji_cache, "--out", out,
              "--splits", "everything"])  # fmt: skip


@pytest.mark.parametrize("function", [evaluate_emoji, train_judge])
def test_documented_defaults_match_signatures(function):
    import ast
    import inspect
    import re

    documented = dict(re.findall(r"^\s+(\w+) \(`[^`]+`, \*optional\*, defaults to (.+?)\):", inspect.getdoc(function),
                                 re.M))  # fmt: skip
    parameters = inspect.signature(function).parameters
    optional = {name for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    assert set(documented) == optional
    for name, text in documented.items():
        default, text = parameters[name].default, text.strip("`")
        if callable(default):
            assert text == default.__name__, name
        else:
            assert ast.literal_eval(text) == default, name


def test_judge_with_a_dvae_trains_on_and_reports_round_trips(emoji_cache, vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")  # a 16 px dVAE: round trips are resized back to 64 px
    quality = train_judge(emoji_cache, str(tmp_path / "judge"), max_steps=1, batch_size=8,
                          vae_path=str(tmp_path / "vae"), log=lambda line: None)  # fmt: skip
    assert 0 <= quality["accuracy"]["dvae_round_trip"]["concept"] <= 1
    assert quality["training"]["vae"] == str(tmp_path / "vae")


def test_judge_size_flags_reach_its_config(emoji_cache, tmp_path):
    from dalle_hf.eval.emoji_judge import EmojiJudge, main, parse_args

    args = parse_args(["--cache", emoji_cache, "--out", str(tmp_path / "j"), "--max-steps", "1", "--batch-size", "8",
                       "--widths", "16,24", "--feature-dim", "32", "--dropout", "0"])  # fmt: skip
    assert main(args) == 0
    judge = EmojiJudge.from_pretrained(str(tmp_path / "j"))
    assert judge.config.widths == [16, 24] and judge.config.feature_dim == 32 and judge.config.dropout == 0.0
    with pytest.raises(SystemExit):
        parse_args(["--cache", emoji_cache, "--out", "x", "--widths", "64,wide"])


def test_shipped_judge_loads_and_rejects_blanks():
    """checkpoints/emoji-judge: the judge EmojiEval's numbers were measured with (its card, judge_quality.json)."""
    from pathlib import Path

    from dalle_hf.data.emoji import STYLES

    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "emoji-judge"
    judge = EmojiJudge.from_pretrained(folder).eval()
    quality = json.loads((folder / QUALITY_FILE).read_text())
    assert len(judge.config.concepts) == quality["training"]["concepts"] == 1627
    assert judge.config.styles == list(STYLES) == quality["training"]["styles"]
    assert judge.config.accept_threshold == pytest.approx(quality["accept_threshold"])
    white = (1 - 0.02 * torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    probs = judge.predict(white)["concept_probs"]
    assert false_accept_rate(probs, judge.config.accept_threshold) == 0.0  # outlier exposure: no concept for a blank


def test_heldout_loss_benchmark_on_the_tiny_cache(tokenizer, emoji_cache, tmp_path):
    from benchmarks.emoji_heldout_loss import main
    from tests.conftest import save_tiny_pipeline

    pipeline = save_tiny_pipeline(str(tmp_path / "pipe"), tokenizer)
    out = tmp_path / "loss.json"
    report = main([pipeline, "--cache", emoji_cache, "--n", "3", "--out", str(out)])
    losses = report["pipelines"][pipeline]
    assert set(losses) == {"train", "novel"} and json.loads(out.read_text()) == report
    for split in losses.values():  # a random 32-code model: near log(32) = 3.47 nats a token, with or without text
        assert 2.0 < split["nats_per_token"] < 6.0 and 2.0 < split["nats_per_token_unconditional"] < 6.0
    with pytest.raises(ValueError, match="expected --n > 0"):
        main([pipeline, "--cache", emoji_cache, "--n", "0"])
