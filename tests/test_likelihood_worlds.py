"""The likelihood benchmarks (benchmarks/compression.py) and `dalle-hf eval classify` on another world than shapes:
a tiny emoji cache (tests/test_worlds.py) and a tiny random pipeline whose dVAE reads 64 px renders."""

import json

import numpy as np
import pytest
import torch

from dalle_hf.configuration_dvae import DalleVAEConfig
from dalle_hf.data.emoji import read_emoji_cache, style_prompt
from dalle_hf.data.shapes import EVAL_TASKS
from dalle_hf.data.world import load_world
from dalle_hf.modeling_dalle import DalleForImageGeneration
from dalle_hf.modeling_dvae import DalleVAE
from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.tokenization import train_text_tokenizer
from tests.conftest import load_script, tiny_dalle_config
from tests.test_worlds import TINY_STYLES, write_tiny_cache

TEXT_SEQ_LEN = 16  # every tiny caption fits untruncated (at most 14 tokens)


@pytest.fixture(scope="module")
def emoji_cache(tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("emoji-cache"))


@pytest.fixture(scope="module")
def emoji_pipeline(emoji_cache, tmp_path_factory):
    """A random pipeline for the emoji world saved to disk: a 64 px dVAE (8x8 codes of 32), tokenizer and CLIP
    trained/built on the world's captions."""
    from dalle_hf.clip import make_clip_config, make_clip_processor
    from transformers import CLIPModel

    world = load_world("emoji", emoji_cache)
    tokenizer = train_text_tokenizer(list(world.tokenizer_captions()), vocab_size=300, text_seq_len=TEXT_SEQ_LEN)
    torch.manual_seed(0)
    vae = DalleVAE(DalleVAEConfig(image_size=64, num_groups=4, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32))
    transformer = DalleForImageGeneration(tiny_dalle_config(text_seq_len=TEXT_SEQ_LEN, image_grid_size=8))
    clip_config = make_clip_config(
        len(tokenizer), text_seq_len=TEXT_SEQ_LEN, image_size=16, patch_size=4, vision_width=32, vision_layers=2,
        text_width=32, text_layers=2, projection_dim=32, head_dim=16,
    )  # fmt: skip
    pipe = DallePipeline(tokenizer=tokenizer, transformer=transformer.eval(), vae=vae.eval(),
                         clip_model=CLIPModel(clip_config).eval(), clip_processor=make_clip_processor(tokenizer, 16))
    path = tmp_path_factory.mktemp("pipe") / "dalle-emoji-tiny"
    pipe.save_pretrained(path)
    return str(path)


def held_out_renders(cache_dir: str) -> dict[str, tuple[np.ndarray, str]]:
    """caption -> (image, style) of every render of a held-out pair in the cache."""
    cache = read_emoji_cache(cache_dir)
    return {style_prompt(str(cache.labels[i]), str(cache.styles[i])): (cache.images[i], str(cache.styles[i]))
            for i in np.flatnonzero(cache.held_out)}  # fmt: skip


def test_emoji_held_out_examples_are_the_novel_renders(emoji_cache):
    world = load_world("emoji", emoji_cache)
    renders = held_out_renders(emoji_cache)
    examples = world.held_out_examples(2, seed=0)
    assert len(examples) == 2 and len({caption for _, _, caption in examples}) == 2
    for style, image, caption in examples:
        expected, expected_style = renders[caption]
        assert style == expected_style and np.array_equal(np.asarray(image), expected)
    assert [c for _, _, c in world.held_out_examples(2, seed=0)] == [c for _, _, c in examples]  # a fixed draw
    assert {c for _, _, c in world.held_out_examples(10, seed=1)} == set(renders)  # at most every held-out render
    draws = {tuple(c for _, _, c in world.held_out_examples(2, seed=s)) for s in range(6)}
    assert len(draws) > 1  # the seed changes the draw


