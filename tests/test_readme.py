"""Every command the README shows runs as written.

The README's fenced `bash` blocks are read line by line (continuations joined, comments dropped, `a && b` split).
Fast commands run on the shipped checkpoints in a scratch folder, in order, so a later one reads what an earlier one
wrote (`dalle-hf compress out/00.png` after `dalle-hf generate ... --out out/`); `dalle-hf` runs as
`dalle_hf.cli.main` (this checkout's code) and `pyproject.toml` must map the console script to it. Slow commands
(training, a full benchmark, publishing, the app, the install and the test suite) are checked without running them:
their `--help` works and names every flag the README passes, and the files they read exist (downloading and
converting DALL·E Mega too). The README's `python` blocks run as one script on the shipped `dalle-shapes`, with a
tiny random DALL·E-mini-shaped folder written by the converter's `save_converted_pipeline` standing in for the
converted `dalle-mega-hf`. `dalle-hf export-space` reads the published model's configs: an HF-cache-shaped folder
holds the shipped checkpoint's as `me/dalle-shapes`, read offline (tests/test_hub.py's pattern). A command that
matches no rule here runs as written, so a new README command is exercised by default.
"""

import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Slow commands: the argv prefix they start with -> how to check them instead of running them.
SLOW = {
    ("pip", "install"): "requirements",
    ("make", "test"): "make",
    ("python", "app.py"): "help",
    ("python", "-m", "dalle_hf.train_dvae"): "help",
    ("python", "-m", "dalle_hf.train_clip"): "help",
    ("accelerate", "launch", "-m", "dalle_hf.train_dalle"): "help",
    ("dalle-hf", "eval", "shapes"): "help",  # 700 prompts x 16 candidates: minutes
    ("dalle-hf", "push"): "help",  # needs the Hub; tests/test_hub.py publishes offline
    ("hf", "download"): "help",  # DALL·E Mega's 10.4 GB from the Hub
    ("dalle-hf", "convert-dalle-mini"): "help",  # the download's weights; tests/test_convert_*.py convert tiny ones
}


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def readme_commands(text: str) -> list[list[str]]:
    """Each shell command of the README's `bash` blocks as argv, in order."""
    commands = []
    for block in fenced_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while "&&" in argv:
                i = argv.index("&&")
                commands.append(argv[:i])
                argv = argv[i + 1 :]
            if argv:
                commands.append(argv)
    return commands


def slow_rule(argv: list[str]) -> tuple[tuple[str, ...], str] | None:
    for prefix, rule in SLOW.items():
        if tuple(argv[: len(prefix)]) == prefix:
            return prefix, rule
    return None


def flags(argv: list[str]) -> list[str]:
    return [a.split("=")[0] for a in argv if a.startswith("--")]


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def cli(argv: list[str]) -> str:
    """`dalle-hf ARGV` in this process (this checkout's code); returns what it printed."""
    from dalle_hf.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's --help and usage errors
            code = stop.code
    assert code in (0, None), f"dalle-hf {shlex.join(argv)} exited {code}:\n{out.getvalue()}"
    return out.getvalue()


