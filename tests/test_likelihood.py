"""DallePipeline.score: log-likelihoods of dVAE codes under the transformer (docs/likelihood.md)."""

import math

import pytest
import torch

from dalle_hf.pipeline_dalle import DalleClassificationOutput, DalleScoreOutput, standardize_per_group


def random_codes(n, seed=0, grid=4, vocab=32):
    return torch.randint(0, vocab, (n, grid, grid), generator=torch.Generator().manual_seed(seed))


def cached_log_likelihood(pipe, codes, caption):
    """Reference: the KV-cached sampling path, one token at a time, float32 logits."""
    model = pipe.transformer
    flat = codes.flatten()
    out = model(input_ids=pipe.encode_prompt([caption]), use_cache=True, logits_to_keep=1)
    logits = model.image_logits(out.logits[:, -1])
    total = 0.0
    for i, code in enumerate(flat.tolist()):
        total += logits.float().log_softmax(-1)[0, code].item()
        if i + 1 < len(flat):
            logits = model.decode_step(flat[i : i + 1][None], out.cache)
    return total


def test_score_matches_the_training_loss_and_the_cached_path(pipe):
    codes = random_codes(3)
    captions = ["a red circle", "a blue square", "three small circles"]
    out = pipe.score(image_tokens=codes, captions=captions)
    assert isinstance(out, DalleScoreOutput)
    assert out.log_likelihood.shape == (3,) and out.log_likelihood.dtype == torch.float64
    N = codes[0].numel()
    for i in range(3):
        loss = pipe.transformer(
            input_ids=pipe.encode_prompt([captions[i]]), image_ids=codes[i].flatten()[None], return_loss=True
        ).image_loss  # mean cross-entropy over the N codes, float32
        assert out.log_likelihood[i].item() == pytest.approx(-N * loss.item(), rel=1e-5)
        reference = cached_log_likelihood(pipe, codes[i], captions[i])
        assert out.log_likelihood[i].item() == pytest.approx(reference, rel=1e-5)
    torch.testing.assert_close(out.log_likelihood_bits, out.log_likelihood / math.log(2))
    assert torch.equal(out.image_tokens, codes)
    assert (out.log_likelihood < 0).all()


