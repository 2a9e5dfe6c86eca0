"""DallePipeline.score: log-likelihoods of dVAE codes under the transformer (docs/likelihood.md)."""

import math

import pytest
import torch

from dalle_hf.pipeline_dalle import DalleScoreOutput


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
