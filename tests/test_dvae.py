import inspect
import math
import os
import re

import pytest
import torch

from dalle_hf.configuration_dvae import DalleVAEConfig
from dalle_hf.modeling_dvae import DalleVAE, DalleVAEOutput, map_pixels, unmap_pixels

torch.set_num_threads(1)


def tiny_config(**overrides) -> DalleVAEConfig:
    kwargs = dict(image_size=16, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32)
    kwargs.update(overrides)
    return DalleVAEConfig(**kwargs)


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return DalleVAE(tiny_config()).eval()


def test_config_grid_and_defaults():
    config = DalleVAEConfig()
    assert (config.image_size, config.vocab_size, config.n_hid, config.n_blk_per_group, config.num_groups) == (
        256, 8192, 256, 2, 4
    )
    assert config.downsampling == 8 and config.grid_size == 32
    assert DalleVAEConfig(image_size=64, num_groups=3).grid_size == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=30, num_groups=3), "divisible"),
        (dict(num_groups=5), "num_groups"),
        (dict(n_hid=0), "n_hid"),
        (dict(vocab_size=1), "vocab_size"),
        (dict(logit_laplace_eps=0.5), "logit_laplace_eps"),
        (dict(kl_weight=-1.0), "non-negative"),
        (dict(decoder_n_hid=0), "decoder_n_hid"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DalleVAEConfig(**kwargs)


def test_openai_parameter_names():
    config = DalleVAEConfig(image_size=32, num_groups=4, n_hid=8, n_init=8, n_blk_per_group=2, vocab_size=32)
    keys = set(DalleVAE(config).state_dict())
    for key in [
        "encoder.blocks.input.w",
        "encoder.blocks.input.b",
        "encoder.blocks.group_1.block_1.res_path.conv_1.w",
        "encoder.blocks.group_1.block_2.res_path.conv_4.b",
        "encoder.blocks.group_2.block_1.id_path.w",
        "encoder.blocks.group_4.block_2.res_path.conv_3.w",
        "encoder.blocks.output.conv.w",
        "decoder.blocks.input.w",
        "decoder.blocks.group_1.block_1.id_path.w",
        "decoder.blocks.group_4.block_2.res_path.conv_4.w",
        "decoder.blocks.output.conv.b",
    ]:
        assert key in keys, key
    assert "encoder.blocks.group_1.block_1.id_path.w" not in keys  # same width: identity path
    # OpenAI: input 7x7, encoder res_path 3,3,3,1; decoder res_path 1,3,3,3; output 1x1 to vocab / 6 stats.
    state = DalleVAE(config).state_dict()
    assert state["encoder.blocks.input.w"].shape == (8, 3, 7, 7)
    assert [
        state[f"encoder.blocks.group_2.block_1.res_path.conv_{i}.w"].shape[-1] for i in (1, 2, 3, 4)
    ] == [3, 3, 3, 1]
    assert [
        state[f"decoder.blocks.group_2.block_1.res_path.conv_{i}.w"].shape[-1] for i in (1, 2, 3, 4)
    ] == [1, 3, 3, 3]
    assert state["encoder.blocks.output.conv.w"].shape == (32, 64, 1, 1)  # 8 * n_hid -> vocab
    assert state["decoder.blocks.input.w"].shape == (8, 32, 1, 1)  # vocab -> n_init
    assert state["decoder.blocks.output.conv.w"].shape == (6, 8, 1, 1)
    # Per side: 8 blocks x 4 convs, input and output convs, and a 1x1 id path wherever the width changes
    # (encoder: 3; decoder: 4, as n_init != 8 * n_hid); each conv has w and b.
    assert len(keys) == 2 * (32 + 2 + 3) + 2 * (32 + 2 + 4)
    model = DalleVAE(config)
    assert model.encoder.blocks.group_1.block_1.post_gain == 1 / 8**2


def test_openai_init_scale():
    torch.manual_seed(0)
    config = DalleVAEConfig(image_size=32, num_groups=3, n_hid=64, n_init=64, n_blk_per_group=1, vocab_size=32)
    model = DalleVAE(config)
    w = model.encoder.blocks.group_2.block_1.res_path.conv_2.w  # (32, 32, 3, 3)
    assert w.std().item() == pytest.approx(1 / math.sqrt(32 * 9), rel=0.05)
    assert model.encoder.blocks.group_2.block_1.res_path.conv_2.b.abs().max().item() == 0.0


def test_map_unmap_pixels():
    x = torch.linspace(0, 1, 11)
    assert torch.allclose(map_pixels(x), 0.8 * x + 0.1)
    assert torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped


def test_encode_indices_decode_shapes(vae):
    x = torch.rand(2, 3, 16, 16)
    assert vae.encode(x).shape == (2, 32, 4, 4)
    ids = vae.get_codebook_indices(x)
    assert ids.shape == (2, 4, 4) and ids.dtype == torch.long
    assert torch.equal(ids, vae.encode(x).argmax(1))  # argmax, no noise
    images = vae.decode_code(ids)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(vae.decode_code(ids.view(2, 16)), images)


def test_forward_output_and_backward():
    torch.manual_seed(0)
    model = DalleVAE(tiny_config())
    x = torch.rand(2, 3, 16, 16)
    out = model(x, temperature=0.5, kl_weight=1.0)
    assert isinstance(out, DalleVAEOutput)
    assert out.reconstruction.shape == (2, 3, 16, 16) and out.logits.shape == (2, 32, 4, 4)
    assert out.reconstruction.min() >= 0 and out.reconstruction.max() <= 1
    for name in ("loss", "reconstruction_loss", "kl_loss", "usage_loss"):
        assert out[name].shape == () and torch.isfinite(out[name]), name
    assert 0 <= out.kl_loss.item() <= math.log(32) + 1e-5
    assert 0 <= out.usage_loss.item() <= math.log(32) + 1e-5
    positions_per_dim = 16 / (3 * 16 * 16)
    expected = out.reconstruction_loss + 1.0 * positions_per_dim * out.kl_loss + 0.1 * out.usage_loss
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    as_tuple = model(x, return_dict=False)
    assert len(as_tuple) == 6 and as_tuple[3].shape == (2, 3, 16, 16)


def test_hard_codes_train_the_decoder_on_what_generation_decodes():
    torch.manual_seed(0)
    model = DalleVAE(tiny_config(decoder_n_hid=12))
    assert model.decoder.blocks.output.conv.w.shape[1] == 12  # the finest decoder group is decoder_n_hid wide
    assert model.encoder.blocks.output.conv.w.shape[1] == 8 * 4  # the encoder keeps n_hid
    x = torch.rand(2, 3, 16, 16)
    out = model(x, hard_codes=True)
    assert torch.equal(out.loss, out.reconstruction_loss)  # no KL or usage term: the encoder is fixed
    # The reconstruction is exactly the decode of the argmax codes, with no Gumbel noise.
    torch.testing.assert_close(out.reconstruction, model.decode_code(model.get_codebook_indices(x)))
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_forward_seeded(vae):
    x = torch.rand(2, 3, 16, 16)
    torch.manual_seed(1)
    a = vae(x).loss
    torch.manual_seed(1)
    b = vae(x).loss
    torch.manual_seed(2)
    c = vae(x).loss
    assert a.item() == b.item() and a.item() != c.item()


def test_logit_laplace_matches_reference():
    torch.manual_seed(0)
    model = DalleVAE(tiny_config())
    x = torch.rand(2, 3, 16, 16)
    mu, log_scale = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16) * 0.3
    y = map_pixels(x)
    # Density of x when logit(x) ~ Laplace(mu, b): Laplace density times |d logit / dx| = 1 / (x (1 - x)).
    reference = -(torch.distributions.Laplace(mu, log_scale.exp()).log_prob(torch.logit(y)) - torch.log(y * (1 - y)))
    assert torch.allclose(model._reconstruction_loss(x, mu, log_scale), reference.mean(), atol=1e-5)


