import json
import os

import pytest
import torch

from dalle_hf import training_utils
from dalle_hf.modeling_dvae import DalleVAE
from dalle_hf.train_dvae import main, parse_args
from tests.conftest import write_folder

TINY = [
    "--dataset", "shapes", "--image_size", "16", "--num_groups", "3", "--n_hid", "8", "--n_blk_per_group", "1",
    "--vocab_size", "32", "--train_batch_size", "4", "--logging_steps", "2", "--checkpointing_steps", "2",
    "--eval_n_per_task", "0", "--seed", "0",
]


@pytest.mark.latest
def test_train_save_and_resume(tmp_path):
    out = str(tmp_path / "run")
    result = main(parse_args(TINY + ["--output_dir", out, "--max_train_steps", "4", "--checkpoints_total_limit", "1"]))
    assert [h["step"] for h in result["history"]] == [2, 4]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    assert training_utils.list_checkpoints(out) == [os.path.join(out, "checkpoint-2")]  # 4 is the final step
    vae = DalleVAE.from_pretrained(os.path.join(out, "vae"))
    assert vae.config.vocab_size == 32 and vae.config.grid_size == 4
    assert os.path.isfile(os.path.join(out, "vae", "model.safetensors"))
    card = open(os.path.join(out, "vae", "README.md")).read()
    assert "python -m dalle_hf.train_dvae" in card and "Seed: 0" in card and "Optimizer steps: 4" in card

    # Resume: the same command with a longer run picks up checkpoint-2 and continues to 6.
    resumed = main(
        parse_args(TINY + ["--output_dir", out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    )
    assert [h["step"] for h in resumed["history"]] == [4, 6]
    assert resumed["images_seen"] == 2 * 4 + 4 * 4
    state = json.load(open(os.path.join(out, "checkpoint-4", "trainer_state.json")))
    assert state["global_step"] == 4 and state["images_seen"] == 16


def test_resume_restores_weights(tmp_path):
    """Resuming at the checkpoint's own step trains nothing: the saved model is the checkpoint's weights."""
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    main(parse_args(TINY + ["--output_dir", out, "--max_train_steps", "3"]))
    main(parse_args(TINY + ["--output_dir", out, "--max_train_steps", "2", "--resume_from_checkpoint", "checkpoint-2"]))
    checkpoint = load_file(os.path.join(out, "checkpoint-2", "model.safetensors"))
    saved = DalleVAE.from_pretrained(os.path.join(out, "vae")).state_dict()
    assert checkpoint.keys() == saved.keys() and all(torch.equal(checkpoint[k], saved[k]) for k in saved)


def test_parse_args_validation(tmp_path):
    with pytest.raises(ValueError, match="train_data_dir"):
        parse_args(["--output_dir", str(tmp_path), "--dataset", "imagefolder"])
    with pytest.raises(ValueError, match="temperature"):
        parse_args(["--output_dir", str(tmp_path), "--temperature_end", "2"])
    with pytest.raises(ValueError, match="max_train_steps"):
        parse_args(["--output_dir", str(tmp_path), "--max_train_steps", "0"])
    with pytest.raises(ValueError, match="not a checkpoint"):
        training_utils.resolve_resume_checkpoint(str(tmp_path), "checkpoint-7")
    assert training_utils.resolve_resume_checkpoint(str(tmp_path), "latest") is None


def test_imagefolder_training(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    write_folder(data, {f"{i}.png": Image.new("RGB", (20, 20), (50 * i, 0, 0)) for i in range(5)},
                 {f"{i}.png": f"image {i}" for i in range(5)})  # fmt: skip
    args = TINY + ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "3"]
    args[args.index("shapes")] = "imagefolder"
    result = main(parse_args(args + ["--train_data_dir", str(data)]))  # 5 images, batch 4: a new epoch each step
    assert result["images_seen"] == 12


def test_schedules():
    assert training_utils.cosine_anneal(0, 10, 1.0, 1 / 16) == 1.0
    assert training_utils.cosine_anneal(10, 10, 1.0, 1 / 16) == 1 / 16
    assert training_utils.cosine_anneal(5, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert training_utils.cosine_warmup(0, 10, 6.6) == 0.0 and training_utils.cosine_warmup(20, 10, 6.6) == 6.6
    lr = training_utils.warmup_cosine_lr_lambda(2, 10, 0.01)
    assert [lr(0), lr(1), lr(2)] == [0.5, 1.0, 1.0] and lr(10) == 0.01


@pytest.mark.parametrize("decoder_n_hid", [None, 12])
def test_decoder_only_finetuning_keeps_the_codes(tmp_path, decoder_n_hid):
    first = str(tmp_path / "first")
    main(parse_args(TINY + ["--output_dir", first, "--max_train_steps", "2"]))
    out = str(tmp_path / "decoder")
    flags = ["--pretrained_model_name_or_path", first, "--train_decoder_only", "--max_train_steps", "3"]
    if decoder_n_hid is not None:
        flags += ["--decoder_n_hid", str(decoder_n_hid)]
    result = main(parse_args(TINY + ["--output_dir", out, *flags]))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    before = DalleVAE.from_pretrained(os.path.join(first, "vae"))
    after = DalleVAE.from_pretrained(os.path.join(out, "vae"))
    assert after.config.decoder_n_hid == decoder_n_hid and after.config.n_hid == 8
    for key, value in before.encoder.state_dict().items():  # the encoder, so the codes, did not move
        assert torch.equal(after.encoder.state_dict()[key], value), key
    changed = [k for k, v in before.decoder.state_dict().items() if not torch.equal(after.decoder.state_dict()[k], v)]
    if decoder_n_hid is None:
        assert changed  # the decoder trained
    else:
        widths = {tuple(v.shape) for k, v in after.decoder.state_dict().items() if k.endswith("conv_1.w")}
        assert any(shape[0] == 12 for shape in widths)  # group widths 48, 24, 12 (n_hid x 4, 2, 1)
    pixels = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(before.get_codebook_indices(pixels), after.get_codebook_indices(pixels), rtol=0, atol=0)
    card = open(os.path.join(out, "vae", "README.md")).read()
    assert "train_decoder_only" in card and first in card


def test_decoder_only_needs_a_pretrained_dvae():
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        parse_args(TINY + ["--output_dir", "x", "--train_decoder_only"])
    with pytest.raises(ValueError, match="decoder_n_hid"):
        parse_args(TINY + ["--output_dir", "x", "--decoder_n_hid", "0"])
