"""Atomic file output: write to a temporary name in the destination folder, flush it to disk, then rename.

An interrupted job therefore never leaves a partial file under the final name, and a resumed batch job can trust
that every file it finds is complete. The steps follow what POSIX guarantees (``rename(2)`` replaces a name
atomically within one file system) and what it does not (a rename can reach the disk before the data it names,
so the data is ``fsync``-ed first and the folder after the rename):

1. the temporary file or folder is created next to the destination, with the permissions an ordinary ``open``
   would give (``0666`` / ``0777`` minus the umask: ``0644`` / ``0755`` by default; ``mkstemp`` alone gives
   ``0600``, which colleagues cannot read);
2. the caller writes it; every file is ``fsync``-ed;
3. it is renamed over the destination and the folder is ``fsync``-ed. A folder that replaces an existing one
   is swapped in with one ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15), so there is no moment with neither
   the old nor the new folder; where the call is missing the old folder is first renamed aside (it still
   exists, under a ``.old`` name, until the new one is in place).

On any error the temporary is removed and the destination is left as it was. A folder that cannot be written
(read only, missing permission) raises ``PermissionError`` naming that folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def check_not_overwriting(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return ``Path(path)``; raise ``FileExistsError`` naming it if it exists and ``overwrite`` is False."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it (pass overwrite=True / --overwrite)"
        )
    return path


def current_umask() -> int:
    """The process umask (read by setting and restoring it; Linux also shows it in /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    """Flush a file (or a folder entry list) to disk; folders that cannot be opened are skipped."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems refuse fsync on folders
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _writable_error(folder: Path, exc: OSError) -> OSError:
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionError(f"cannot write into {folder}: {exc.strerror}")
    return exc


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _writable_error(path.parent, exc) from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success flush it and rename it to ``path``.

    The temporary name keeps the full suffix (``.nii.gz``, ``.json``) so writers that dispatch on the
    extension (nibabel, SimpleITK) behave as for the final name. The file gets ``0666 & ~umask``. On error the
    temporary file is removed and ``path`` is untouched.
    """
    path = check_not_overwriting(path, overwrite)
    _make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".part" + "".join(path.suffixes), dir=path.parent
        )
    except OSError as exc:
        raise _writable_error(path.parent, exc) from exc
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield tmp_path
        _fsync_path(tmp_path)
        os.replace(tmp_path, path)
        _fsync_path(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put folder ``tmp`` at ``path``; an existing ``path`` is swapped out (never absent) and removed."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp)  # now holds the old folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, old / path.name)
    os.replace(tmp, path)
    shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success flush its files and swap it in (e.g. a DICOM series).

    The folder gets ``0777 & ~umask``; replacing an existing ``path`` leaves no moment without either folder
    (see the module docstring).
    """
    path = check_not_overwriting(path, overwrite)
    _make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    except OSError as exc:
        raise _writable_error(path.parent, exc) from exc
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        for dirpath, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_path(Path(dirpath) / name)
            _fsync_path(Path(dirpath))
        _replace_dir(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what :func:`atomic_path` / :func:`atomic_dir` left for ``path`` when their process was killed before
    the rename: the files and folders ``.<name>.*.part*`` next to it. Returns what was removed. Call it only where no
    live writer can own them (while holding ``path``'s claim, :mod:`medfusion.io.claim`)."""
    import glob

    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for stale in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.part*")):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
