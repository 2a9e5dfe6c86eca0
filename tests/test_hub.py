"""Publishing to the Hub without a network, loading the published repository without dalle-hf, and export-space.

The upload runs huggingface_hub's own `HfApi.upload_folder` (its folder scan and ignore rules) down to
`HfApi.create_commit`, which is captured together with `create_repo` / `create_branch`; offline mode is on, so any
request that slipped past them would raise instead of reaching a network. The captured files are then laid out as
a Hugging Face cache (`models--org--name/snapshots/<sha>/...` and `refs/main`) and loaded, with `HF_HUB_OFFLINE=1`,
by a virtual environment that has diffusers, transformers and gradio but not dalle-hf (`import dalle_hf` fails
there), the way a user without dalle-hf meets the published model.
"""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl, SpaceCard, constants

from dalle_hf.cli import main as cli_main
from dalle_hf.pipeline_dalle import DallePipeline

from .test_app import free_port

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "dalle-shapes"
REPO_ID = "org/dalle-shapes"
SHA = "0123456789abcdef0123456789abcdef01234567"
# The repository `dalle-hf push checkpoints/dalle-shapes` publishes, file for file.
SHIPPED_FILES = [
    "README.md",
    "clip.py",
    "clip_model/config.json",
    "clip_model/model.safetensors",
    "clip_processor/processor_config.json",
    "clip_processor/tokenizer.json",
    "clip_processor/tokenizer_config.json",
    "hub.py",
    "image_processing.py",
    "model_card.py",
    "model_index.json",
    "pipeline_dalle.py",
    "remote_code.py",
    "samples.png",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/configuration_dalle.py",
    "transformer/model.safetensors",
    "transformer/modeling_dalle.py",
    "transformer/quantization.py",
    "vae/config.json",
    "vae/configuration_dvae.py",
    "vae/model.safetensors",
    "vae/modeling_dvae.py",
    "world.json",  # the world's examples and vocabulary: the app and the Space read it
]
# Run first in every "user without dalle-hf" subprocess: it checks that dalle_hf cannot be imported.
NO_DALLE_HF = textwrap.dedent("""
    try:
        import dalle_hf
        raise SystemExit(f"dalle_hf is importable from {dalle_hf.__file__}")
    except ModuleNotFoundError:
        pass
""")


class FakeHub:
    """Records what reaches the Hub API: repositories, branches and commits (with each file's bytes)."""

    def __init__(self):
        self.repos, self.branches, self.commits, self.validated_cards = [], [], [], []

    def install(self, monkeypatch):
        hub = self
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        # The single-commit path of upload_folder (without hf_xet's streamed uploads), which ends in create_commit.
        monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)

        def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
            hub.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
            hub.branches.append({"repo_id": repo_id, "branch": branch})

        def validate_yaml(self, content, *, repo_type=None, token=None):  # the Hub's POST /api/validate-yaml
            hub.validated_cards.append(content)

        def create_commit(self, repo_id, operations, *, commit_message, revision=None, create_pr=None, **kwargs):
            files = {}
            for op in operations:
                with op.as_file() as f:
                    files[op.path_in_repo] = f.read()
            hub.commits.append({"repo_id": repo_id, "files": files, "revision": revision, "create_pr": create_pr,
                                "commit_message": commit_message})  # fmt: skip
            url = f"https://huggingface.co/{repo_id}/commit/{SHA}"
            return CommitInfo(commit_url=url, commit_message=commit_message, commit_description="", oid=SHA)

        for name, method in [("create_repo", create_repo), ("create_branch", create_branch),
                             ("_validate_yaml", validate_yaml), ("create_commit", create_commit)]:  # fmt: skip
            monkeypatch.setattr(HfApi, name, method)
        assert constants.is_offline_mode()


def write_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay out `files` as the Hub cache holds a downloaded repository; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(content)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


