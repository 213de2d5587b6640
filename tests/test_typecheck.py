"""mypy over the package, with the config in pyproject.toml, so CI type-checks the API (issue 6)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _server import REPO


def test_mypy_cusedev() -> None:
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is not installed: pip install -e '.[test]'")
    env = {**os.environ, "MYPY_CACHE_DIR": os.environ.get("MYPY_CACHE_DIR", "/tmp/cusedev-mypy-cache")}
    p = subprocess.run([sys.executable, "-m", "mypy", "cusedev"], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Success" in p.stdout