def test_shapes_held_out_examples_cycle_over_the_eval_tasks():
    examples = load_world("shapes").held_out_examples(9, seed=0)
    assert [task for task, _, _ in examples] == [*EVAL_TASKS, *EVAL_TASKS[:2]]
    assert all(image.size == (64, 64) and caption for _, image, caption in examples)
    again = load_world("shapes").held_out_examples(9, seed=0)
    assert [np.asarray(a[1]).tobytes() for a in again] == [np.asarray(e[1]).tobytes() for e in examples]


def run_benchmark(monkeypatch, capsys, tmp_path, *argv) -> dict:
    benchmark = load_script("benchmarks/compression.py")
    out = tmp_path / f"{argv[0]}.json"
    monkeypatch.setattr("sys.argv", ["compression.py", *argv, "--json", str(out)])
    benchmark.main()
    capsys.readouterr()
    return json.loads(out.read_text())


def test_compression_benchmark_on_emoji(emoji_pipeline, emoji_cache, monkeypatch, capsys, tmp_path):
    result = run_benchmark(monkeypatch, capsys, tmp_path, "compression", "--pipeline", emoji_pipeline,
                           "--dataset", "emoji", "--data-dir", emoji_cache, "--n-images", "3",
                           "--probe-images", "1")  # fmt: skip
    summary, records = result["summary"], result["records"]
    renders = held_out_renders(emoji_cache)
    assert len(renders) == 3 and summary["n_images"] == 3
    assert {r["caption"] for r in records} == set(renders)  # every held-out render once, none of the training ones
    assert all(r["task"] == renders[r["caption"]][1] for r in records)  # grouped by style
    assert set(summary["per_task"]) == {r["task"] for r in records} <= set(TINY_STYLES)
    assert summary["image_tokens"] == 64 and summary["codebook"] == 32 and summary["uniform_bits_per_token"] == 5
    for key in ("exact_round_trips_1_thread", "exact_round_trips_2_threads", "flipped_bit_refused",
                "other_model_refused"):  # fmt: skip
        assert summary[key] == 3, key
    for r in records:
        assert r["exact_1_thread"] and r["exact_2_threads"]
        assert r["png_bytes"] > 0 and r["webp_lossless_bytes"] > 0 and r["cross_entropy_bits"] > 0
        if not r["raw_fallback"]:  # an arithmetic code is within a few bits of the model's cross-entropy
            assert r["payload_bits"] <= r["cross_entropy_bits"] + 64
    assert result["config"]["dataset"] == "emoji" and set(result["determinism_probe"]) == {"float32 head",
                                                                                          "float64 head"}