def test_mse_reconstruction_loss():
    torch.manual_seed(0)
    model = DalleVAE(tiny_config(reconstruction_loss="mse"))
    out = model(torch.rand(2, 3, 16, 16))
    assert 0 <= out.reconstruction_loss.item() <= 1 and torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.rand(3, 16, 16), "4D"),
        (torch.rand(2, 1, 16, 16), "3 channels"),
        (torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), "float"),
        (torch.rand(2, 3, 32, 32), "16x16"),
    ],
)
def test_forward_validates_input(vae, pixel_values, message):
    with pytest.raises(ValueError, match=message):
        vae(pixel_values)
    with pytest.raises(ValueError, match=message):
        vae.get_codebook_indices(pixel_values)


def test_bad_temperature_and_codes(vae):
    with pytest.raises(ValueError, match="temperature"):
        vae(torch.rand(1, 3, 16, 16), temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        vae.decode_code(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        vae.decode_code(torch.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="integer"):
        vae.decode_code(torch.zeros(1, 4, 4))


def test_save_load_round_trip(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    loaded = DalleVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.to_diff_dict() == vae.config.to_diff_dict()
    original, restored = vae.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(vae.get_codebook_indices(x), loaded.get_codebook_indices(x))
    torch.manual_seed(0)
    a = vae(x).loss
    torch.manual_seed(0)
    assert loaded(x).loss.item() == a.item()


def test_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel

    vae = DalleVAE(tiny_config())
    vae.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DalleVAEConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DalleVAE)


def _documented_defaults(docstring: str) -> dict:
    return dict(re.findall(r"^\s*(\w+) \(`[^`]*`, \*optional\*, defaults to `?([^`:\n]+?)`?\):", docstring, re.M))


@pytest.mark.parametrize("function", [DalleVAE.forward, DalleVAEConfig])
def test_documented_defaults_match_signature(function):
    documented = _documented_defaults(function.__doc__)
    assert documented
    parameters = inspect.signature(function).parameters
    for name, text in documented.items():
        default = parameters[name].default
        assert str(default) == text.strip('"') or repr(default) == text, (name, default, text)
