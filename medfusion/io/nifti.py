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
            write_gzip(tmp, _single_file_bytes(img, array))
        else:
            nib.save(img, str(tmp))
    return path


def _single_file_bytes(img, array: np.ndarray) -> bytes:
    """The bytes of a single-file NIfTI-1 (``.nii``): the 348-byte header, an empty extension flag, the voxels in
    Fortran order from ``vox_offset`` 352, and no scaling (``scl_slope`` 1, ``scl_inter`` 0), as nibabel writes
    them (its ``to_bytes`` is several times slower); nibabel's own writer where the types differ."""
    header = img.header.copy()
    if array.dtype != header.get_data_dtype() or not array.dtype.isnative:
        return img.to_bytes()
    header.set_data_offset(352)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    voxels = array.T if array.flags.f_contiguous else np.asfortranarray(array).T  # C order of the transpose
    return b"".join((header.binaryblock, b"\0\0\0\0", memoryview(voxels).cast("B")))


GZIP_LEVEL = 1  # nibabel's default for .nii.gz (fast; CT compresses about as well as at level 6)
_CHUNK = 1 << 22  # 4 MiB of input per deflate block run
_WINDOW = 1 << 15  # deflate's 32 KiB window: each chunk is primed with the end of the previous one


def _deflate_chunk(data: memoryview, start: int, end: int, level: int) -> bytes:
    """Raw deflate of ``data[start:end]``, primed with the 32 KiB before it; ends byte-aligned (sync flush) or,
    for the last chunk, with the final block."""
    if start:
        comp = zlib.compressobj(
            level,
            zlib.DEFLATED,
            -15,
            9,
            zlib.Z_DEFAULT_STRATEGY,
            bytes(data[start - _WINDOW if start > _WINDOW else 0 : start]),
        )
    else:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
    last = end >= len(data)
    return comp.compress(data[start:end]) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def write_gzip(
    path: str | os.PathLike, data: bytes, level: int = GZIP_LEVEL, threads: int | None = None
) -> None:
    """Write ``data`` to ``path`` as one standard gzip member (RFC 1952), compressed in parallel threads.

    The input is cut into fixed 4 MiB chunks, each deflated on its own thread (zlib releases the GIL) with the
    previous 32 KiB as its dictionary and ended with a sync flush, so that the pieces join into one valid deflate
    stream (RFC 1951), the method of pigz. Any gzip reader (nibabel, ITK, dcm2niix, ``gzip -d``) reads it; the
    bytes depend only on ``data`` and ``level``, never on the number of threads.
    """
    view = memoryview(data)
    starts = range(0, max(len(view), 1), _CHUNK)
    threads = threads or min(len(starts), os.cpu_count() or 1)
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            pieces = list(pool.map(lambda a: _deflate_chunk(view, a, a + _CHUNK, level), starts))
    else:
        pieces = [_deflate_chunk(view, a, a + _CHUNK, level) for a in starts]
    xfl = 4 if level == 1 else (2 if level == 9 else 0)
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([xfl, 255])  # no name, mtime 0, OS unknown
    with open(path, "wb") as f:
        f.write(header)
        for piece in pieces:
            f.write(piece)
        f.write(struct.pack("<II", zlib.crc32(view) & 0xFFFFFFFF, len(view) & 0xFFFFFFFF))