def use_hf_cache(monkeypatch, cache: Path) -> None:
    """This process offline, reading the Hub cache `cache` (export-space reads the model's model_index.json)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture(scope="module")
def venv_without_dalle_hf(tmp_path_factory) -> Path:
    """A virtual environment with this one's packages but not dalle-hf: its .pth file names our site-packages as a
    plain path, so the .pth files inside (dalle-hf's editable install among them) are not run. Returns its python."""
    venv = tmp_path_factory.mktemp("venv-without-dalle-hf")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site_packages,) = venv.glob("lib/python*/site-packages")
    (site_packages / "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "python"


def offline_env(cache: Path, modules: Path, **extra: str) -> dict:
    """This environment offline, reading the Hub cache `cache`, remote code kept under `modules`, no PYTHONPATH."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_MODULES_CACHE": str(modules),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": "", **extra}  # fmt: skip


def run_without_dalle_hf(python: Path, script: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = offline_env(cache, cwd / "modules")
    result = subprocess.run([str(python), "-c", NO_DALLE_HF + textwrap.dedent(script)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """`dalle-hf push checkpoints/dalle-shapes org/dalle-shapes --private --revision v1`, captured."""
    hub = FakeHub()
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub.install(monkeypatch)
        assert cli_main(["push", str(CHECKPOINT), REPO_ID, "--private", "--revision", "v1"]) == 0
    cache = tmp_path_factory.mktemp("hf-cache")
    write_hf_cache(cache, REPO_ID, hub.commits[0]["files"])
    return hub, cache


def test_push_uploads_the_complete_repo(published, tmp_path):
    hub, cache = published
    assert hub.repos == [{"repo_id": REPO_ID, "private": True, "exist_ok": True}]
    assert hub.branches == [{"repo_id": REPO_ID, "branch": "v1"}]
    (commit,) = hub.commits
    assert commit["revision"] == "v1" and commit["create_pr"] is False
    assert hub.validated_cards == [commit["files"]["README.md"].decode()]  # upload_folder checks the card first
    assert sorted(commit["files"]) == SHIPPED_FILES
    for name in ("transformer/model.safetensors", "vae/model.safetensors", "clip_model/model.safetensors",
                 "tokenizer/tokenizer.json", "samples.png"):  # fmt: skip
        assert commit["files"][name] == (CHECKPOINT / name).read_bytes(), name  # byte for byte

    index = json.loads(commit["files"]["model_index.json"])
    assert index["_class_name"] == ["pipeline_dalle", "DallePipeline"]
    assert index["transformer"] == ["modeling_dalle", "DalleForImageGeneration"]
    assert index["vae"] == ["modeling_dvae", "DalleVAE"] and index["default_guidance_scale"] == 3.0
    assert json.loads(commit["files"]["vae/config.json"])["auto_map"] == {
        "AutoConfig": "configuration_dvae.DalleVAEConfig", "AutoModel": "modeling_dvae.DalleVAE"}
    assert json.loads((CHECKPOINT / "model_index.json").read_text())["vae"] == ["dalle_hf.modeling_dvae", "DalleVAE"]

    (tmp_path / "README.md").write_bytes(commit["files"]["README.md"])
    card = ModelCard.load(tmp_path / "README.md")  # parses and validates the front matter
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "text-to-image" and {"dalle-hf", "text-to-image"} <= set(data["tags"])
    assert data["data_sources"] == [{"name": "dalle-hf procedural shapes world (`dalle_hf.data.shapes`)",
                                     "license": "mit"}]  # fmt: skip
    assert f'DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)' in card.text
    shipped = (CHECKPOINT / "README.md").read_text()
    sections = ("## Training", "Wall time of all training stages together", "## ShapesEval", "## Limitations",
                "| **six-task mean** | **0.721** | **0.953** | **0.997** |", "![samples]")  # fmt: skip
    for section in sections:
        assert section in card.text and section in shipped, section
    assert "python -m dalle_hf.train_dalle" in card.text


def test_shipped_card_is_the_generators_output():
    from dalle_hf.model_card import make_model_card, read_card_data

    card = make_model_card(read_card_data(str(CHECKPOINT)), "checkpoints/dalle-shapes", sample_grid=True)
    assert (CHECKPOINT / "README.md").read_text() == str(card)  # regenerate with python -m dalle_hf.model_card
    assert ModelCard.load(CHECKPOINT / "README.md").data.pipeline_tag == "text-to-image"


def test_model_card_command_draws_the_sample_grid_and_writes_the_card(tmp_path):
    """`python -m dalle_hf.model_card FOLDER --sample-grid`, as a checkpoint's card is regenerated (a subprocess:
    run with `-m`, the module is `__main__`, which once hid the pipeline classes from it)."""
    from .test_app import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "tiny")
    (folder / "card_data.json").write_text(json.dumps({"name": "tiny", "sample_prompts": ["red circle", "blue square"],
                                                        "sample_grid": {"images_per_prompt": 2, "candidates": 2}}))
    done = subprocess.run([sys.executable, "-m", "dalle_hf.model_card", str(folder), "--sample-grid"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from PIL import Image

    with Image.open(folder / "samples.png") as grid:  # 2 x 2 samples of 16 px, each enlarged 4 x to 64 px
        assert grid.size == (2 * 64, 2 * 64)
        cell = np.asarray(grid.crop((0, 0, 64, 64)))
    assert (cell[::4, ::4].repeat(4, 0).repeat(4, 1) == cell).all()  # nearest neighbour: 4 x 4 blocks
    assert "![samples](samples.png)" in (folder / "README.md").read_text()


def test_published_repo_loads_without_dalle_hf(published, venv_without_dalle_hf, tmp_path):
    _, cache = published
    script = f"""
        import json, sys
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        from transformers import AutoModel

        pipe = DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red circle", num_images_per_prompt=4, num_images_to_keep=2,
                   generator=torch.Generator().manual_seed(0))
        vae = AutoModel.from_pretrained("{REPO_ID}", subfolder="vae", trust_remote_code=True)
        np.save("tokens.npy", out.image_tokens.numpy())
        np.save("pixels.npy", np.stack([np.asarray(image) for image in out.images]))
        own = [m for m in sys.modules if m.startswith("dalle_hf")]
        print(json.dumps({{"pipeline": type(pipe).__module__, "transformer": type(pipe.transformer).__module__,
                          "vae": type(vae).__name__, "dalle_hf": own}}))
    """
    result = run_without_dalle_hf(venv_without_dalle_hf, script, cache, tmp_path)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["pipeline"] == "diffusers_modules.local.pipeline_dalle"
    assert loaded["transformer"] == "diffusers_modules.local.modeling_dalle"
    assert loaded["vae"] == "DalleVAE" and loaded["dalle_hf"] == []

    pipe = DallePipeline.from_pretrained(CHECKPOINT)  # dalle-hf's own, from the shipped folder
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    ours = pipe("a red circle", num_images_per_prompt=4, num_images_to_keep=2, generator=generator)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "tokens.npy")), ours.image_tokens)
    assert np.array_equal(np.load(tmp_path / "pixels.npy"), np.stack([np.asarray(image) for image in ours.images]))


def test_dalle_hf_loads_the_published_repo_with_its_own_classes(published, monkeypatch):
    """`DallePipeline.from_pretrained("org/name")` of the published copy: no `trust_remote_code`, dalle-hf's own
    modules (the repository's code files are not imported), the shipped folder's tokens."""
    _, cache = published
    use_hf_cache(monkeypatch, cache)
    pipe = DallePipeline.from_pretrained(REPO_ID)
    assert [type(m).__module__ for m in (pipe, pipe.transformer, pipe.vae)] == [
        "dalle_hf.pipeline_dalle", "dalle_hf.modeling_dalle", "dalle_hf.modeling_dvae"]  # fmt: skip
    assert pipe.config._name_or_path == REPO_ID
    shipped = DallePipeline.from_pretrained(CHECKPOINT)
    tokens = []
    for p in (pipe, shipped):
        p.set_progress_bar_config(disable=True)
        seed = torch.Generator().manual_seed(0)
        out = p("a red circle", num_images_per_prompt=4, num_images_to_keep=2, generator=seed)
        tokens.append(out.image_tokens)
    assert torch.equal(*tokens)


def test_export_space_runs_offline_from_the_published_model(published, venv_without_dalle_hf, tmp_path, monkeypatch):
    _, cache = published
    use_hf_cache(monkeypatch, cache)
    space = tmp_path / "space"
    assert cli_main(["export-space", str(space), "--model", REPO_ID]) == 0
    assert sorted(p.name for p in space.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    data = SpaceCard.load(space / "README.md").data.to_dict()
    assert data["sdk"] == "gradio" and data["models"] == [REPO_ID] and data["suggested_hardware"] == "cpu-basic"
    pins = [line for line in (space / "requirements.txt").read_text().splitlines() if not line.startswith("--")]
    assert pins and all("==" in line for line in pins), pins
    assert f"gradio=={data['sdk_version']}" in pins

    script = """
        import json, sys
        import numpy as np
        sys.path.insert(0, "space")
        import app

        demo = app.build_demo()
        gallery = app.generate("a red circle", 4, 2, 3.0, 0)
        np.save("space_pixels.npy", np.stack([np.asarray(image) for image, _ in gallery]))
        print(json.dumps({"model": app.MODEL_ID, "captions": [c for _, c in gallery], "examples": app.example_prompts(),
                          "blocks": type(demo).__name__}))
    """
    result = run_without_dalle_hf(venv_without_dalle_hf, script, cache, tmp_path)
    ran = json.loads(result.stdout.strip().splitlines()[-1])
    assert ran["model"] == REPO_ID and ran["blocks"] == "Blocks" and len(ran["captions"]) == 2
    assert ran["captions"][0].startswith("CLIP ") and "a red circle" in ran["examples"]
    pipe = DallePipeline.from_pretrained(CHECKPOINT)
    pipe.set_progress_bar_config(disable=True)
    ours = pipe("a red circle", num_images_per_prompt=4, num_images_to_keep=2, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "space_pixels.npy"), np.stack([np.asarray(im) for im in ours.images]))


def test_exported_space_serves_offline(published, venv_without_dalle_hf, tmp_path, monkeypatch):
    """The exported Space started as a Space starts it (`python app.py`, port from GRADIO_SERVER_PORT), without
    dalle-hf and offline, answers a generate request from gradio_client."""
    from gradio_client import Client

    _, cache = published
    use_hf_cache(monkeypatch, cache)
    assert cli_main(["export-space", str(tmp_path / "space"), "--model", REPO_ID]) == 0
    port = free_port()
    env = offline_env(cache, tmp_path / "m", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    script = NO_DALLE_HF + 'import runpy; runpy.run_path("app.py", run_name="__main__")'
    server = subprocess.Popen([str(venv_without_dalle_hf), "-c", script], cwd=tmp_path / "space", env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            lines.append(line)
            if "Running on local URL" in line or (not line and server.poll() is not None):
                break
        assert "Running on local URL" in lines[-1], "".join(lines)[-3000:]
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        gallery = client.predict("a red circle", 4, 2, 3.0, 0, api_name="/generate")
        assert len(gallery) == 2 and all(item["caption"].startswith("CLIP ") for item in gallery)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_pipe_push_to_hub_publishes_a_fresh_pipeline(pipe, tmp_path, monkeypatch):
    hub = FakeHub()
    hub.install(monkeypatch)
    commit = pipe.push_to_hub("me/tiny-dalle", commit_message="first")
    assert commit.oid == SHA and hub.repos == [{"repo_id": "me/tiny-dalle", "private": None, "exist_ok": True}]
    assert hub.branches == [] and hub.commits[0]["revision"] is None and hub.commits[0]["commit_message"] == "first"
    files = hub.commits[0]["files"]
    assert {"README.md", "model_index.json", "pipeline_dalle.py", "samples.png", "transformer/modeling_dalle.py",
            "vae/modeling_dvae.py", "tokenizer/tokenizer.json", "clip_model/model.safetensors"} <= set(files)
    assert "card_data.json" not in files and not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    (tmp_path / "README.md").write_bytes(files["README.md"])
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.pipeline_tag == "text-to-image" and data.license == "mit"
    assert json.loads(files["model_index.json"])["transformer"] == ["modeling_dalle", "DalleForImageGeneration"]


def test_push_draws_the_sample_grid_of_a_folder_without_one(pipe, tmp_path, monkeypatch):
    pipe.save_pretrained(tmp_path / "run")  # a training run's folder: no card data, no samples.png
    hub = FakeHub()
    hub.install(monkeypatch)
    assert cli_main(["push", str(tmp_path / "run"), "me/run"]) == 0
    files = hub.commits[0]["files"]
    assert hub.repos[0]["private"] is None and hub.commits[0]["revision"] is None
    assert files["samples.png"][:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "run" / "samples.png").exists()
    assert "![samples](samples.png)" in files["README.md"].decode()
