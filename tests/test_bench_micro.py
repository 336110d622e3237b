"""bench/micro.py runs (quick mode) and prints its table: every case wrote one checked frame
per message. The numbers themselves are not checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MICRO = ROOT / "bench" / "micro.py"

ROWS = [
    "| raw msgspec decode+encode |",
    "| sync handler, request+reply |",
    "| async handler, emit |",
    "| async handler, request+reply |",
]


@pytest.mark.timeout(180)
def test_micro_quick_prints_every_row() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    proc = subprocess.run(
        [sys.executable, str(MICRO), "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=170
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| case | ns/message |" in proc.stdout
    for row in ROWS:
        assert row in proc.stdout, proc.stdout
