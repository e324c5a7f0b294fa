"""Displacement fields on disk: medfusion's voxel fields, and the ITK/ANTs convention that ITK, ANTs and SimpleITK
read and apply.

In memory medfusion fields are ``(D, *spatial)`` in **voxels**, channel ``d`` along array axis ``d``, pull
(``out(x) = in(x + u(x))``; :mod:`medfusion.fields.warp`). Both file kinds are NIfTI-1 vector images (intent
``NIFTI_INTENT_VECTOR``, 1007): the vector components lie along the 5th dimension and the 4th (time) has size 1, so
a 3D field is stored ``(X, Y, Z, 1, 3)`` and a 2D one ``(X, Y, 1, 1, 2)`` (NIfTI Data Format Working Group,
``nifti1.h``: "the vector is stored in the 5th dimension"; ITK's NIfTI IO writes displacement fields this way).

* :func:`write_voxel_field` / :func:`read_voxel_field`: our convention as it is (voxels, array axes), on the grid of
  the image's RAS+ affine; what ``medfusion augment`` writes under ``fields/`` and a ``register`` manifest's ``ddf``.
* :func:`write_displacement_field`: the ITK convention. ITK, ANTs and SimpleITK expect vectors that are physical
  displacements in **mm, LPS** world axes, applied the same way (a fixed-space point ``p`` maps to ``p + d(p)`` in
  moving space) by ``DisplacementFieldTransform``. The conversion is ``d_RAS = A u`` with ``A`` the 3×3 (or 2×2)
  part of the RAS+ voxel-to-world affine, then ``d_LPS = diag(-1, -1, 1) d_RAS``. Written with SimpleITK (it knows
  the layout ITK reads); medfusion only converts units and axes, which no library does for our array convention.

Every write is atomic (:mod:`medfusion.io.atomic`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from medfusion.io.atomic import atomic_path

_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
NIFTI_INTENT_VECTOR = 1007


class VoxelField(NamedTuple):
    """A displacement field read from disk: ``ddf`` ``(D, *spatial)`` float32 in voxels (channel ``d`` along array
    axis ``d``, pull) and the RAS+ voxel-to-world ``affine`` (4, 4) of its grid."""

    ddf: np.ndarray
    affine: np.ndarray


def _check_field(ddf_vox: np.ndarray) -> int:
    """The number of spatial axes ``D`` of a ``(D, *spatial)`` field; ``ValueError`` for other shapes."""
    nd = ddf_vox.shape[0] if ddf_vox.ndim else 0
    if nd not in (2, 3) or ddf_vox.ndim != nd + 1:
        raise ValueError(
            f"field must be (D, *spatial) with D = 2 or 3 spatial axes, got shape {ddf_vox.shape}"
        )
    return nd


def _check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(
            f"affine must be a finite 4x4 matrix (RAS+ voxel-to-world), got shape {affine.shape}"
        )
    return affine


def voxel_to_mm_lps(ddf_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``(D, *spatial)`` voxel displacements -> ``(*spatial, D)`` physical LPS displacements in mm."""
    ddf_vox = np.asarray(ddf_vox, dtype=np.float64)
    nd = _check_field(ddf_vox)
    lin = _check_affine(affine)[:nd, :nd]
    ras = np.einsum("ij,j...->...i", lin, ddf_vox)
    return ras * _RAS_TO_LPS[:nd]


