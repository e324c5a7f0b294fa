"""Atomic file output: write to a temporary name in the destination folder, then rename.

An interrupted job therefore never leaves a partial file under the final name, and a resumed
batch job can trust that every file it finds is complete. Plain stdlib (``os.replace`` is atomic
on POSIX and Windows when source and destination are on the same file system).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_not_overwriting(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return ``Path(path)``; raise ``FileExistsError`` naming it if it exists and ``overwrite`` is False."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it (pass overwrite=True / --overwrite)"
        )
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    The temporary name keeps the full suffix (``.nii.gz``, ``.json``) so writers that dispatch on the
    extension (nibabel, SimpleITK) behave as for the final name. On error the temporary file is removed.
    """
    path = check_not_overwriting(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success rename it to ``path`` (e.g. a DICOM series)."""
    path = check_not_overwriting(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
