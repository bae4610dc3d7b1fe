"""Every benchmark still starts: its imports resolve and its --help prints.

Benchmarks are run by hand (README), not by the suite, so a renamed helper in
the code they import would otherwise go unnoticed until someone measures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_help_runs(name):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--help"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
