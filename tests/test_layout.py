"""Package layout: import direction (STYLE.md) and a cheap, fast CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_direction_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    assert Path(exe).exists(), "import-linter is a test dependency (pyproject [test]); install it"
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_help_imports_nothing_heavy():
    code = (
        "import sys, medfusion.cli as c; c.main(['--help']);"
        "heavy=[m for m in ('torch','monai','lightning') if m in sys.modules]; assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("fit", "convert", "make-data", "standardize", "demo"):
        assert name in proc.stdout


def test_unknown_command_lists_valid_ones():
    from medfusion.cli import main

    assert main(["frobnicate"]) == 2


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def test_no_test_skips_on_an_import_of_our_own_code():
    """An import error of medfusion must fail a test, never skip it."""
    import re

    pattern = re.compile("importorskip" + r"""\(\s*["']medfusion""")  # split so that this file does not match
    offenders = [str(p.relative_to(ROOT)) for p in _python_files("tests") if pattern.search(p.read_text())]
    assert not offenders, offenders


def test_size_limits_of_the_package():
    """Files <= 600 lines, functions <= 100 lines, LightningModule constructors <= 20 parameters (STYLE.md)."""
    import ast

    problems = []
    for path in _python_files("medfusion"):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > 600:
            problems.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 100:
                    problems.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
                if node.name == "__init__":
                    n = len(node.args.args) - 1 + len(node.args.kwonlyargs)
                    if n > 20:
                        problems.append(f"{rel}:{node.lineno} __init__: {n} parameters")
    assert not problems, "\n".join(problems)


def test_docstrings_cite_no_notes_outside_the_repository():
    """The package says what it needs in its own words: no pointers to notes that ship elsewhere."""
    needles = ("user_asks", "shared/reference", "feasibility note", "diffusionct_feasibility")
    offenders = [
        f"{p.relative_to(ROOT)}: {n}" for p in _python_files("medfusion") for n in needles if n in p.read_text()
    ]
    assert not offenders, offenders
