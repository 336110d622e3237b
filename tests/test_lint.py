"""`ruff check` passes on the package (pyproject.toml [tool.ruff])."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_passes_on_the_package():
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "src/"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
