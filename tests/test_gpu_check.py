"""benchmarks/gpu_check.py keeps working on the CPU (`--device cpu --small`), and the memory it computes from the
configs alone equals the bytes of the real tensors, so the "What fits where" tables in docs/performance.md hold: for
the DALL-E pipelines and for DALL·E mini and Mega (tiny shapes here, random weights made by the script)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dalle_hf.quantization import PRECISIONS, precision_kwargs

from .conftest import load_script, save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(ROOT / "benchmarks" / "gpu_check.py")


@pytest.fixture(scope="module")
def report(gpu_check, tmp_path_factory, tokenizer):
    """One small CPU run over a tiny pipeline with CLIP: every precision this machine has, batches 1 and 2; and
    tiny mini- and Mega-shaped models for one image and a 3 x 3 grid."""
    folder = tmp_path_factory.mktemp("gpu_check")
    path = save_tiny_pipeline(folder / "shipped", tokenizer, with_clip=True)
    out = folder / "gpu.json"
    rc = gpu_check.main(["--device", "cpu", "--small", "--pipeline", str(path), "--skip-tests", "--out", str(out),
                         "--folder", str(folder / "random")])
    return rc, json.loads(out.read_text())


def test_small_cpu_run_measures_every_cell(report):
    rc, data = report
    assert rc == 0 and not [r for r in data["results"] if "error" in r]
    precisions = [p for p in PRECISIONS if not (p.startswith("bnb") and data["environment"]["bitsandbytes"] is None)]
    rows = [r for r in data["results"] if "grid" not in r and "plan" not in r]
    assert {(r["config"], r["precision"], r["batch"]) for r in rows} == {
        (c, p, b) for c in ("shipped", "large") for p in precisions for b in (1, 2)
    }
    grids = [r for r in data["results"] if "grid" in r]
    assert len(grids) == 2 * len(precisions)
    for r in grids:
        assert r["grid"]["candidates"] == 4 and r["grid"]["keep"] == 2 and min(r["grid"]["seconds"]) > 0
    large = [r for r in rows if r["config"] == "large"]
    assert {(r["layers"], r["width"], r["image_tokens"]) for r in large} == {(2, 64, 64)}
    for r in rows:
        assert r["image_tokens_per_s"] > 0 and min(r["step_s"]) > 0 and r["process_peak_rss"] > 0
        assert r["peak_allocated"] is None  # no GPU: the CPU reports tensor bytes and RSS instead


def test_computed_memory_equals_the_tensors(report):
    """Weights and KV cache computed from the configs (on the `meta` device) against the loaded models' state dicts
    and the allocated cache: exact, except nf4's per-layer JSON quant state (~80 bytes a layer, not counted)."""
    _, data = report
    rows = [r for r in data["results"] if "grid" not in r and "plan" not in r]
    for r in rows:
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_computed"], r
        if r["precision"] == "bnb-nf4":
            assert 0 <= r["weight_bytes"] - r["weight_bytes_computed"] < 0.005 * r["weight_bytes"], r
        else:
            assert r["weight_bytes"] == r["weight_bytes_computed"], r
    by = {(r["config"], r["precision"], r["batch"]): r for r in rows}
    fp32, bf16 = by[("shipped", "fp32", 1)], by[("shipped", "bf16", 1)]
    assert bf16["weight_bytes"] == fp32["weight_bytes"] // 2 and 2 * bf16["kv_cache_bytes"] == fp32["kv_cache_bytes"]
    assert by[("shipped", "fp32", 2)]["kv_cache_bytes"] == 2 * fp32["kv_cache_bytes"]


def test_float_dtype_matches_precision_kwargs(gpu_check):
    pytest.importorskip("bitsandbytes")
    for precision in PRECISIONS:
        for device in ("cpu", "cuda"):
            assert gpu_check.float_dtype(precision, device) == precision_kwargs(precision, device)["dtype"]


