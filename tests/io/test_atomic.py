"""``medfusion.io.atomic``: ordinary permissions, data flushed before the rename, folders swapped in whole,
clear errors and nothing partial when the folder is read only or the disk fills up."""

from __future__ import annotations

import errno
import os
import stat
import tempfile

import pytest

from medfusion.io import atomic
from medfusion.io.atomic import atomic_dir, atomic_path, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_text_atomic(tmp_path / "a" / "x.json", "{}")
        with atomic_dir(tmp_path / "series") as folder:
            (folder / "1.dcm").write_bytes(b"x")
    finally:
        os.umask(old)
    assert _mode(path) == 0o666 & ~umask  # 0644 by default, not mkstemp's 0600
    assert _mode(tmp_path / "series") == 0o777 & ~umask
    assert _mode(tmp_path / "series" / "1.dcm") == 0o666 & ~umask


def test_data_is_flushed_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_text_atomic(tmp_path / "x.txt", "data")
    assert events[:2] == ["fsync", "replace"] and events[-1] == "fsync"  # file, rename, folder


def _fail_after(n_bytes: int):
    """A writer that writes ``n_bytes`` then fails as a full disk does."""

    def write(path):
        with open(path, "wb") as f:
            f.write(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_full_disk_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "x.nii.gz"
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            _fail_after(1000)(tmp)
    assert list((tmp_path / "out").iterdir()) == []
    # an existing output survives a failed replacement unchanged
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_path(target, overwrite=True) as tmp:
            _fail_after(10)(tmp)
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["x.nii.gz"]


def test_read_only_folder_is_a_clear_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(PermissionError, match=f"cannot write into {tmp_path}: Read-only file system"):
        write_text_atomic(tmp_path / "x.json", "{}")
    with pytest.raises(PermissionError, match="cannot write into"):
        with atomic_dir(tmp_path / "series"):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_by_permissions(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=f"cannot write into {folder}"):
            write_text_atomic(folder / "x.json", "{}")
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_replacing_a_folder_swaps_it_whole(tmp_path, monkeypatch, exchange):
    target = tmp_path / "series"
    with atomic_dir(target) as folder:
        (folder / "old.dcm").write_bytes(b"old")
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    seen = []
    real_rmtree = atomic.shutil.rmtree

    def watch(path, *args, **kwargs):  # the old folder is removed only once the new one is in place
        seen.append(sorted(p.name for p in target.iterdir()))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", watch)
    with atomic_dir(target, overwrite=True) as folder:
        (folder / "new.dcm").write_bytes(b"new")
    assert seen == [["new.dcm"]]
    assert [p.name for p in tmp_path.iterdir()] == ["series"]  # no temporary or old folder left
    assert [p.name for p in target.iterdir()] == ["new.dcm"]


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").touch()
    if not atomic._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) not supported here")
    assert [p.name for p in b.iterdir()] == ["from_a"] and list(a.iterdir()) == []


def test_remove_temporaries_takes_only_what_a_killed_write_of_that_path_left(tmp_path):
    """``atomic_path`` / ``atomic_dir`` leave ``.<name>.*.part*`` when killed before the rename; those of ``path``
    go, files and folders alike, and nothing else does (other outputs, their temporaries, claims)."""
    from medfusion.io.atomic import remove_temporaries

    mine = [tmp_path / ".a.nii.gz.x1.part.nii.gz", tmp_path / ".a.nii.gz.x2.part"]
    mine[0].write_bytes(b"half")
    mine[1].mkdir()
    (mine[1] / "IM0001.dcm").write_bytes(b"half")
    others = [tmp_path / "a.nii.gz", tmp_path / ".b.nii.gz.x3.part.nii.gz", tmp_path / ".a.nii.gz.claim"]
    for p in others:
        p.write_bytes(b"keep")
    assert sorted(remove_temporaries(tmp_path / "a.nii.gz")) == sorted(mine)
    assert sorted(tmp_path.iterdir()) == sorted(others)
    assert remove_temporaries(tmp_path / "missing" / "a.nii.gz") == []
