"""The DALL·E mini / Mega precision and CPU benchmarks run at tiny shapes (their numbers are quoted in
docs/performance.md, never asserted): the report has every part, fp32 agrees with itself across the teacher-forced
and cached paths, and bf16 differs from it by a measured, nonzero amount."""

from pathlib import Path

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_bf16_precision_benchmark_at_tiny_shapes(tmp_path):
    bench = load_script(ROOT / "benchmarks" / "bench_dalle_mini_precision.py")
    report = bench.main(["--tiny", "--prompts", "1", "--out", str(tmp_path / "bf16.json")])
    assert (tmp_path / "bf16.json").exists() and len(report["runs"]) == 1
    run = report["runs"][0]
    assert run["teacher_forced"]["fp32_forced_vs_fp32_steps_guided"]["max_abs"] < 1e-4  # fp32: one model, two paths
    assert 0 < run["teacher_forced"]["rows"]["mean_abs"] < run["teacher_forced"]["rows"]["reference_std"]
    steps = run["steps_through_cache"]
    assert 0 < steps["rows"]["max_abs"] and len(steps["guided_by_quarter"]) == 4
    greedy = run["free_running_greedy"]
    assert greedy["of"] == 256 and 0 <= greedy["equal_codes"] <= 256
    assert (greedy["first_difference"] is None) == (greedy["equal_codes"] == 256)


def test_mega_cpu_benchmark_at_tiny_shapes(tmp_path):
    bench = load_script(ROOT / "benchmarks" / "bench_dalle_mega_cpu.py")
    report = bench.main(["--tiny", "--steps", "3", "--folder", str(tmp_path / "models"), "--out",
                         str(tmp_path / "mega.json")])
    build, load = report["build"], report["load"]
    assert build["weight_bytes"] == 2 * build["parameters"]  # bf16, never float32
    assert load["dtypes"] == ["torch.bfloat16"] and load["peak_rss"] > 0 and load["safetensors_bytes"] > 0
    assert len(report["sample"]["step_s"]) == 3 and report["sample"]["extrapolated_image_s"] > 0
    assert report["vqgan_decode"]["image_shape"] == [1, 3, 32, 32]


def test_breakdown_benchmark_at_tiny_shapes(tmp_path):
    bench = load_script(ROOT / "benchmarks" / "bench_dalle_mini_breakdown.py")
    report = bench.main(["--tiny", "--threads", "1", "--out", str(tmp_path / "breakdown.json")])
    assert (tmp_path / "breakdown.json").exists()
    for impl in ("dalle-hf", "min-dalle"):
        parts = report[impl]
        assert parts["text_s"] > 0 and parts["sampling_s"] > 0 and "vqgan_decode_s" not in parts  # no VQGAN if tiny
        assert len(parts["steps"]["median_ms_by_quarter"]) == 4 and parts["steps"]["total_s"] > 0