def test_unconditional_is_empty_text_and_batching_does_not_matter(pipe):
    codes = random_codes(5, seed=1)
    out = pipe.score(image_tokens=codes, captions="a red circle", batch_size=2)
    empty = pipe.score(image_tokens=codes, captions="", batch_size=5)
    torch.testing.assert_close(out.unconditional_log_likelihood, empty.log_likelihood, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(empty.unconditional_log_likelihood, empty.log_likelihood, rtol=0, atol=0)
    one_by_one = pipe.score(image_tokens=codes, captions="a red circle", batch_size=1)
    torch.testing.assert_close(one_by_one.log_likelihood, out.log_likelihood, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.unconditional_log_likelihood_bits, empty.log_likelihood / math.log(2))
    # a caption changes the likelihood (the model reads the text)
    assert not torch.allclose(out.log_likelihood, out.unconditional_log_likelihood)


def test_score_images_encodes_them_with_the_dvae(pipe):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pipe.score(images, ["a red circle", "a blue square"])
    codes = pipe.vae.get_codebook_indices(images)
    assert torch.equal(out.image_tokens, codes)
    from_codes = pipe.score(image_tokens=codes, captions=["a red circle", "a blue square"])
    torch.testing.assert_close(out.log_likelihood, from_codes.log_likelihood, rtol=0, atol=0)
    pil = pipe.score([pipe.postprocess(images[:1], "pil")[0]], "a red circle")
    assert pil.image_tokens.shape == (1, 4, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of images or image_tokens"),
        (dict(images=torch.rand(1, 3, 16, 16), image_tokens=torch.zeros(1, 4, 4, dtype=torch.long)), "exactly one"),
        (dict(image_tokens=torch.zeros(1, 3, 3, dtype=torch.long)), r"\(n, 4, 4\)"),
        (dict(image_tokens=torch.zeros(1, 4, 4)), "LongTensor"),
        (dict(image_tokens=torch.full((1, 4, 4), 32)), r"codes in \[0, 32\)"),
        (dict(image_tokens=torch.zeros(2, 4, 4, dtype=torch.long), captions=["a"]), "one per image"),
        (dict(image_tokens=torch.zeros(1, 4, 4, dtype=torch.long), batch_size=0), "batch_size"),
        (dict(images="a red circle"), "images must be"),
    ],
)
def test_score_validates_its_inputs(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.score(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot classification


def test_classify_ranks_captions_by_likelihood(pipe):
    codes = random_codes(1, seed=2)[0]
    candidates = ["a red circle", "a blue square", "three small circles", "a diamond above a triangle"]
    out = pipe.classify(codes, candidates)
    assert isinstance(out, DalleClassificationOutput)
    scores = pipe.score(image_tokens=codes.expand(4, 4, 4), captions=candidates)
    expected = torch.argsort(scores.log_likelihood, descending=True)
    assert out.indices.tolist() == expected.tolist()
    assert out.captions == [candidates[i] for i in expected.tolist()]
    torch.testing.assert_close(out.log_likelihood, scores.log_likelihood[expected], rtol=1e-9, atol=1e-9)
    # the unconditional term is the same for every caption: the ratio ranks them the same way
    torch.testing.assert_close(out.log_likelihood_ratio, (scores.log_likelihood - scores.unconditional_log_likelihood)[
        expected], rtol=1e-9, atol=1e-9)  # fmt: skip
    assert (out.log_likelihood_ratio.diff() <= 0).all() and (out.probabilities.diff() <= 0).all()
    assert out.probabilities.sum().item() == pytest.approx(1.0)
    ratio = out.probabilities[0] / out.probabilities[1]
    assert ratio.log().item() == pytest.approx((out.log_likelihood[0] - out.log_likelihood[1]).item())


def test_classify_an_image_is_classify_its_codes(pipe):
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3))
    candidates = ["a red circle", "a blue square"]
    from_image = pipe.classify(image, candidates)
    from_codes = pipe.classify(pipe.vae.get_codebook_indices(image[None])[0], candidates)
    assert from_image.captions == from_codes.captions
    torch.testing.assert_close(from_image.log_likelihood, from_codes.log_likelihood, rtol=0, atol=0)


@pytest.mark.parametrize(
    "candidates, match",
    [(["a red circle"], "at least 2"), (["a", "a"], "distinct"), ("a red circle", "list"), (["a", 3], "list")],
)
def test_classify_validates_candidates(pipe, candidates, match):
    with pytest.raises(ValueError, match=match):
        pipe.classify(random_codes(1)[0], candidates)


# ---------------------------------------------------------------------------------------------------------------
# Likelihood reranking in DallePipeline.__call__


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_likelihood_rerank_keeps_the_most_likely_candidates(pipe):
    prompts = ["a red circle", "a blue square"]
    everything = pipe(prompts, num_images_per_prompt=5, generator=gen(3), output_type="pt", rerank="likelihood")
    best = pipe(prompts, num_images_per_prompt=5, num_images_to_keep=2, generator=gen(3), output_type="pt",
                rerank="likelihood")  # fmt: skip
    assert best.ranked_by == "likelihood" and best.clip_scores is None
    assert best.likelihood_scores.shape == (2, 2) and best.likelihood_scores.dtype == torch.float64
    assert (best.likelihood_scores[:, 0] >= best.likelihood_scores[:, 1]).all()
    torch.testing.assert_close(best.likelihood_scores, everything.likelihood_scores[:, :2])
    assert torch.equal(best.image_tokens.view(2, 2, 4, 4), everything.image_tokens.view(2, 5, 4, 4)[:, :2])
    # the score is log p(codes | prompt), as DallePipeline.score computes it
    scores = pipe.score(image_tokens=best.image_tokens, captions=[p for p in prompts for _ in range(2)])
    torch.testing.assert_close(best.likelihood_scores, scores.log_likelihood.view(2, 2), rtol=1e-9, atol=1e-9)


