"""NIfTI read / write with an explicit RAS+ affine (nibabel does the format; this adds atomic writes,
the sform/qform codes, 2D support and the JSON sidecar next to the image).

The header follows the NIfTI-1 standard (NIfTI Data Format Working Group, ``nifti1.h``): the affine is stored
as both sform and qform with code 1 (scanner anatomical), units mm and s (``xyzt_units``), and the time step of
a 4D series in ``pixdim[4]``. The sidecar sits next to the image with the same stem and ``.json``, as BIDS and
dcm2niix write it.

Why not plain ``nibabel.save``: an interrupted batch job must never leave a half-written ``.nii.gz`` under
its final name, so every write goes through :func:`medfusion.io.atomic.atomic_path`.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medfusion.io.atomic import atomic_path
from medfusion.io.volume import Volume, voxel_spacing

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def sidecar_path(path: str | os.PathLike) -> Path:
    """``scan.nii.gz`` -> ``scan.json`` (same folder, same stem)."""
    path = Path(path)
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    raise ValueError(f"{path} is not a NIfTI file name; valid suffixes: {', '.join(NIFTI_SUFFIXES)}")


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file to a :class:`Volume` (array in the file's voxel order, RAS+ affine).

    ``scl_slope`` / ``scl_inter`` are applied (the array is float then). The JSON sidecar next to the
    file, if present, is loaded into ``meta``; ``meta["spacing"]`` holds the column norms of the affine.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no NIfTI file at {path}")
    img = nib.load(str(path))
    array = np.asanyarray(img.dataobj)
    affine = np.asarray(img.affine, dtype=float)
    meta: dict = {}
    try:
        side = sidecar_path(path)
    except ValueError:
        side = None
    if side is not None and side.is_file():
        meta.update(json.loads(side.read_text()))
    meta["spacing"] = list(voxel_spacing(affine, min(array.ndim, 3)))
    return Volume(array=array, affine=affine, meta=meta)


def write_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    overwrite: bool = False,
    dtype: np.dtype | str | None = None,
    time_step: float | None = None,
) -> Path:
    """Write ``array`` with the RAS+ ``affine`` to ``path`` (``.nii`` or ``.nii.gz``) atomically.

    Args:
        path: output file; must end in ``.nii`` or ``.nii.gz``.
        array: ``(I, J)`` or ``(I, J, K[, ...])`` voxel values; a 2D array writes a 2D NIfTI.
        affine: ``(4, 4)`` voxel -> RAS+ mm; stored as sform and qform (code 1, scanner).
        overwrite: replace an existing file instead of raising ``FileExistsError``.
        dtype: on-disk data type (default: the array's). Integer output from float input is rounded
            and must fit the type, otherwise ``ValueError``.
        time_step: seconds between the volumes of a 4D array (``pixdim[4]``, units mm / s); 4D arrays only.
    """
    import nibabel as nib

    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: valid NIfTI suffixes are {', '.join(NIFTI_SUFFIXES)}")
    array = np.asarray(array)
    if array.ndim < 2:
        raise ValueError(f"array must be at least 2D, got shape {array.shape}")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if time_step is not None and (array.ndim != 4 or not np.isfinite(time_step) or time_step <= 0):
        raise ValueError(
            f"time_step needs a 4D array and a finite value > 0 s, got {time_step} for shape {array.shape}"
        )
    if dtype is not None:
        dtype = np.dtype(dtype)
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
            rounded = np.rint(array)
            info = np.iinfo(dtype)
            if rounded.size and (rounded.min() < info.min or rounded.max() > info.max):
                raise ValueError(
                    f"values [{rounded.min()}, {rounded.max()}] do not fit {dtype} [{info.min}, {info.max}]"
                )
            array = rounded
        array = array.astype(dtype, copy=False)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    if time_step is not None:
        zooms = list(img.header.get_zooms())
        zooms[3] = float(time_step)
        img.header.set_zooms(zooms)
    with atomic_path(path, overwrite=overwrite) as tmp:
        if path.name.endswith(".gz"):
            write_gzip(tmp, _single_file_parts(img, array))
        else:
            nib.save(img, str(tmp))
    return path


def _single_file_parts(img, array: np.ndarray) -> list:
    """The bytes of a single-file NIfTI-1 (``.nii``) as consecutive buffers, without copying the voxels: the
    348-byte header with an empty extension flag, then the voxels in Fortran order from ``vox_offset`` 352, with no
    scaling (``scl_slope`` 1, ``scl_inter`` 0), as nibabel writes them (its ``to_bytes`` is several times slower);
    nibabel's own bytes where the types differ."""
    header = img.header.copy()
    if array.dtype != header.get_data_dtype() or not array.dtype.isnative:
        return [img.to_bytes()]
    header.set_data_offset(352)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    voxels = array.T if array.flags.f_contiguous else np.asfortranarray(array).T  # C order of the transpose
    return [header.binaryblock + b"\0\0\0\0", memoryview(voxels).cast("B")]


def _deflate_engine():
    """ISA-L's deflate (python-isal, Intel's ISA-L: several times faster than zlib at the same ratio) when it is
    installed, else Python's zlib; both write standard raw deflate (RFC 1951)."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib
    return isal_zlib


# the fast level of each engine: ISA-L level 2 (of 0-3) compresses CT as well as zlib 1 to 6 (nibabel's default
# for .nii.gz is zlib 1), at several times its speed
GZIP_LEVELS = {"isal_zlib": 2, "zlib": 1}
_CHUNK = 1 << 22  # 4 MiB of input per deflate block run
_WINDOW = 1 << 15  # deflate's 32 KiB window: each chunk is primed with the 32 KiB before it


def _deflate_chunk(engine, part: memoryview, before: memoryview, start: int, level: int, last: bool) -> bytes:
    """Raw deflate of ``part[start:start + _CHUNK]`` primed with the (up to) 32 KiB that precede it (in ``part``, or
    at the end of the previous buffer ``before``); ends byte-aligned (sync flush), or with the final block when
    ``last``."""
    dictionary = bytes(part[max(start - _WINDOW, 0) : start]) if start else bytes(before[-_WINDOW:])
    if dictionary:
        comp = engine.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, dictionary)
    else:
        comp = engine.compressobj(level, zlib.DEFLATED, -15, 9)
    return comp.compress(part[start : start + _CHUNK]) + comp.flush(
        engine.Z_FINISH if last else engine.Z_SYNC_FLUSH
    )


def write_gzip(path: str | os.PathLike, data, level: int | None = None, threads: int | None = None) -> None:
    """Write ``data`` (bytes, or a list of consecutive buffers) to ``path`` as one standard gzip member (RFC 1952),
    compressed in parallel threads.

    Each buffer is cut into fixed 4 MiB chunks, each deflated on its own thread (zlib and ISA-L release the GIL)
    with the 32 KiB before it as its dictionary and ended with a sync flush, so that the pieces join into one valid
    deflate stream (RFC 1951), the method of pigz; the CRC-32 runs as one more task. The deflate engine is ISA-L
    (python-isal) when installed, else zlib (:func:`_deflate_engine`); ``level`` is the engine's (default
    :data:`GZIP_LEVELS`). Any gzip reader (nibabel, ITK, dcm2niix, ``gzip -d``) reads it; the bytes depend on
    the data, the engine and ``level``, never on the number of threads.
    """
    engine = _deflate_engine()
    name = engine.__name__.rsplit(".", 1)[-1]
    level = GZIP_LEVELS[name] if level is None else level
    parts = [memoryview(b).cast("B") for b in ([data] if isinstance(data, (bytes, bytearray)) else data)]
    parts = [p for p in parts if len(p)] or [memoryview(b"")]
    jobs = [
        (part, parts[i - 1] if i else memoryview(b""), start)
        for i, part in enumerate(parts)
        for start in range(0, max(len(part), 1), _CHUNK)
    ]

    def deflate(job_index: int) -> bytes:
        part, before, start = jobs[job_index]
        return _deflate_chunk(engine, part, before, start, level, job_index == len(jobs) - 1)

    def checksum() -> int:
        crc = 0
        for part in parts:
            crc = engine.crc32(part, crc)
        return crc

    threads = threads or min(len(jobs), os.cpu_count() or 1)
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            crc = pool.submit(checksum)
            pieces = list(pool.map(deflate, range(len(jobs))))
            crc32 = crc.result()
    else:
        pieces, crc32 = [deflate(i) for i in range(len(jobs))], checksum()
    size = sum(len(p) for p in parts)
    xfl = 4 if (name, level) == ("zlib", 1) else (2 if (name, level) == ("zlib", 9) else 0)
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([xfl, 255])  # no name, mtime 0, OS unknown
    with open(path, "wb") as f:
        f.write(header)
        for piece in pieces:
            f.write(piece)
        f.write(struct.pack("<II", crc32 & 0xFFFFFFFF, size & 0xFFFFFFFF))
