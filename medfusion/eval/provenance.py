"""What produced an evaluation: the code's version and commit and the versions of the libraries that decide its numbers.

Every ``summary.json`` and test-log line of ``medfusion evaluate`` carries :func:`environment`, so a figure that does
not reproduce can be traced to a code change or a library release (the package's dependencies are ranges, and a new
MONAI or torch release can move a trained network's Dice in the third decimal).
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "monai", "lightning", "numpy", "scipy", "SimpleITK", "nibabel", "scikit-image")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def source_commit(path: str | Path | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout whose root is ``path`` (default: the folder above this
    package, the root of an editable install), or ``None`` when it is not a checkout's root or git is not installed
    (an installed wheel)."""
    root = Path(path) if path is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root.resolve():
            return None  # e.g. an installed copy inside a virtual environment that lies in some checkout
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def environment() -> dict[str, Any]:
    """The medfusion version and source commit, Python, the platform and the versions of :data:`LIBRARIES`."""
    import medfusion

    return {
        "medfusion": medfusion.__version__,
        "source": source_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def describe(env: dict[str, Any] | None) -> str:
    """One line for a report: ``medfusion 0.1.0 (commit 5abc095, uncommitted changes); torch 2.13.0, monai 1.6.1, ...``."""
    if not env:
        return ""
    source = env.get("source")
    where = (
        "not a git checkout"
        if not source
        else f"commit {source['commit'][:7]}" + (", uncommitted changes" if source.get("dirty") else "")
    )
    libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items() if v)
    return f"Environment: medfusion {env.get('medfusion')} ({where}); Python {env.get('python')}; {libs}."
