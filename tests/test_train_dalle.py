import json
import os

import pytest
import torch

from dalle_hf.configuration_dvae import DalleVAEConfig
from dalle_hf.modeling_dvae import DalleVAE
from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.train_dalle import main, parse_args
from tests.conftest import write_folder


@pytest.fixture
def tiny_vae_dir(tmp_path):
    torch.manual_seed(0)
    vae = DalleVAE(DalleVAEConfig(image_size=64, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32))
    vae.save_pretrained(tmp_path / "vae")
    return str(tmp_path / "vae")


def tiny_args(vae_dir, out, *extra):
    return parse_args([
        "--vae_name_or_path", vae_dir, "--output_dir", str(out), "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
        "--text_seq_len", "8", "--text_vocab_size", "300", "--train_batch_size", "4", "--max_train_steps", "4",
        "--checkpointing_steps", "2", "--validation_steps", "4", "--logging_steps", "1", "--lr_warmup_steps", "1",
        "--learning_rate", "1e-3", *extra,
    ])


def picture_folder(folder, size: tuple[int, int]):
    """An imagefolder of 8 flat-colour pictures of `size`, captioned "a picture number I"."""
    from PIL import Image

    write_folder(folder, {f"{i}.png": Image.new("RGB", size, (30 * i, 100, 200)) for i in range(8)},
                 {f"{i}.png": f"a picture number {i}" for i in range(8)})  # fmt: skip
    return folder


@pytest.mark.latest
def test_train_dalle_end_to_end_and_resume(tiny_vae_dir, tmp_path):
    out = tmp_path / "run"
    result = main(tiny_args(tiny_vae_dir, out))
    assert [h["step"] for h in result["history"]] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    assert os.path.isdir(out / "checkpoint-2") and (out / "samples").is_dir()
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["dalle_hf.modeling_dalle", "DalleForImageGeneration"]
    card = (out / "README.md").read_text()
    assert "python -m dalle_hf.train_dalle" in card and "Seed: 0" in card
    assert "color_attr=1" in card  # the task mix is recorded (uniform by default)
    pipe = DallePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (64, 64)

    # resume: continue the same run to 6 steps from checkpoint-2's successor state
    resumed = main(tiny_args(tiny_vae_dir, out, "--resume_from_checkpoint", "latest", "--max_train_steps", "6"))
    assert [h["step"] for h in resumed["history"]] == [3, 4, 5, 6]  # latest checkpoint was step 2


def test_imagefolder_is_tokenized_once(tiny_vae_dir, tmp_path):
    folder = picture_folder(tmp_path / "images", (80, 64))
    # without --tokenizer_name_or_path, a BPE is trained on the folder's own captions (World.tokenizer_captions)
    main(tiny_args(tiny_vae_dir, tmp_path / "run0", "--dataset", "imagefolder", "--train_data_dir", str(folder)))
    from transformers import AutoTokenizer

    trained = AutoTokenizer.from_pretrained(tmp_path / "run0" / "tokenizer")
    assert trained.tokenize("a picture number 3")[:3] == ["a", "Ġpicture", "Ġnumber"]  # whole words: its captions
    from dalle_hf.tokenization import train_text_tokenizer

    train_text_tokenizer([f"a picture number {i}" for i in range(8)] * 5, 300, 8).save_pretrained(tmp_path / "tok")
    result = main(tiny_args(tiny_vae_dir, tmp_path / "run", "--dataset", "imagefolder", "--train_data_dir", str(folder),
                            "--tokenizer_name_or_path", str(tmp_path / "tok")))
    assert len(result["history"]) == 4


