"""Claims: one process at a time works on an output, so that two batch jobs on one output folder do not collide.

A claim on ``OUT/x.nii.gz`` is an exclusive ``flock(2)`` on the hidden file ``OUT/.x.nii.gz.claim``. The kernel
drops the lock when its process ends, however it ends (even ``SIGKILL``), so a claim is never left stale: a
later run takes the file over and removes it when done. After locking, the holder checks that the file it
locked is still the one at that name (another holder may have removed it in between) and retries otherwise,
the usual pattern for lock files that are deleted (see ``flock(2)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

CLAIM_SUFFIX = ".claim"


def claim_path(output: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """``<folder>/.<name>.claim`` for an output ``<folder>/<name>``; with ``folder`` given (e.g. the output root,
    so that no sub-folder is made before there is something to put in it),
    ``<folder>/.<hash of the output path>.<name>.claim``."""
    output = Path(output)
    if folder is None:
        return output.with_name(f".{output.name}{CLAIM_SUFFIX}")
    digest = hashlib.sha1(str(output.absolute()).encode()).hexdigest()[:12]
    return Path(folder) / f".{digest}.{output.name}{CLAIM_SUFFIX}"


def _try_lock(path: Path) -> int | None:
    """An open, exclusively locked descriptor on ``path`` (created if needed), or None if another process holds it."""
    import fcntl

    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # removed by its previous holder while we waited: lock the new one
    return None


@contextlib.contextmanager
def claim(output: str | os.PathLike, folder: str | os.PathLike | None = None) -> Iterator[bool]:
    """Hold the claim on ``output`` for the ``with`` block: yields True if this process has it, False if another
    live process does (the caller then leaves ``output`` alone). The claim file (:func:`claim_path`) is removed
    on exit."""
    path = claim_path(output, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(path)
    if fd is None:
        yield False
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on a folder itself (no lock file is left behind), blocking until free."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