def test_both_rerank_adds_standardized_scores(pipe):
    out = pipe("a red circle", num_images_per_prompt=6, generator=gen(4), output_type="pt", rerank="both")
    assert out.ranked_by == "both" and out.clip_scores.shape == (1, 6) and out.likelihood_scores.shape == (1, 6)
    combined = standardize_per_group(out.clip_scores.flatten(), 1) + standardize_per_group(
        out.likelihood_scores.flatten(), 1)  # fmt: skip
    assert (combined.diff() <= 1e-9).all()  # kept in the order of the combined score
    z = standardize_per_group(torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 9.0]), 2)
    torch.testing.assert_close(z[:3], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * 1.5**0.5)
    assert torch.equal(standardize_per_group(torch.ones(3), 1), torch.zeros(3, dtype=torch.float64))


def test_clip_stays_the_default_reranker(pipe):
    default = pipe("a red circle", num_images_per_prompt=4, num_images_to_keep=2, generator=gen(5), output_type="pt")
    clip = pipe("a red circle", num_images_per_prompt=4, num_images_to_keep=2, generator=gen(5), output_type="pt",
                rerank="clip")  # fmt: skip
    assert default.ranked_by == "clip" and default.likelihood_scores is None
    assert torch.equal(default.image_tokens, clip.image_tokens)


def test_rerank_without_clip(tokenizer, transformer, vae):
    from dalle_hf.pipeline_dalle import DallePipeline

    pipe = DallePipeline(tokenizer=tokenizer, transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_images_per_prompt=3, num_images_to_keep=1, generator=gen()).ranked_by is None
    out = pipe("a red circle", num_images_per_prompt=3, num_images_to_keep=1, generator=gen(), rerank="likelihood")
    assert out.ranked_by == "likelihood" and out.likelihood_scores.shape == (1, 1)
    with pytest.raises(ValueError, match='rerank="both" needs a CLIP model'):
        pipe("a red circle", rerank="both")


def test_rerank_is_validated(pipe):
    with pytest.raises(ValueError, match=r"rerank must be one of \('clip', 'likelihood', 'both'\)"):
        pipe("a red circle", rerank="perplexity")


# ---------------------------------------------------------------------------------------------------------------
# dalle-hf eval classify


def test_zero_shot_classification_scores_likelihood_and_clip(pipe):
    from dalle_hf.eval.classification import zero_shot_classification
    from dalle_hf.data.shapes import caption_ranking_set
    from dalle_hf.train_clip import caption_ranking_hits

    ranking = caption_ranking_set(n_images=6, n_captions=3, seed=0)
    pixel_values, candidates, tasks = ranking.pixel_values, ranking.candidates, ranking.groups
    report = zero_shot_classification(pipe, pixel_values, candidates, tasks, batch_size=4)
    expected = [pipe.classify(image, cands).indices[0].item() == 0 for image, cands in zip(pixel_values, candidates)]
    assert report["likelihood_top1"] == pytest.approx(sum(expected) / 6)
    clip_hits = caption_ranking_hits(pipe.clip_model, pipe.clip_processor, pixel_values, candidates)
    assert report["clip_top1"] == pytest.approx(clip_hits.double().mean().item())
    assert set(report["per_task"]) == set(tasks) and report["n_captions"] == 3 and report["chance"] == 1 / 3
    for task, scores in report["per_task"].items():
        hits = [ok for ok, t in zip(expected, tasks) if t == task]
        assert scores["likelihood"] == pytest.approx(sum(hits) / len(hits))
    with pytest.raises(ValueError, match="one candidate list per image"):
        zero_shot_classification(pipe, pixel_values, candidates[:2])


def test_cli_eval_classify(pipe, tmp_path, capsys):
    import json

    from dalle_hf.cli import main

    pipe.save_pretrained(tmp_path / "pipe")
    assert main(["eval", "classify", "--pipeline", str(tmp_path / "pipe"), "--n-images", "6", "--n-captions", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_images"] == 6 and report["world"] == "shapes"
    assert 0 <= report["likelihood_top1"] <= 1 and 0 <= report["clip_top1"] <= 1