def write_voxel_field(
    path: str | os.PathLike, ddf_vox: np.ndarray, affine: np.ndarray, *, overwrite: bool = False
) -> Path:
    """Write a voxel-unit field ``(D, *spatial)`` on the grid ``affine`` (RAS+) as a NIfTI vector image.

    Layout ``(X, Y, Z, 1, D)`` (2D: ``(X, Y, 1, 1, 2)``), float32, intent vector, the affine as sform and qform
    (code 1); the values stay in voxels along the array axes (:func:`read_voxel_field` reads them back exactly).
    """
    import nibabel as nib

    ddf_vox = np.asarray(ddf_vox, dtype=np.float32)
    nd = _check_field(ddf_vox)
    affine = _check_affine(affine)
    spatial = ddf_vox.shape[1:] + (1,) * (3 - nd)
    vec = np.moveaxis(ddf_vox, 0, -1).reshape(*spatial, 1, nd)
    img = nib.Nifti1Image(vec, affine)
    img.header.set_intent("vector", (), name="voxel ddf")
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def read_voxel_field(path: str | os.PathLike, spatial_dims: int | None = None) -> VoxelField:
    """Read a field written by :func:`write_voxel_field` (also the older ``(X, Y, Z, 3)`` 3D layout).

    Args:
        path: the NIfTI file.
        spatial_dims: 2 or 3 to require that many axes, None for either.

    Raises:
        FileNotFoundError: no file at ``path``. ValueError (naming the file): not a 2D/3D vector field, wrong
            number of axes, or non-finite values.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no displacement-field file at {path}")
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    intent = int(img.header["intent_code"])
    if data.ndim == 5 and data.shape[3] == 1 and data.shape[4] in (2, 3) and intent == NIFTI_INTENT_VECTOR:
        nd = data.shape[4]
        if nd == 2 and data.shape[2] != 1:
            raise ValueError(
                f"{path}: a 2-component field needs a third axis of size 1, got shape {data.shape}"
            )
        ddf = np.moveaxis(data.reshape(*data.shape[:nd], nd), -1, 0)
    elif data.ndim == 4 and data.shape[3] == 3:
        ddf = np.moveaxis(data, -1, 0)
    else:
        raise ValueError(
            f"{path}: not a displacement field: expected a NIfTI vector image (X, Y, Z, 1, 3) or (X, Y, 1, 1, 2) "
            f"with intent vector, got shape {data.shape}, intent code {intent}"
        )
    if spatial_dims is not None and ddf.shape[0] != spatial_dims:
        raise ValueError(f"{path}: a {ddf.shape[0]}D field where a {spatial_dims}D one is needed")
    if not np.all(np.isfinite(ddf)):
        raise ValueError(f"{path}: the field has NaN or infinite values")
    return VoxelField(np.ascontiguousarray(ddf), np.asarray(img.affine, dtype=np.float64))


def write_displacement_field(
    path: str | os.PathLike, ddf_vox: np.ndarray, affine: np.ndarray, *, overwrite: bool = False
) -> Path:
    """Write a voxel-unit field ``(D, *spatial)`` on the grid ``affine`` (RAS+) as an ITK displacement field NIfTI.

    The file (``(X, Y, Z, 1, 3)`` or ``(X, Y, 1, 1, 2)``, intent vector, mm, LPS) reads in SimpleITK/ITK/ANTs as a
    ``DisplacementFieldTransform`` on the same grid, and ``sitk.Resample(moving, fixed, transform)`` resamples a
    moving image exactly as :func:`medfusion.fields.warp` does with the voxel field (tested).
    """
    import SimpleITK as sitk

    nd = _check_field(np.asarray(ddf_vox))
    vec = voxel_to_mm_lps(ddf_vox, affine)  # (*spatial, D), numpy axis order i, j, k
    # SimpleITK's numpy view is (k, j, i, D): transpose the spatial axes
    img = sitk.GetImageFromArray(
        np.ascontiguousarray(vec.transpose(*range(nd - 1, -1, -1), nd)), isVector=True
    )
    affine = np.asarray(affine, dtype=np.float64)
    flip = np.diag(_RAS_TO_LPS[:nd])
    lin = flip @ affine[:nd, :nd]
    spacing = np.linalg.norm(lin, axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin((flip @ affine[:nd, 3]).tolist())
    img.SetDirection((lin / spacing).flatten().tolist())
    with atomic_path(path, overwrite=overwrite) as tmp:
        sitk.WriteImage(img, str(tmp))
    return Path(path)
