"""The repository lints clean (ruff: pycodestyle, pyflakes; settings in pyproject.toml) and exports what it says."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dalle_hf

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed by `make install` (requirements.txt)")
def test_ruff_check_is_clean():
    result = subprocess.run(["ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_names_resolve():
    # __all__ is written out by hand: every name in it, lazy or not, must import, and every lazy name be listed.
    for name in dalle_hf.__all__:
        assert getattr(dalle_hf, name) is not None, name
    assert set(dalle_hf._LAZY) <= set(dalle_hf.__all__)
    assert sorted(dir(dalle_hf)) == sorted(dalle_hf.__all__)


def test_import_loads_models_without_diffusers():
    # The package docstring's promise: models import with transformers alone (pipelines load diffusers lazily).
    code = "import sys, dalle_hf; from dalle_hf import DalleVAE; assert 'diffusers' not in sys.modules, 'diffusers'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
