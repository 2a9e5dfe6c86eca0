"""DalleBartForImageGeneration: published parameter counts, min-dalle's keys, and parity with min-dalle 0.4.11's own
classes on random weights (encoder states, decoder logits step by step through the cache)."""

import pytest
import torch

from dalle_hf.configuration_dalle_bart import DalleBartConfig
from dalle_hf.modeling_dalle_bart import DalleBartCache, DalleBartForImageGeneration
from tests.dalle_bart_reference import (
    is_unscaled_norm,
    load_into_min_dalle,
    min_dalle_modules,
    randomize,
    tiny_bart_config,
)


def published_parameter_count(*, text_vocab, image_vocab, d, layers, glu) -> int:
    """Parameters of a published dalle-mini checkpoint, summed from the shapes of its Flax tree
    (`flax_model.msgpack`: normformer, GLU, no bias, `force_ln_scale=false`; dalle-mini 0.1.5's modeling.py)."""
    # GLU_0: LayerNorm_0/bias, Dense_0, Dense_1, LayerNorm_1/bias, Dense_2
    glu_block = d + d * glu + d * glu + glu + glu * d
    attention = 4 * d * d  # q, k, v, out kernels
    encoder_layer = d + attention + 2 * d + glu_block  # LayerNorm_0/bias, FlaxBartAttention_0, LayerNorm_1/{scale,bias}
    decoder_layer = encoder_layer + d + attention + 2 * d  # + LayerNorm_2/bias, FlaxBartAttention_1, LayerNorm_3
    encoder = text_vocab * d + 64 * d + 2 * d + d + layers * encoder_layer  # embeddings, layernorm_embedding, final_ln
    decoder = (image_vocab + 1) * d + 256 * d + 2 * d + d + layers * decoder_layer + d * (image_vocab + 1)  # + lm_head
    return encoder + decoder


