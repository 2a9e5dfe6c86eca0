"""OpenAI's released dVAE converts key for key into DalleVAE and matches OpenAI's own classes (package `DALL-E`).

`make install` installs `DALL-E==0.1` with `--no-deps` (its declared torchvision breaks here) plus what it imports.
OpenAI's Encoder/Decoder accept n_hid >= 64 and vocab >= 512: the test uses n_hid 64 and the released 8192 codes.
"""

import os
import sys

import dall_e
import pytest
import torch

from dalle_hf.cli import main as cli_main
from dalle_hf.convert_openai_dvae import convert_openai_dvae, load_openai_state_dict
from dalle_hf.modeling_dalle import DalleForImageGeneration
from dalle_hf.modeling_dvae import DalleVAE
from dalle_hf.pipeline_dalle import DallePipeline
from tests.conftest import tiny_dalle_config

TOLERANCE = 1e-4  # encoder logits and decoder output within 1e-4 of OpenAI's: float32 noise, not a different model


@pytest.fixture(scope="module")
def openai_dvae():
    """OpenAI's Encoder()/Decoder() with random weights, biases too (its init leaves them at zero)."""
    torch.manual_seed(0)
    encoder = dall_e.Encoder(n_hid=64, vocab_size=8192, requires_grad=False).eval()
    decoder = dall_e.Decoder(n_hid=64, n_init=32, vocab_size=8192, requires_grad=False).eval()
    with torch.no_grad():
        for p in [*encoder.parameters(), *decoder.parameters()]:
            if p.ndim == 1:
                p.normal_(std=0.1)
    return encoder, decoder


def test_converts_pickled_modules_and_matches_openai(openai_dvae, tmp_path, capsys, monkeypatch):
    encoder, decoder = openai_dvae
    torch.save(encoder, tmp_path / "encoder.pkl")  # pickled whole modules, as OpenAI released them
    torch.save(decoder, tmp_path / "decoder.pkl")
    monkeypatch.setitem(sys.modules, "dall_e", None)  # the conversion imports and runs none of OpenAI's code
    assert cli_main(["convert-openai-dvae", "--encoder", str(tmp_path / "encoder.pkl"), "--decoder",
                     str(tmp_path / "decoder.pkl"), "--out", str(tmp_path / "vae")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "32x32 grid at 256x256" in printed
    monkeypatch.delitem(sys.modules, "dall_e")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json", "model.safetensors"]
    vae = DalleVAE.from_pretrained(tmp_path / "vae").eval()
    assert (vae.config.vocab_size, vae.config.grid_size, vae.config.n_hid, vae.config.n_init) == (8192, 32, 64, 32)
    assert len(vae.state_dict()) == len(encoder.state_dict()) + len(decoder.state_dict())

    torch.manual_seed(1)
    pixels = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        theirs = encoder(dall_e.map_pixels(pixels))  # (2, 8192, 32, 32)
        ours = vae.encode(pixels)
        encoder_diff = (ours - theirs).abs().max().item()
        ids = theirs.argmax(1)  # (2, 32, 32)
        z = torch.nn.functional.one_hot(ids, 8192).permute(0, 3, 1, 2).float()  # (2, 8192, 32, 32)
        their_stats = decoder(z)  # (2, 6, 256, 256)
        soft = torch.softmax(torch.randn(2, 8192, 32, 32), dim=1)  # a Gumbel-relaxed input, as in training
        decoder_diff = (vae.decoder(soft) - decoder(soft)).abs().max().item()
        their_image = dall_e.unmap_pixels(torch.sigmoid(their_stats[:, :3]))
        image_diff = (vae.decode_code(ids) - their_image).abs().max().item()
    print(f"max abs diff: encoder logits {encoder_diff:.2e}, decoder stats {decoder_diff:.2e}, "
          f"decoded image {image_diff:.2e} (logit scale {theirs.abs().max().item():.2f})")  # fmt: skip
    assert theirs.shape == ours.shape == (2, 8192, 32, 32)
    assert encoder_diff < TOLERANCE and decoder_diff < TOLERANCE and image_diff < TOLERANCE
    assert torch.equal(vae.get_codebook_indices(pixels), ids)


def test_state_dicts_convert_without_unpickling(openai_dvae, tmp_path):
    encoder, decoder = openai_dvae
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    state = load_openai_state_dict(str(tmp_path / "encoder.pt"))
    assert state.keys() == encoder.state_dict().keys()
    vae = convert_openai_dvae(state, decoder.state_dict())
    assert torch.equal(vae.encoder.blocks.group_2.block_1.id_path.w, encoder.blocks.group_2.block_1.id_path.w)

    # A wrong shape or a missing key is refused, not silently skipped.
    bad = dict(decoder.state_dict())
    bad.pop("blocks.group_4.block_2.res_path.conv_4.b")
    with pytest.raises(AssertionError, match="key count"):
        convert_openai_dvae(state, bad)
    with pytest.raises(ValueError, match="do not fit"):
        convert_openai_dvae(state, {**decoder.state_dict(), "blocks.output.conv.w": torch.zeros(4, 64, 1, 1)})


def test_pipeline_generates_256px_with_openai_dvae(openai_dvae, tokenizer):
    encoder, decoder = openai_dvae
    vae = convert_openai_dvae(encoder.state_dict(), decoder.state_dict())
    torch.manual_seed(0)
    transformer = DalleForImageGeneration(tiny_dalle_config(image_vocab_size=8192, image_grid_size=32)).eval()
    pipe = DallePipeline(tokenizer=tokenizer, transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", generator=torch.Generator().manual_seed(0))
    assert transformer.config.image_seq_len == 1024
    assert out.images[0].size == (256, 256) and out.image_tokens.shape == (1, 32, 32)
    assert 0 <= int(out.image_tokens.min()) and int(out.image_tokens.max()) < 8192



class RunsCode:
    """A pickle that would run a command when loaded by a full unpickler."""

    def __reduce__(self):
        return os.system, ("touch ran-code",)


def test_a_pickle_naming_other_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": RunsCode()}, tmp_path / "evil.pkl")
    with pytest.raises(ValueError, match="not OpenAI's dVAE or a state dict"):
        load_openai_state_dict(str(tmp_path / "evil.pkl"))
    assert not (tmp_path / "ran-code").exists()
