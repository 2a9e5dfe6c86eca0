"""`dalle-hf` end to end on a tiny random pipeline saved to disk."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dalle_hf import cli, loading
from dalle_hf.configuration_dalle import DalleConfig
from dalle_hf.configuration_dvae import DalleVAEConfig
from dalle_hf.data.shapes import all_captions
from dalle_hf.modeling_dalle import DalleForImageGeneration
from dalle_hf.modeling_dvae import DalleVAE
from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.tokenization import train_text_tokenizer


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A random 64x64 pipeline (the shapes world's image size), 8x8 tokens, no CLIP."""
    torch.manual_seed(0)
    tokenizer = train_text_tokenizer(all_captions(2000, seed=0), vocab_size=300, text_seq_len=16)
    vae = DalleVAE(DalleVAEConfig(image_size=64, num_groups=4, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32))
    transformer = DalleForImageGeneration(DalleConfig(
        text_vocab_size=len(tokenizer), text_seq_len=16, image_vocab_size=32, image_grid_size=8, n_layer=2, n_head=2,
        n_embd=32))
    path = tmp_path_factory.mktemp("pipe")
    DallePipeline(tokenizer=tokenizer, transformer=transformer, vae=vae).save_pretrained(path)
    return path


def dalle_hf_cli(*args, cwd=None):
    exe = shutil.which("dalle-hf")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "dalle_hf.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def test_eval_shapes_tasks_subset(pipeline_dir, tmp_path):
    out = tmp_path / "eval"
    result = dalle_hf_cli("eval", "shapes", "--pipeline", str(pipeline_dir), "--prompts-per-task", "2",
                          "--images-per-prompt", "1", "--tasks", "novel,colors", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"novel", "colors"} and report["config"]["tasks"] == ["novel", "colors"]
    assert report["shapes_eval"] == report["accuracy"]["colors"]  # the GenEval mean over the tasks evaluated
    assert sorted(p.name for p in out.glob("*.png")) == ["samples_colors.png", "samples_novel.png"]

    bad = dalle_hf_cli("eval", "shapes", "--pipeline", str(pipeline_dir), "--tasks", "colours", "--out", str(out))
    assert bad.returncode == 2 and "expected comma-separated tasks" in bad.stderr and "colours" in bad.stderr


