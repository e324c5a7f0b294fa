"""Package layout: import direction (STYLE.md) and a cheap, fast CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_direction_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter not installed")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, medfusion.cli as c; c.main(['--help']);"
        "heavy=[m for m in ('torch','monai','lightning') if m in sys.modules]; assert not heavy, heavy"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    for name in ("fit", "convert", "make-data", "standardize", "demo"):
        assert name in proc.stdout
    assert elapsed < 3.0


def test_unknown_command_lists_valid_ones():
    from medfusion.cli import main

    assert main(["frobnicate"]) == 2