def check_without_running(argv: list[str], prefix: tuple[str, ...], rule: str, scratch: Path) -> None:
    if rule == "requirements":  # pip install -r requirements.txt: a lock, every line pinned
        path = ROOT / argv[argv.index("-r") + 1]
        pins = [line for line in path.read_text().splitlines() if line and not line.startswith(("#", " "))]
        assert pins and all("==" in line for line in pins), f"{path} must pin every package (==)"
        return
    if rule == "make":  # make -n: the target exists and expands
        result = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return
    if prefix[0] == "dalle-hf":
        help_text = cli([*prefix[1:], "--help"])
    elif prefix[0] == "hf":  # huggingface_hub's CLI
        assert shutil.which("hf"), "the README runs `hf download`: huggingface_hub's `hf` script is missing"
        result = subprocess.run([*prefix, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        help_text = result.stdout
    elif prefix[:2] == ("python", "-m") or prefix[0] == "accelerate":  # a training script's parse_args(argv)
        if prefix[0] == "accelerate":
            assert shutil.which("accelerate"), "the README runs `accelerate launch`: accelerate's script is missing"
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
            importlib.import_module(prefix[-1]).parse_args(["--help"])
        assert stop.value.code == 0
        help_text = out.getvalue()
    else:  # python app.py
        result = run_python([*argv[1 : len(prefix)], "--help"], ROOT)
        assert result.returncode == 0, result.stderr
        help_text = result.stdout
    unknown = [flag for flag in flags(argv) if not re.search(rf"{re.escape(flag)}\b", help_text)]
    assert not unknown, f"`{shlex.join(argv)}`: its --help does not name {unknown}"


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """An empty working folder that sees the shipped checkpoints where the README says they are."""
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_is_short_and_keeps_its_sections():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for heading in ("## Run DALL·E mini or Mega", "## Set up", "## What the shipped models draw", "## Python",
                    "## Command line", "## Train on your own images", "## Publish", "## The app"):  # fmt: skip
        assert heading in text
    for link in re.findall(r"\]\(((?:docs|checkpoints)/[^)#]*)", text):  # every linked page exists
        assert (ROOT / link).exists(), link


def test_the_readme_commands_are_read():
    commands = readme_commands(README.read_text())
    assert ["make", "test"] in commands and ["python", "app.py"] in commands
    assert any(c[:2] == ["dalle-hf", "generate"] for c in commands)
    train = next(c for c in commands if c[:2] == ["accelerate", "launch"])
    assert "--mixed_precision" in train  # continuation lines joined


def test_dalle_hf_console_script_is_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dalle-hf"] == "dalle_hf.cli:main"


def published_shapes_offline(monkeypatch, cache: Path) -> None:
    """`me/dalle-shapes` in an HF-cache-shaped folder (the configs export-space reads), this process offline."""
    from tests.test_hub import use_hf_cache, write_hf_cache

    shipped = ROOT / "checkpoints" / "dalle-shapes"
    names = ("model_index.json", "transformer/config.json")
    write_hf_cache(cache, "me/dalle-shapes", {name: (shipped / name).read_bytes() for name in names})
    use_hf_cache(monkeypatch, cache)


def test_every_readme_command(scratch, monkeypatch, tmp_path_factory):
    published_shapes_offline(monkeypatch, tmp_path_factory.mktemp("hf-cache"))
    ran, checked = [], []
    for argv in readme_commands(README.read_text()):
        slow = slow_rule(argv)
        if slow is not None:
            check_without_running(argv, *slow, scratch)
            checked.append(argv)
        elif argv[0] == "dalle-hf":
            cli(argv[1:])
            ran.append(argv)
        else:
            result = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
            assert result.returncode == 0, f"`{shlex.join(argv)}` failed:\n{result.stderr}"
            ran.append(argv)
    assert ran and checked
    # what the fast commands wrote: four PNGs, a compressed file and its reconstruction, a Space folder
    assert len(list((scratch / "out").glob("*.png"))) == 4
    assert sorted(p.name for p in (scratch / "space").iterdir()) == ["README.md", "app.py", "requirements.txt"]
    assert (scratch / "circles.dhfc").stat().st_size < 200 and (scratch / "circles.png").is_file()


def write_tiny_converted_mega(path: Path) -> None:
    """A tiny random DALL·E-mini-shaped folder as `dalle-hf convert-dalle-mini` writes it, where the README's
    converted Mega would be."""
    from dalle_hf.convert_dalle_mini import save_converted_pipeline
    from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
    from tests.dalle_bart_reference import randomize, tiny_bart_config, tiny_vqgan, write_tiny_bart_tokenizer

    write_tiny_bart_tokenizer(path.parent / "bpe")
    transformer = randomize(DalleBartForImageGeneration(tiny_bart_config()))
    save_converted_pipeline(
        str(path), config=transformer.config, transformer_state_dict=transformer.state_dict(), vae=tiny_vqgan(),
        tokenizer_dir=str(path.parent / "bpe"), card_info={"source": "dalle-mini/dalle-mega", "command": "(test)"},
    )  # fmt: skip


def test_readme_python_runs(scratch):
    import torch

    torch.set_num_threads(1)
    write_tiny_converted_mega(scratch / "dalle-mega-hf")
    source = "\n".join(fenced_blocks(README.read_text(), "python"))
    namespace = {"__name__": "__readme__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(source, str(README), "exec"), namespace)
    assert (scratch / "best.png").is_file() and (scratch / "sunset.png").is_file()
    assert len(namespace["out"].images) == 4 and len(namespace["more"].images) == 4
    assert namespace["edits"].ranked_by == "clip" and len(namespace["edits"].images) == 4
    assert namespace["scores"].log_likelihood.shape == (4,)