def test_quantized_linear_bytes(gpu_check):
    assert gpu_check.quantized_linear_bytes(384, 128, "bnb-int8") == 384 * 128 + 4 * 384 + 1
    assert gpu_check.quantized_linear_bytes(384, 128, "bnb-nf4") == 384 * 128 // 2 + 4 * 384 * 128 // 64 + 64


def test_missing_packages_are_named_and_rule_out_precisions(gpu_check, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    env = gpu_check.environment("cpu")
    assert env["bitsandbytes"] is None
    assert any(line.startswith("bitsandbytes: rules out bnb") for line in env["missing"])
    assert gpu_check.precisions_available(list(PRECISIONS), env) == ["fp32", "bf16"]


def test_cuda_subset_runs_and_skips_without_a_gpu(gpu_check):
    if torch.cuda.is_available():
        pytest.skip("with a GPU the subset runs for real (benchmarks/gpu_check.py)")
    result = gpu_check.run_cuda_tests()
    assert result["returncode"] == 0 and "skipped" in result["summary"] and "passed" not in result["summary"]


def test_computed_table_covers_each_config_and_precision(gpu_check):
    """`--computed` (the table in docs/performance.md) from the configs alone: the shipped pipeline, the large
    24 x 1024 and the paper's 64 x 3968 config; bf16 weights are half of fp32, nf4 below int8."""
    pytest.importorskip("bitsandbytes")
    rows = gpu_check.computed_table(str(ROOT / "checkpoints" / "dalle-shapes"), [1, 16])
    assert [(r["config"].split()[0], r["precision"]) for r in rows] == [
        (c, p) for c in ("shipped", "large", "paper") for p in PRECISIONS
    ]
    mb = {(r["config"].split()[0], r["precision"]): float(r["weights MB"].replace(",", "")) for r in rows}
    for config in ("shipped", "large", "paper"):
        assert mb[(config, "bf16")] == pytest.approx(mb[(config, "fp32")] / 2, abs=0.1)
        assert mb[(config, "bnb-nf4")] < mb[(config, "bnb-int8")] < mb[(config, "bf16")]
    assert rows[4]["config"].startswith("large 24x1024, 1024 image tokens")


def test_small_cpu_run_measures_mini_and_mega(report):
    """Every CPU precision (fp16 is skipped: CUDA only) for one image and a 3 x 3 grid, guided (twice the rows); the
    weights and cache bytes equal the memory plan's; the step and the VQGAN decode were timed."""
    _, data = report
    precisions = [p for p in PRECISIONS if not (p.startswith("bnb") and data["environment"]["bitsandbytes"] is None)]
    rows = [r for r in data["results"] if "plan" in r]
    assert {(r["config"], r["precision"], r["images"]) for r in rows} == {
        (c, p, n) for c in ("mini", "mega") for p in precisions for n in (1, 9)
    }
    assert {(s["config"], s["precision"]) for s in data["skipped"] if "CUDA only" in s.get("reason", "")} == {
        ("mini", "fp16"), ("mega", "fp16")
    }
    for r in rows:
        assert r["rows"] == 2 * r["images"] and r["plan"]["rows"] == r["rows"]
        assert (r["layers"], r["width"], r["image_tokens"]) == (2, 128, 16)
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_computed"], r
        if r["precision"] == "bnb-nf4":
            assert 0 <= r["weight_bytes"] - r["weight_bytes_computed"] < 0.02 * r["weight_bytes"], r
        else:
            assert r["weight_bytes"] == r["weight_bytes_computed"], r
        assert r["seconds_per_image"] > 0 and min(r["decode"]["seconds"]) > 0
        assert r["sampling"]["peak_allocated"] is None and r["device_used_bytes"] is None  # no GPU here
    by = {(r["config"], r["precision"], r["images"]): r for r in rows}
    assert by[("mega", "fp32", 9)]["kv_cache_bytes"] == 9 * by[("mega", "fp32", 1)]["kv_cache_bytes"]
    assert 2 * by[("mini", "bf16", 1)]["kv_cache_bytes"] == by[("mini", "fp32", 1)]["kv_cache_bytes"]
