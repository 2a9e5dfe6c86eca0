"""The sampling fast path: `decode_step` against `forward`, bf16 on CPU, the dVAE decoder's lookup input layer."""

import pytest
import torch
import torch.nn.functional as F

from dalle_hf.modeling_dalle import DalleForImageGeneration
from dalle_hf.pipeline_dalle import DallePipeline

from .conftest import tiny_dalle_config


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def prefill(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 300, (B, 8), generator=g)
    image = torch.randint(0, 32, (B, 16), generator=g)
    return text, image


@pytest.mark.parametrize("attention_types", [None, ["row", "conv"], ["column", "full"]])
def test_decode_step_matches_forward(attention_types):
    torch.manual_seed(0)
    model = DalleForImageGeneration(tiny_dalle_config(attention_types=attention_types, conv_kernel_size=3)).eval()
    text, image = prefill(model)
    with torch.no_grad():
        full = model.image_logits(model(input_ids=text, image_ids=image).logits)  # (B, 25, V_i)
        cache = model(input_ids=text, image_ids=image[:, :2], use_cache=True).cache
        steps = []
        for i in range(2, 16):
            steps.append(model.decode_step(image[:, i : i + 1], cache))
            assert cache.length == 1 + 8 + i + 1
    assert torch.allclose(torch.stack(steps, 1), full[:, 11:25], atol=1e-5)


def test_decode_step_bf16_uses_a_bf16_cache():
    torch.manual_seed(0)
    model = DalleForImageGeneration(tiny_dalle_config()).eval()
    text, image = prefill(model)
    with torch.no_grad():
        reference = model.image_logits(model(input_ids=text, image_ids=image).logits[:, -1])
        model.to(torch.bfloat16)
        out = model(input_ids=text, image_ids=image[:, :15], use_cache=True, logits_to_keep=1)
        assert out.cache.keys.dtype == torch.bfloat16 and model.cache_dtype == torch.bfloat16
        logits = model.decode_step(image[:, 15:], out.cache)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 32)
    assert torch.allclose(logits.float(), reference, atol=0.05)


def test_sampling_calls_forward_once_then_decode_steps(pipe):
    """The loop does no per-token model work beyond `decode_step` (no validation, no full-vocabulary head)."""
    calls = {"forward": 0, "decode_step": 0}
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    original = pipe.transformer.decode_step

    def counting(*args, **kwargs):
        calls["decode_step"] += 1
        return original(*args, **kwargs)

    pipe.transformer.decode_step = counting
    try:
        pipe(["a red circle", "a blue square"], guidance_scale=3.0, generator=gen())
    finally:
        handle.remove()
        del pipe.transformer.decode_step
    assert calls == {"forward": 1, "decode_step": 15}  # prefill, then one step per token but the last


def test_temperature_one_is_the_plain_softmax(pipe):
    input_ids = pipe.encode_prompt(["a red circle"])
    a = pipe.sample_image_tokens(input_ids, temperature=1.0, generator=gen(3))
    b = pipe.sample_image_tokens(input_ids, temperature=1, top_p=1.0, generator=gen(3))
    assert torch.equal(a, b)


def test_bf16_pipeline_on_cpu(tokenizer, transformer, vae, clip, tmp_path):
    DallePipeline(
        tokenizer=tokenizer, transformer=transformer, vae=vae, clip_model=clip[0], clip_processor=clip[1]
    ).save_pretrained(tmp_path)
    pipe = DallePipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    kwargs = dict(num_images_per_prompt=3, num_images_to_keep=2, guidance_scale=2.0, output_type="pt")
    a = pipe(["a red circle", "a blue square"], generator=gen(1), **kwargs)
    b = pipe(["a red circle", "a blue square"], generator=gen(1), **kwargs)
    assert torch.equal(a.image_tokens, b.image_tokens) and a.image_tokens.shape == (4, 4, 4)
    assert a.images.dtype == torch.float32 and a.images.shape == (4, 3, 16, 16)
    assert 0 <= a.images.min() and a.images.max() <= 1


def test_dvae_decode_is_a_lookup_of_the_one_hot_conv(vae):
    ids = torch.randint(0, 32, (3, 4, 4), generator=gen())
    with torch.no_grad():
        one_hot = F.one_hot(ids, 32).permute(0, 3, 1, 2).float()  # (B, V, h, w)
        reference = vae._mean_image(vae._decode_stats(one_hot)[0])
        assert torch.equal(vae.decode_code(ids), reference)
        assert torch.equal(vae.decoder.forward_codes(ids), vae.decoder(one_hot))
        vae.to(torch.bfloat16)
        images = vae.decode_code(ids)
    assert images.dtype == torch.float32 and (images - reference).abs().max() < 0.02