def test_eval_shapes_writes_report_and_sheets(pipeline_dir, tmp_path):
    out = tmp_path / "eval"
    result = dalle_hf_cli("eval", "shapes", "--pipeline", str(pipeline_dir), "--prompts-per-task", "2",
                          "--images-per-prompt", "2", "--candidates", "3", "--out", str(out),
                          "--guidance-scale", "2", "--top-k", "8", "--prompt-seed", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["sampling"] == {"guidance_scale": 2.0, "top_k": 8} and report["config"]["prompt_seed"] == 3
    assert report["config"]["pipeline_default_guidance_scale"] == 1.0
    tasks = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    assert set(tasks) <= set(report["accuracy"]) and "novel" in report["accuracy"]
    assert 0.0 <= report["shapes_eval"] <= 1.0
    assert report["shapes_eval"] == pytest.approx(sum(report["accuracy"][t] for t in tasks) / 6)
    assert "shapes_eval_reranked" in report and "any_of_k" in report and "shapes_eval_best_of_n_oracle" in report
    sheets = sorted(p.name for p in out.glob("*.png"))
    assert len(sheets) >= 7
    assert Image.open(out / sheets[0]).size[0] > 64


def test_generate_and_eval_vae(pipeline_dir, tmp_path):
    result = dalle_hf_cli("generate", "a red circle", "--pipeline", str(pipeline_dir), "--candidates", "2",
                          "--keep", "2", "--out", str(tmp_path / "gen"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["00.png", "01.png"]
    result = dalle_hf_cli("generate", "a red circle", "--pipeline", str(pipeline_dir), "--candidates", "2",
                          "--keep", "1", "--guidance_scale", "3", "--negative_prompt", "a circle",
                          "--out", str(tmp_path / "steered"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "steered").iterdir()) == ["00.png"]
    result = dalle_hf_cli("generate", "a red circle", "--pipeline", str(pipeline_dir), "--guidance_scale", "1",
                          "--negative_prompt", "a circle", "--out", str(tmp_path / "refused"))  # fmt: skip
    assert (
        result.returncode == 2
        and "dalle-hf generate: error: a negative prompt needs guidance_scale > 1" in result.stderr
    )
    assert "Traceback" not in result.stderr
    result = dalle_hf_cli("eval", "vae", "--pipeline", str(pipeline_dir), "--n-per-task", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0.0 <= json.loads(result.stdout)["fidelity"] <= 1.0


def test_eval_clip(pipe, pipeline_dir, tmp_path):
    pipe.save_pretrained(tmp_path / "with-clip")
    result = dalle_hf_cli("eval", "clip", "--pipeline", str(tmp_path / "with-clip"), "--n-images", "6",
                          "--n-captions", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert 0.0 <= report["caption_top1"] <= 1.0 and len(report["per_group"]) == 6 and report["n_captions"] == 4
    result = dalle_hf_cli("eval", "clip", "--pipeline", str(pipeline_dir))
    assert result.returncode != 0 and "no clip_model/" in result.stderr


def test_bad_arguments_fail_with_usage(tmp_path):
    result = dalle_hf_cli("generate", "a red circle", "--pipeline", str(tmp_path / "missing"))
    assert result.returncode != 0
    result = dalle_hf_cli("train", "nonsense")
    assert result.returncode == 2 and "invalid choice" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# --device: where a pipeline loads (the helper the app shares), checked on the CPU with CUDA's availability faked
# ---------------------------------------------------------------------------------------------------------------
NO_CUDA = "--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False); use --device cpu"


def test_resolve_device():
    assert loading.resolve_device("auto", cuda_available=False) == "cpu"
    assert loading.resolve_device("auto", cuda_available=True) == "cuda"
    assert loading.resolve_device("cpu", cuda_available=True) == "cpu"  # asked for: kept, on a GPU machine too
    assert loading.resolve_device("cuda", cuda_available=True) == "cuda"
    with pytest.raises(ValueError) as error:
        loading.resolve_device("cuda", cuda_available=False)
    assert str(error.value) == NO_CUDA
    with pytest.raises(ValueError, match="--device must be one of auto, cpu, cuda, got 'gpu'"):
        loading.resolve_device("gpu", cuda_available=True)


class RecordingPipeline:
    """Stands in for a pipeline class: records `from_pretrained`'s arguments and `.to`'s device, moves nothing."""

    calls = []

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        cls.calls.append(("from_pretrained", kwargs["dtype"], kwargs["quantization_config"]))
        return cls()

    def to(self, device):
        self.calls.append(("to", device))
        return self


@pytest.mark.parametrize("cuda_available, device, dtype, expected", [
    (False, "auto", "float32", [("from_pretrained", torch.float32, None)]),
    (True, "auto", "float16", [("from_pretrained", torch.float16, None), ("to", "cuda")]),
    (True, "cpu", "bfloat16", [("from_pretrained", torch.bfloat16, None)]),
    (True, "cuda", None, [("from_pretrained", None, None), ("to", "cuda")]),
])  # fmt: skip
def test_load_pipeline_places_the_pipeline(monkeypatch, cuda_available, device, dtype, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    monkeypatch.setattr(RecordingPipeline, "calls", [])
    pipe = loading.load_pipeline("unused", dtype, device=device, pipeline_cls=RecordingPipeline)
    assert isinstance(pipe, RecordingPipeline) and RecordingPipeline.calls == expected


@pytest.mark.parametrize("cuda_available, flags, message", [
    (False, ["--device", "cuda"], NO_CUDA),
    (False, ["--dtype", "float16"], "--dtype float16 needs --device cuda"),  # auto is the CPU here
    (True, ["--device", "cpu", "--dtype", "float16"], "--dtype float16 needs --device cuda"),
    (True, ["--quantization", "int8-dynamic"], "--quantization int8-dynamic runs on the CPU"),  # auto is CUDA
    (False, ["--quantization", "int8-dynamic", "--dtype", "bfloat16"],
     "--quantization int8-dynamic quantizes a float32"),
])  # fmt: skip
def test_generate_refuses_what_the_device_cannot_run(monkeypatch, capsys, tmp_path, cuda_available, flags, message):
    """Refused before anything loads (the pipeline folder does not exist), with the message and no traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    with pytest.raises(SystemExit) as stop:
        cli.main(["generate", "a red circle", "--pipeline", str(tmp_path / "missing"), *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"dalle-hf generate: error: {message}" in err and "Traceback" not in err


def test_generate_on_the_cpu_as_before(pipeline_dir, tmp_path, monkeypatch, capsys):
    """`--device cpu` and the default (auto: the CPU without CUDA) write the same images, seeded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cpu", "auto"):
        assert cli.main(["generate", "a red circle", "--pipeline", str(pipeline_dir), "--candidates", "2", "--keep",
                         "2", "--seed", "3", "--device", device, "--out", str(tmp_path / device)]) == 0
    assert capsys.readouterr().out.count(".png") == 4
    for name in ("00.png", "01.png"):
        assert (tmp_path / "cpu" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes()
