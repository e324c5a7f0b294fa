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
        nib.save(img, str(tmp))
    return path
