"""`ruff check` and `ruff format --check` are clean over the repository (configuration: pyproject.toml's
[tool.ruff] tables, 120 columns)."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def ruff():
    found = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (scripts/install.sh installs it)")
    return found


@pytest.mark.parametrize(
    "args", [["check", "--no-cache"], ["format", "--check", "--no-cache"]], ids=["check", "format"]
)
def test_ruff_is_clean(args):
    result = subprocess.run([ruff(), *args, "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff {' '.join(args)} found problems:\n{result.stdout[-4000:]}{result.stderr}"