@pytest.mark.parametrize("flags, match", [
    (["--caption_dropout", "1.0"], "caption_dropout"),
    (["--attention_types", "full"], "attention_types"),
    (["--max_train_steps", "0"], "max_train_steps"),
    (["--task_weights", "drawing=2"], "TASK=WEIGHT"),
    (["--task_weights", "colors=-1"], "TASK=WEIGHT"),
    (["--image_augmentations", "-1"], r"--image_augmentations must be at least 0"),
    (["--augment_min_scale", "0"], r"--augment_min_scale must be in \(0, 1\]"),
    (["--augment_min_scale", "1.5"], r"--augment_min_scale must be in \(0, 1\]"),
    (["--task_weights", "colors=inf"], "TASK=WEIGHT"),
    (["--task_weights", "colors"], "TASK=WEIGHT"),
    (["--dataset", "imagefolder", "--train_data_dir", "x", "--task_weights", "colors=2"], "takes none of the options"),
])
def test_bad_flags(tiny_vae_dir, tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(tiny_vae_dir, tmp_path, *flags)


def test_task_weights_reach_the_shapes_stream(tiny_vae_dir, tmp_path):
    from dalle_hf.training_utils import build_train_dataset, world_from_args

    args = tiny_args(tiny_vae_dir, tmp_path, "--task_weights", "color_attr=2,counting=0,colors=0.5")
    assert world_from_args(args).train_task_weights == {
        "single_object": 1.0, "two_object": 1.0, "counting": 0.0, "colors": 0.5, "position": 1.0, "color_attr": 2.0
    }  # fmt: skip
    stream = iter(build_train_dataset(args, image_size=32, seed=0))
    tasks = [next(stream)["task"] for _ in range(300)]
    assert "counting" not in tasks
    assert tasks.count("color_attr") > 2 * tasks.count("colors")  # expected ratio 4:1
    only = tiny_args(tiny_vae_dir, tmp_path, "--task_weights", ",".join(
        f"{t}=0" for t in ("single_object", "two_object", "counting", "colors", "position")))
    stream = iter(build_train_dataset(only, image_size=32, seed=0))
    assert {next(stream)["task"] for _ in range(20)} == {"color_attr"}


def test_start_from_pretrained_transformer(tiny_vae_dir, tmp_path):
    first = tmp_path / "first"
    main(tiny_args(tiny_vae_dir, first))
    tokenizer = str(first / "tokenizer")
    second = main(tiny_args(tiny_vae_dir, tmp_path / "second", "--transformer_name_or_path", str(first),
                            "--tokenizer_name_or_path", tokenizer, "--max_train_steps", "1", "--dropout", "0.2"))
    # --dropout reaches the continued model (the first run saved dropout 0.0 in its config)
    assert json.loads((first / "transformer" / "config.json").read_text())["dropout"] == 0.0
    assert json.loads((tmp_path / "second" / "transformer" / "config.json").read_text())["dropout"] == 0.2
    fresh = main(
        tiny_args(tiny_vae_dir, tmp_path / "fresh", "--tokenizer_name_or_path", tokenizer, "--max_train_steps", "1")
    )
    # the continued run starts from the trained weights: its first loss is below a fresh model's
    assert second["history"][0]["image_loss"] < fresh["history"][0]["image_loss"]
    with pytest.raises(ValueError, match="different config"):
        main(tiny_args(tiny_vae_dir, tmp_path / "bad", "--transformer_name_or_path", str(first), "--n_embd", "64"))
    # a causal-text checkpoint cannot silently become a text-isolated one
    with pytest.raises(ValueError, match="text_self_attention"):
        main(tiny_args(tiny_vae_dir, tmp_path / "bad2", "--transformer_name_or_path", str(first),
                       "--no_text_self_attention"))


def test_no_text_self_attention_flag_is_saved(tiny_vae_dir, tmp_path):
    out = tmp_path / "isolated"
    main(tiny_args(tiny_vae_dir, out, "--no_text_self_attention", "--max_train_steps", "2"))
    assert json.loads((out / "transformer" / "config.json").read_text())["text_self_attention"] is False
    assert DallePipeline.from_pretrained(out).transformer.config.text_self_attention is False


def test_word_dropout_replaces_words_only():
    from dalle_hf.train_dalle import apply_word_dropout

    pad, eos = 0, 1
    ids = torch.tensor([[67, 318, 281, eos, pad, pad]] * 2000)  # "a purple triangle" <eos>, padded
    assert torch.equal(apply_word_dropout(ids, 0.0, pad, (eos,)), ids)
    dropped = apply_word_dropout(ids, 0.3, pad, (eos,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids[0], torch.tensor([67, 318, 281, eos, pad, pad]))  # the input is not modified
    assert (dropped[:, 3] == eos).all() and (dropped[:, 4:] == pad).all()  # end-of-text and padding stay
    words = dropped[:, :3]
    assert ((words == ids[:, :3]) | (words == pad)).all()  # a word is kept or becomes padding, nothing else
    rate = (words == pad).float().mean().item()
    assert 0.27 < rate < 0.33, rate  # each word independently, p = 0.3
    both = ((words[:, 1] == pad) & (words[:, 2] == pad)).float().mean().item()
    assert 0.06 < both < 0.12, both  # independent drops: 0.3 * 0.3
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        apply_word_dropout(ids, 1.0, pad)


def test_word_dropout_flag(tiny_vae_dir, tmp_path, monkeypatch):
    import dalle_hf.train_dalle as train_dalle

    with pytest.raises(ValueError, match="word_dropout"):
        tiny_args(tiny_vae_dir, tmp_path, "--word_dropout", "1.0")
    calls = []

    def spy(input_ids, p, pad_token_id, keep_token_ids=(), generator=None):
        calls.append((p, keep_token_ids))
        return apply(input_ids, p, pad_token_id, keep_token_ids, generator)

    apply = train_dalle.apply_word_dropout
    monkeypatch.setattr(train_dalle, "apply_word_dropout", spy)
    out = tmp_path / "run"
    result = main(tiny_args(tiny_vae_dir, out, "--word_dropout", "0.2", "--max_train_steps", "2"))
    assert len(result["history"]) == 2
    assert len(calls) == 2 and all(p == 0.2 and 1 in keep for p, keep in calls)  # every batch; <eos> (id 1) kept
    calls.clear()
    main(tiny_args(tiny_vae_dir, tmp_path / "off", "--max_train_steps", "1"))
    assert calls == []  # off by default
    assert "| word_dropout | 0.2 |" in (out / "README.md").read_text()  # recorded in the card


def test_image_codes_are_saved_reused_and_checked(tiny_vae_dir, tmp_path):
    import numpy as np
    from PIL import Image

    folder = picture_folder(tmp_path / "images", (64, 64))
    world = ["--dataset", "imagefolder", "--train_data_dir", str(folder), "--max_train_steps", "2"]
    main(tiny_args(tiny_vae_dir, tmp_path / "run0", *world))
    codes = tmp_path / "run0" / "image_codes.safetensors"
    from safetensors.torch import load_file

    saved = load_file(codes)["image_ids"]
    assert saved.shape == (8, 256) and saved.dtype == torch.int16  # 8 images x a 16 x 16 grid of 32 codes

    # a later run reads the file instead of encoding (encode_dataset is not called)
    import dalle_hf.train_dalle as train_dalle

    calls = []
    real_encode = train_dalle.encode_dataset
    train_dalle.encode_dataset = lambda *a, **k: calls.append(1) or real_encode(*a, **k)
    try:
        main(tiny_args(tiny_vae_dir, tmp_path / "run1", *world, "--image_codes", str(codes)))
    finally:
        train_dalle.encode_dataset = real_encode
    assert calls == []
    assert torch.equal(load_file(codes)["image_ids"], saved)  # read, not rewritten

    # another dVAE: refused, and the file is kept as it was
    torch.manual_seed(1)
    other = DalleVAE(DalleVAEConfig(image_size=64, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32))
    other.save_pretrained(tmp_path / "other_vae")
    with pytest.raises(ValueError, match="another dVAE or dataset"):
        main(tiny_args(str(tmp_path / "other_vae"), tmp_path / "run2", *world, "--image_codes", str(codes)))
    # the same dVAE but a changed image: the spot check re-encodes it and refuses
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "3.png")
    with pytest.raises(ValueError, match="not the ones these codes were made from"):
        main(tiny_args(tiny_vae_dir, tmp_path / "run3", *world, "--image_codes", str(codes)))
    assert torch.equal(load_file(codes)["image_ids"], saved)


def noise_folder(folder):
    """An imagefolder of 8 random-noise pictures (70 x 64, so the centre square is cropped first): unlike flat
    colours, a crop of one encodes to other codes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    write_folder(folder, {f"{i}.png": Image.fromarray(rng.integers(0, 256, (64, 70, 3), dtype=np.uint8))
                          for i in range(8)}, {f"{i}.png": f"a picture number {i}" for i in range(8)})  # fmt: skip
    return folder


def test_image_augmentations_encode_crops_once(tiny_vae_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    import dalle_hf.train_dalle as train_dalle
    from dalle_hf.data.imagefolder import ImageFolderCaptions
    from dalle_hf.training_utils import load_frozen_vae

    folder = noise_folder(tmp_path / "images")
    world = ["--dataset", "imagefolder", "--train_data_dir", str(folder), "--max_train_steps", "2"]
    plain, crops = tmp_path / "plain.safetensors", tmp_path / "crops.safetensors"
    # K = 0: the file as it always was, (n, N) and a fingerprint without augmentation settings
    main(tiny_args(tiny_vae_dir, tmp_path / "run0", *world, "--image_codes", str(plain)))
    with safe_open(str(plain), framework="pt") as f:
        assert set(json.loads(f.metadata()["fingerprint"])) == {"vae_sha256", "n_images"}
    assert load_file(plain)["image_ids"].shape == (8, 256)

    # K = 2: (n, 3, N), version 0 the image itself; a run trains on it
    result = main(tiny_args(tiny_vae_dir, tmp_path / "run1", *world, "--image_codes", str(crops),
                            "--image_augmentations", "2", "--augment_min_scale", "0.5"))  # fmt: skip
    assert len(result["history"]) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    codes = load_file(crops)["image_ids"]
    assert codes.shape == (8, 3, 256) and codes.dtype == torch.int16
    assert torch.equal(codes[:, 0], load_file(plain)["image_ids"])
    for version in (1, 2):
        assert (codes[:, version] != codes[:, 0]).any(dim=1).sum() >= 7  # a crop is another image
    assert (codes[:, 1] != codes[:, 2]).any(dim=1).sum() >= 7  # and each crop another crop
    assert "| image_augmentations | 2 |" in (tmp_path / "run1" / "README.md").read_text()

    # deterministic: encoding again gives the same codes
    vae, dataset = load_frozen_vae(tiny_vae_dir), ImageFolderCaptions(str(folder), image_size=64)
    again = train_dalle.encode_dataset(dataset, vae, image_augmentations=2, min_scale=0.5, augment_seed=0)
    assert torch.equal(again.image_ids, codes.long())
    other_seed = train_dalle.encode_dataset(dataset, vae, image_augmentations=2, min_scale=0.5, augment_seed=1)
    assert not torch.equal(other_seed.image_ids, again.image_ids)

    # read back with the same settings; other settings are refused, naming the setting
    reread = train_dalle.load_or_encode_dataset(dataset, vae, str(crops), 2, min_scale=0.5)
    assert torch.equal(reread.image_ids, codes)
    for settings, name in [(dict(image_augmentations=3, min_scale=0.5), "image_augmentations"),
                           (dict(image_augmentations=2, min_scale=0.85), "augment_min_scale"),
                           (dict(image_augmentations=2, min_scale=0.5, augment_seed=1), "augment_seed"),
                           (dict(image_augmentations=0), "image_augmentations")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"other augmentation settings.*{name}"):
            train_dalle.load_or_encode_dataset(dataset, vae, str(crops), **settings)
    with pytest.raises(ValueError, match="other augmentation settings.*image_augmentations"):
        train_dalle.load_or_encode_dataset(dataset, vae, str(plain), 2, min_scale=0.5)  # an older file
    assert train_dalle.saved_augmentation(str(crops)) == {"image_augmentations": 2, "min_scale": 0.5,
                                                          "augment_seed": 0}  # fmt: skip
    assert train_dalle.saved_augmentation(str(plain)) == {"image_augmentations": 0}

    # the spot check re-encodes crops too: a file whose crops were made otherwise is refused
    from safetensors.torch import save_file

    with safe_open(str(crops), framework="pt") as f:
        metadata = f.metadata()
    tampered = codes.clone()
    tampered[:, 1:] = tampered[:, 0:1]  # the crops replaced by the image itself
    save_file({"image_ids": tampered}, str(tmp_path / "tampered.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="not the ones these codes were made from"):
        train_dalle.load_or_encode_dataset(dataset, vae, str(tmp_path / "tampered.safetensors"), 2, min_scale=0.5)

    # a stream has nothing to encode once
    with pytest.raises(ValueError, match="finite dataset"):
        main(tiny_args(tiny_vae_dir, tmp_path / "run2", "--image_augmentations", "1"))


def test_each_use_draws_one_version_uniformly():
    from collections import Counter

    from dalle_hf.train_dalle import EncodedImages

    class Captions:
        def text(self, index):
            return "a caption"

    image_ids = torch.arange(3, dtype=torch.int16).view(1, 3, 1).expand(1, 3, 4)  # (1 image, 3 versions, 4 codes)
    encoded = EncodedImages(Captions(), image_ids, seed=0)
    drawn = [encoded[0]["image_ids"] for _ in range(3000)]
    assert all(d.dtype == torch.int64 and d.shape == (4,) for d in drawn)
    counts = Counter(int(d[0]) for d in drawn)
    assert set(counts) == {0, 1, 2} and all(900 < c < 1100 for c in counts.values()), counts
    again = EncodedImages(Captions(), image_ids, seed=0)
    assert [int(again[0]["image_ids"][0]) for _ in range(50)] == [int(d[0]) for d in drawn[:50]]  # seeded
    # one version per image (no augmentation) is used as it is
    assert torch.equal(EncodedImages(Captions(), image_ids[:, 2])[0]["image_ids"], torch.full((4,), 2))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_held_out_loss_is_measured_at_validation_steps_and_at_the_end(tiny_vae_dir, tmp_path):
    out = tmp_path / "run"
    result = main(tiny_args(tiny_vae_dir, out, "--validation_steps", "2", "--held_out_images", "6"))
    records = read_jsonl(out / "held_out_loss.jsonl")
    assert [r["step"] for r in records] == [2, 4]  # step 2, then the end (step 4 once, not twice)
    assert [r["captions_seen"] for r in records] == [8, 16]  # 4 captions an update
    for record in records:
        assert set(record) == {"step", "captions_seen", "held_out_image_loss", "train_image_loss", "held_out_images",
                               "train_images"}  # fmt: skip
        assert record["held_out_images"] == record["train_images"] == 6
        for key in ("held_out_image_loss", "train_image_loss"):
            assert 0 < record[key] < 10 and torch.isfinite(torch.tensor(record[key]))  # ln(32) = 3.47 at random
    assert records[0]["held_out_image_loss"] != records[1]["held_out_image_loss"]  # measured again, after training
    assert result["held_out_loss"] == records
    assert result["eval"]["held-out image loss (eval mode)"] == records[-1]["held_out_image_loss"]
    assert result["eval"]["training image loss (eval mode)"] == records[-1]["train_image_loss"]
    card = (out / "README.md").read_text()
    assert "| held-out image loss (eval mode) |" in card and "| held_out_images | 6 |" in card

    # the default on a world with held-out images is 256; 0 turns it off
    assert tiny_args(tiny_vae_dir, out).held_out_images == 256
    off = main(tiny_args(tiny_vae_dir, tmp_path / "off", "--validation_steps", "2", "--held_out_images", "0"))
    assert off["held_out_loss"] == [] and not (tmp_path / "off" / "held_out_loss.jsonl").exists()
    assert "held-out image loss (eval mode)" not in off["eval"]
    # measuring leaves training as it was (no random numbers drawn, the model back in train mode)
    assert [h["loss"] for h in off["history"]] == [h["loss"] for h in result["history"]]


def test_held_out_loss_is_the_pipelines_score_in_eval_mode(tokenizer):
    """The measurement equals `DallePipeline.score`'s nats per image token, whatever mode the model is left in, and
    gives the same number twice on the same weights with dropout on (no dropout in the measurement)."""
    from dalle_hf.modeling_dalle import DalleForImageGeneration
    from dalle_hf.train_dalle import HeldOutLoss
    from tests.conftest import tiny_dalle_config, tiny_vae

    torch.manual_seed(0)
    model = DalleForImageGeneration(tiny_dalle_config(dropout=0.5)).train()
    config = model.config
    captions = ["a red circle", "two blue squares", "a green triangle", "", "a circle", "three circles", "a square"]
    input_ids = tokenizer(captions, padding="max_length", truncation=True, max_length=config.text_seq_len,
                          return_tensors="pt")["input_ids"]  # fmt: skip
    image_ids = torch.randint(0, config.image_vocab_size, (len(captions), config.image_grid_size**2))
    measure = HeldOutLoss((input_ids, image_ids), (input_ids[:3], image_ids[:3]), batch_size=3)  # batches 3, 3, 1
    first, second = measure(model), measure(model)
    assert first == second  # dropout would make these differ (checked below)
    assert model.training  # its mode is restored
    with torch.no_grad():  # the control: in train mode the same forward differs from call to call
        noisy = [model(input_ids=input_ids, image_ids=image_ids, return_loss=True).image_loss.item() for _ in range(2)]
    assert noisy[0] != noisy[1]

    model.eval()
    assert measure(model) == first and not model.training
    vae = tiny_vae()
    assert vae.config.grid_size == config.image_grid_size and vae.config.vocab_size == config.image_vocab_size
    pipe = DallePipeline(tokenizer=tokenizer, transformer=model, vae=vae)
    grid = config.image_grid_size
    scores = pipe.score(image_tokens=image_ids.view(-1, grid, grid), captions=captions)  # (n, N) -> (n, g, g)
    reference = float(-scores.log_likelihood.mean() / grid**2)
    assert abs(first["held_out_image_loss"] - reference) < 1e-4
    with pytest.raises(ValueError, match="as many captions as images"):
        HeldOutLoss((input_ids[:2], image_ids), (input_ids, image_ids))


def test_held_out_loss_on_emoji_measures_the_worlds_held_out_renders(tiny_vae_dir, tmp_path):
    from safetensors.torch import load_file

    from dalle_hf.data.emoji import style_prompt
    from dalle_hf.data.world import load_world
    from dalle_hf.train_dalle import EncodedImages, held_out_draw, training_draw
    from dalle_hf.training_utils import load_frozen_vae
    from tests.test_worlds import write_tiny_cache

    cache = write_tiny_cache(tmp_path / "emoji-cache")
    out = tmp_path / "run"
    result = main(tiny_args(tiny_vae_dir, out, "--dataset", "emoji", "--train_data_dir", cache,
                            "--held_out_images", "8", "--image_augmentations", "1"))  # fmt: skip
    world = load_world("emoji", cache)
    held = world.held_out_examples(8, seed=0)
    assert len(held) == 3  # the tiny cache holds out 3 (concept, style) pairs
    records = read_jsonl(out / "held_out_loss.jsonl")
    assert [r["step"] for r in records] == [4] and records[0]["held_out_images"] == records[0]["train_images"] == 3
    assert result["held_out_loss"] == records

    # what is measured: the world's held-out renders, none of them a training pair; training renders with their
    # styled captions (the held-out captions' form), version 0 (the image itself) of the augmented codes
    vae = load_frozen_vae(tiny_vae_dir)
    captions, codes = held_out_draw(world, 8, vae)
    assert captions == [caption for _, _, caption in held] and codes.shape == (3, 256)
    training = world.train_dataset(64, seed=0)
    train_pairs = {style_prompt(training.renders[i]["label"], training.renders[i]["style"])
                   for i in range(len(training))}  # fmt: skip
    assert not set(captions) & train_pairs
    stored = load_file(out / "image_codes.safetensors")["image_ids"]  # (27, 2, 256): each image and one crop
    train_captions, train_codes = training_draw(world, 3, vae, EncodedImages(training, stored), seed=0)
    assert set(train_captions) <= train_pairs and len(train_captions) == 3
    for caption, image_ids in zip(train_captions, train_codes):  # some training image has both (flat images of a
        # random dVAE may share codes, so the image itself is not identified)
        assert any(torch.equal(stored[i, 0].long(), image_ids) and caption == style_prompt(
            training.renders[i]["label"], training.renders[i]["style"]) for i in range(len(stored)))  # fmt: skip


def test_imagefolder_has_no_held_out_images(tiny_vae_dir, tmp_path, caplog):
    folder = picture_folder(tmp_path / "images", (64, 64))
    world = ["--dataset", "imagefolder", "--train_data_dir", str(folder)]
    with pytest.raises(ValueError, match="--held_out_images needs a world with held-out images"):
        tiny_args(tiny_vae_dir, tmp_path / "run", *world, "--held_out_images", "4")
    args = tiny_args(tiny_vae_dir, tmp_path / "run", *world, "--max_train_steps", "2")
    assert args.held_out_images == 0  # the default where a world has none
    with caplog.at_level("INFO", logger="dalle_hf.train_dalle"):
        result = main(args)
    assert result["held_out_loss"] == [] and not (tmp_path / "run" / "held_out_loss.jsonl").exists()
    said = [r.message for r in caplog.records if "no held-out images" in r.message]
    assert said == ["The imagefolder world has no held-out images: no held-out loss is measured."]