@pytest.mark.parametrize(
    "preset, published",
    [
        ("mini", dict(text_vocab=50264, image_vocab=16384, d=1024, layers=12, glu=2730)),
        ("mega", dict(text_vocab=50272, image_vocab=16415, d=2048, layers=24, glu=4096)),
    ],
)
def test_presets_have_the_published_parameter_count(preset, published):
    config = getattr(DalleBartConfig, preset)()
    with torch.device("meta"):
        model = DalleBartForImageGeneration(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == published_parameter_count(**published)
    # about 0.4B and 2.6B, as the model cards say
    assert round(count / 1e9, 1) == {"mini": 0.4, "mega": 2.6}[preset]


@pytest.mark.parametrize("preset", ["mini", "mega"])
def test_keys_are_min_dalles_prefixed_without_the_missing_scales(preset):
    config = getattr(DalleBartConfig, preset)()
    with torch.device("meta"):
        model = DalleBartForImageGeneration(config)
        encoder, decoder = min_dalle_modules(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reference = {
        f"{prefix}{k}": tuple(v.shape)
        for prefix, module in (("encoder.", encoder), ("decoder.", decoder))
        for k, v in module.state_dict().items()
        if not (k.endswith(".weight") and is_unscaled_norm(k))
    }
    assert ours == reference
    assert model.state_dict()["decoder.layers.0.pre_self_attn_layer_norm.bias"].shape == (config.d_model,)


def test_config_validates_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="multiple of attention_heads"):
        tiny_bart_config(d_model=30)
    with pytest.raises(ValueError, match="square"):
        tiny_bart_config(image_seq_len=200)
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        tiny_bart_config(decoder_start_token_id=16385)
    assert DalleBartConfig.mini(decoder_layers=3).decoder_layers == 3
    config = DalleBartConfig.mega()
    config.save_pretrained(tmp_path)
    loaded = DalleBartConfig.from_pretrained(tmp_path)
    assert (loaded.d_model, loaded.image_vocab_size, loaded.decoder_start_token_id) == (2048, 16415, 16384)


def text_rows(config) -> torch.LongTensor:
    """min-dalle's two text rows: `[bos, eos]` then padding, and a prompt then padding."""
    text = torch.ones(2, config.text_seq_len, dtype=torch.long)
    text[0, :2] = torch.tensor([0, 2])
    text[1, :7] = torch.tensor([0, 17, 45, 210, 9, 123, 2])
    return text


@pytest.fixture(scope="module")
def models():
    config = tiny_bart_config()
    ours = randomize(DalleBartForImageGeneration(config))
    encoder, decoder = min_dalle_modules(config)
    load_into_min_dalle(ours.state_dict(), encoder, decoder)
    return ours, encoder, decoder


@torch.no_grad()
def test_encoder_states_match_min_dalle(models):
    ours, encoder, _ = models
    text = text_rows(ours.config)
    reference = encoder(text)
    out = ours(input_ids=text)
    torch.testing.assert_close(out.encoder_last_hidden_state, reference, rtol=1e-5, atol=1e-5)
    assert reference.abs().mean() > 0.1  # not a degenerate comparison


@torch.no_grad()
def test_decoder_logits_match_min_dalle_step_by_step_through_the_cache(models):
    ours, encoder, decoder = models
    config = ours.config
    text = text_rows(config)
    encoder_state = encoder(text)
    attention_mask = text.not_equal(1)[:, None, None, :]
    attention_state = torch.zeros(config.decoder_layers, 4, 256, config.d_model)
    codes = torch.randint(0, 16384, (1, 40), generator=torch.Generator().manual_seed(1))
    inputs = torch.cat([torch.tensor([[config.decoder_start_token_id]]), codes], dim=1)  # (1, 41)

    out = ours(input_ids=text, use_cache=True, logits_to_keep=1)
    cache = out.cache
    assert isinstance(cache, DalleBartCache) and cache.length == 1
    ours_logits = [ours.image_logits(out.logits[:, -1])]
    for i in range(1, inputs.shape[1]):
        ours_logits.append(ours.decode_step(inputs[:, i : i + 1].repeat(2, 1), cache))
    reference_logits = []
    for i in range(inputs.shape[1]):
        logits, attention_state = decoder.forward(
            attention_mask=attention_mask, encoder_state=encoder_state, attention_state=attention_state,
            prev_tokens=inputs[:, [i]], token_index=torch.tensor([i]),
        )  # fmt: skip
        reference_logits.append(logits[:, -1, :16384])
    for step, (a, b) in enumerate(zip(ours_logits, reference_logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    assert cache.length == inputs.shape[1]

    # the teacher-forced forward gives the same logits in one pass
    full = ours(input_ids=text, image_ids=codes.repeat(2, 1)).logits  # (2, 41, V + 1)
    torch.testing.assert_close(ours.image_logits(full), torch.stack(reference_logits, dim=1), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_known_runs_after_cached_codes_match_one_at_a_time(models):
    ours, _, _ = models
    text = text_rows(ours.config)
    codes = torch.randint(0, 16384, (2, 12), generator=torch.Generator().manual_seed(2))
    one_pass = ours(input_ids=text, image_ids=codes).logits  # (2, 13, V + 1)
    cache = ours(input_ids=text, image_ids=codes[:, :4], use_cache=True).cache  # start + 4 codes
    run = ours(image_ids=codes[:, 4:], cache=cache).logits  # 8 more codes at once
    torch.testing.assert_close(run, one_pass[:, 5:], rtol=1e-5, atol=1e-5)
    # scores in float64 agree between the teacher-forced and cached hidden states
    hidden = ours(input_ids=text, image_ids=codes[:, :-1], logits_to_keep=12).last_hidden_state
    log_probs = ours.image_log_probs(hidden)
    assert log_probs.dtype == torch.float64 and log_probs.shape == (2, 12, 16384)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 12, dtype=torch.float64))


@torch.no_grad()
def test_identical_prompts_are_encoded_once_and_the_cache_reorders(models):
    ours, _, _ = models
    text = text_rows(ours.config)
    rows = text[[0, 1, 1, 0, 1]]
    out = ours(input_ids=rows, use_cache=True, logits_to_keep=1)
    single = ours(input_ids=text, use_cache=True, logits_to_keep=1)
    torch.testing.assert_close(out.logits, single.logits[[0, 1, 1, 0, 1]])
    cache = out.cache.reorder(torch.tensor([1, 3]))
    step = ours.decode_step(torch.tensor([[5], [5]]), cache)
    reference = ours.decode_step(torch.tensor([[5], [5]]), single.cache)
    torch.testing.assert_close(step, reference[[1, 0]], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_bfloat16_keeps_the_cache_in_the_compute_dtype(models):
    ours, _, _ = models
    model = DalleBartForImageGeneration(ours.config).eval()
    model.load_state_dict(ours.state_dict())
    model.to(torch.bfloat16)
    text = text_rows(ours.config)
    out = model(input_ids=text, use_cache=True, logits_to_keep=1)
    assert out.cache.keys.dtype == torch.bfloat16 and out.cache.encoder_keys[0].dtype == torch.bfloat16
    logits = model.decode_step(torch.tensor([[3], [3]]), out.cache)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    fp32 = ours.decode_step(torch.tensor([[3], [3]]), ours(input_ids=text, use_cache=True).cache)
    assert (logits.float() - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_bad_inputs_raise_clear_errors(models):
    ours, _, _ = models
    text = text_rows(ours.config)
    with pytest.raises(ValueError, match="text_seq_len=64"):
        ours(input_ids=text[:, :10])
    with pytest.raises(ValueError, match="other than padding"):
        ours(input_ids=torch.ones_like(text))
    with pytest.raises(ValueError, match=r"VQGAN codes in \[0, 16384\)"):
        ours(input_ids=text, image_ids=torch.full((2, 1), 16384))
    with pytest.raises(ValueError, match="required unless continuing"):
        ours(image_ids=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder has 256"):
        ours(input_ids=text, image_ids=torch.zeros(2, 256, dtype=torch.long))