def test_compression_resummarize_fits_rate_and_per_file_cost(monkeypatch, capsys, tmp_path):
    # Synthetic records whose payload is exactly 1.01 x cross-entropy + 3 bits: the fit recovers both.
    ce = [50.0, 120.0, 300.0, 815.0]
    records = [{"task": "t", "caption": "c", "cross_entropy_bits": c, "unconditional_bits": c + 1,
                "payload_bits": 1.01 * c + 3, "raw_fallback": False, "header_bytes": 40, "file_bytes": 100,
                "png_bytes": 1, "webp_lossless_bytes": 1, "compress_s": 0.1, "decompress_s_1_thread": 0.1,
                "decompress_s_2_threads": 0.1, "exact_1_thread": True, "exact_2_threads": True,
                "flipped_bit_refused": True, "other_model_refused": True} for c in ce]  # fmt: skip
    saved = tmp_path / "compression.json"
    saved.write_text(json.dumps({"summary": {"image_tokens": 256, "uniform_bits_per_token": 9, "codebook": 512},
                                 "records": records}))  # fmt: skip
    benchmark = load_script("benchmarks/compression.py")
    monkeypatch.setattr("sys.argv", ["compression.py", "resummarize", "--json", str(saved)])
    benchmark.main()
    capsys.readouterr()
    summary = json.loads(saved.read_text())["summary"]
    assert summary["payload_vs_cross_entropy_fit"]["slope"] == pytest.approx(1.01)
    assert summary["payload_vs_cross_entropy_fit"]["intercept_bits"] == pytest.approx(3)
    byte_rounded = sum(8 * -(-c // 8) for c in ce)  # 56 + 120 + 304 + 816
    payload = sum(1.01 * c + 3 for c in ce)
    assert summary["payload_over_byte_rounded_cross_entropy"] == pytest.approx(payload / byte_rounded)
    assert summary["n_images"] == 4 and summary["codebook"] == 512 and summary["exact_round_trips_1_thread"] == 4


def test_classify_benchmark_and_cli_on_emoji(emoji_pipeline, emoji_cache, monkeypatch, capsys, tmp_path):
    from dalle_hf.cli import main

    report = run_benchmark(monkeypatch, capsys, tmp_path, "classify", "--pipeline", emoji_pipeline,
                           "--dataset", "emoji", "--data-dir", emoji_cache, "--n-images", "4", "--n-captions", "3",
                           "--batch-size", "5")  # fmt: skip
    assert report["n_images"] == 4 and report["n_captions"] == 3 and report["chance"] == 1 / 3
    assert set(report["per_task"]) <= set(TINY_STYLES)  # grouped by style
    assert 0 <= report["likelihood_top1"] <= 1 and 0 <= report["clip_top1"] <= 1

    argv = ["eval", "classify", "--pipeline", emoji_pipeline, "--dataset", "emoji", "--data-dir", emoji_cache,
            "--n-images", "4", "--n-captions", "3", "--batch-size", "5"]  # fmt: skip
    assert main(argv) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["world"] == "emoji"
    # The same world, ranking set and scorer: the benchmark and the CLI agree image for image.
    for key in ("likelihood_top1", "clip_top1", "per_task", "n_images", "n_captions"):
        assert cli[key] == report[key], key


def test_a_world_without_held_out_examples_says_so(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a white square"}) + "\n")
    world = load_world("imagefolder", str(tmp_path))
    with pytest.raises(NotImplementedError, match="the imagefolder world has no held-out examples"):
        world.held_out_examples(1)


def test_storage_dtype_benchmark_rounds_only_what_a_bf16_checkpoint_stores(emoji_pipeline, emoji_cache, capsys,
                                                                           tmp_path):
    benchmark = load_script("benchmarks/storage_dtype.py")
    pipe = DallePipeline.from_pretrained(emoji_pipeline)
    name, weight = max(pipe.transformer.named_parameters(), key=lambda item: item[1].numel())  # a random matrix
    rounded = benchmark.as_mode(pipe, "bf16 weights")
    bf16 = benchmark.as_mode(pipe, "bf16 compute")
    assert weight.dtype == torch.float32  # the source pipeline is untouched
    assert rounded.transformer.dtype == torch.float32 and rounded.clip_model.dtype == torch.float32
    assert bf16.transformer.dtype == torch.bfloat16 and bf16.clip_model.dtype == torch.bfloat16
    assert rounded.vae.dtype == bf16.vae.dtype == torch.float32  # the dVAE is stored float32 either way
    rounded_weight = dict(rounded.transformer.named_parameters())[name]
    assert torch.equal(rounded_weight, weight.to(torch.bfloat16).float()) and not torch.equal(rounded_weight, weight)
    with pytest.raises(ValueError, match="mode among"):
        benchmark.as_mode(pipe, "float16")

    out = tmp_path / "storage.json"
    report = benchmark.main(["--pipeline", emoji_pipeline, "--dataset", "emoji", "--data-dir", emoji_cache,
                             "--n-images", "3", "--n-captions", "4", "--json", str(out)])  # fmt: skip
    capsys.readouterr()
    assert json.loads(out.read_text()) == report and report["n_images"] == 3
    assert set(report["results"]) == set(benchmark.MODES)
    for result in report["results"].values():
        assert 0 < result["bits_per_image_token"] < 10 and 0 <= result["clip_top1"] <= 1
    # rounding changes the numbers a little, not a lot (a random model: about 5 bits per token of 32 codes)
    assert all(abs(change) < 0.1 for change in report["bits_per_image_token_change"].values())
