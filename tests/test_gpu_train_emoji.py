"""benchmarks/gpu_train_emoji.py on the CPU with a tiny model and the tiny emoji cache: the run the GPU machine makes,
two updates long."""

import json
import os
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle_hf.configuration_dvae import DalleVAEConfig
from dalle_hf.data.world import load_world
from dalle_hf.modeling_dvae import DalleVAE
from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.tokenization import train_text_tokenizer
from tests.conftest import load_script
from tests.test_worlds import write_tiny_cache

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_train_emoji.py")


@pytest.fixture(scope="module")
def gpu_train():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny emoji cache, a 32 px dVAE with an 8 x 8 grid of 32 codes, and a tokenizer of the world's captions."""
    root = tmp_path_factory.mktemp("gpu-train")
    cache = write_tiny_cache(root / "emoji-cache")
    torch.manual_seed(0)
    DalleVAE(DalleVAEConfig(image_size=32, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32)) \
        .save_pretrained(root / "vae")  # fmt: skip
    captions = list(load_world("emoji", cache).tokenizer_captions(seed=0))
    train_text_tokenizer(captions, vocab_size=300, text_seq_len=12).save_pretrained(root / "tokenizer")
    return {"root": root, "cache": cache, "vae": str(root / "vae"), "tokenizer": str(root / "tokenizer")}


def tiny_args(gpu_train, parts, out, *extra):
    return gpu_train.parse_args([
        "--codes", str(parts["root"] / "codes.safetensors"), "--cache", parts["cache"], "--vae", parts["vae"],
        "--tokenizer", parts["tokenizer"], "--out", str(out), "--device", "cpu", "--max_steps", "2",
        "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--text_seq_len", "12", "--batch_size", "4",
        "--warmup_steps", "1", "--log_every", "1", *extra,
    ])  # fmt: skip


def test_two_steps_on_the_cpu_save_a_pipeline_that_draws(gpu_train, parts, tmp_path):
    log = gpu_train.main(tiny_args(gpu_train, parts, tmp_path / "out"))
    assert log["steps"] == 2 and log["captions_seen"] == 8 and log["device"] == "cpu"
    assert [h["step"] for h in log["history"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor([h["loss"], h["image_loss"], h["text_loss"]])).all() for h in log["history"])
    assert json.load(open(tmp_path / "out" / "train_log.json"))["steps"] == 2

    # the codes were encoded once and stored as int16 (32 codes), one row of 8 x 8 per training image
    codes = load_file(parts["root"] / "codes.safetensors")["image_ids"]
    n_train = len(load_world("emoji", parts["cache"]).train_dataset(32, 0))
    assert codes.dtype == torch.int16 and codes.shape == (n_train, 64)

    pipe = DallePipeline.from_pretrained(str(tmp_path / "out"))
    assert pipe.transformer.config.n_layer == 1 and pipe.transformer.config.image_grid_size == 8
    assert pipe.transformer.dtype == torch.float32 and pipe.config.default_guidance_scale == 3.0
    pipe.set_progress_bar_config(disable=True)
    image = pipe("red apple in noto style", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    # the weights moved from the seeded initialisation: two updates were applied, not just saved
    fresh = gpu_train.main(tiny_args(gpu_train, parts, tmp_path / "fresh", "--max_steps", "1",
                                     "--learning_rate", "1e-9"))  # fmt: skip
    assert fresh["steps"] == 1
    trained = pipe.transformer.state_dict()["lm_head.weight"]
    untrained = DallePipeline.from_pretrained(str(tmp_path / "fresh")).transformer.state_dict()["lm_head.weight"]
    assert not torch.allclose(trained, untrained)


def test_old_int32_code_files_are_read(gpu_train, parts, tmp_path):
    gpu_train.main(tiny_args(gpu_train, parts, tmp_path / "first", "--max_steps", "1"))
    path = parts["root"] / "codes.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    old = tmp_path / "codes_int32.safetensors"
    save_file({"image_ids": load_file(path)["image_ids"].to(torch.int32)}, str(old), metadata=metadata)
    args = tiny_args(gpu_train, parts, tmp_path / "second", "--max_steps", "1")
    args.codes = str(old)
    assert gpu_train.main(args)["steps"] == 1
    assert load_file(old)["image_ids"].dtype == torch.int32  # read, not rewritten


def test_augmented_code_files_are_read_with_their_settings(gpu_train, parts, tmp_path):
    from dalle_hf.train_dalle import load_or_encode_dataset
    from dalle_hf.training_utils import load_frozen_vae

    path = tmp_path / "codes_k2.safetensors"
    dataset = load_world("emoji", parts["cache"]).train_dataset(32, 0)
    load_or_encode_dataset(dataset, load_frozen_vae(parts["vae"]), str(path), 2, min_scale=0.7)  # train_dalle's file
    args = tiny_args(gpu_train, parts, tmp_path / "out", "--max_steps", "2")
    args.codes = str(path)
    log = gpu_train.main(args)
    assert log["steps"] == 2 and log["image_versions"] == 3
    assert load_file(path)["image_ids"].shape == (len(dataset), 3, 64)  # read, not rewritten


def test_caption_table_is_the_training_caption_mix(gpu_train, parts):
    from transformers import AutoTokenizer

    dataset = load_world("emoji", parts["cache"]).train_dataset(32, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(parts["tokenizer"])
    tokens, choices, probs = gpu_train.caption_table(dataset, tokenizer, 12)
    assert tokens.shape[1] == 12 and choices.shape == probs.shape and len(choices) == len(dataset)
    assert torch.allclose(probs.sum(1), torch.ones(len(dataset)))
    # image 0's table rows are exactly the captions `text(0)` draws, at the frequencies it draws them
    drawn = Counter(dataset.text(0) for _ in range(4000))
    table = {tokenizer.decode(tokens[c], skip_special_tokens=True): float(p)
             for c, p in zip(choices[0].tolist(), probs[0]) if p > 0}  # fmt: skip
    assert set(table) == set(drawn)
    for caption, p in table.items():
        assert abs(drawn[caption] / 4000 - p) < 0.03, caption


def test_learning_rate_schedule(gpu_train):
    assert gpu_train.lr_factor(0, 0.0, warmup_steps=4) == 0.25
    assert gpu_train.lr_factor(4, 0.0, warmup_steps=4) == 1.0
    assert gpu_train.lr_factor(10, 1.0, warmup_steps=4) == pytest.approx(0.1)
    assert gpu_train.lr_factor(10, 0.5, warmup_steps=4) == pytest.approx(0.55)


@pytest.mark.parametrize("flags, match", [
    (["--max_steps", "0"], "max_steps"),
    (["--n_embd", "33"], "multiple of --n_head"),
    (["--caption_dropout", "1"], "caption_dropout"),
])  # fmt: skip
def test_bad_flags_name_what_was_expected(gpu_train, parts, tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(gpu_train, parts, tmp_path, *flags)
