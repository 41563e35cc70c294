"""pyflannel type-checks with mypy --strict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    res = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports",
                          "--cache-dir", str(tmp_path), "pyflannel"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
