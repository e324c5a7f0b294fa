"""Displacement fields on disk in the ITK/ANTs convention, so that ITK, ANTs and SimpleITK read and apply them.

In memory medfusion fields are ``(D, *spatial)`` in **voxels**, channel ``d`` along array axis ``d``, pull
(``out(x) = in(x + u(x))``; :mod:`medfusion.fields.warp`). ITK, ANTs and SimpleITK expect a vector image whose
vectors are physical displacements in **mm, LPS** world axes, applied the same way (a fixed-space point ``p`` maps
to ``p + d(p)`` in moving space) by ``DisplacementFieldTransform``. The conversion is ``d_RAS = A u`` with ``A``
the 3×3 (or 2×2) part of the RAS+ voxel-to-world affine, then ``d_LPS = diag(-1, -1, 1) d_RAS``.

Written with SimpleITK (it knows the NIfTI vector-intent layout ITK reads); medfusion only converts units and
axes, which no library does for our array convention. Output is atomic (:mod:`medfusion.io.atomic`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medfusion.io.atomic import atomic_path

_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def voxel_to_mm_lps(ddf_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``(D, *spatial)`` voxel displacements -> ``(*spatial, D)`` physical LPS displacements in mm."""
    ddf_vox = np.asarray(ddf_vox, dtype=np.float64)
    nd = ddf_vox.shape[0]
    if nd not in (2, 3) or ddf_vox.ndim != nd + 1:
        raise ValueError(
            f"field must be (D, *spatial) with D = 2 or 3 spatial axes, got shape {ddf_vox.shape}"
        )
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4 (RAS+ voxel-to-world), got {affine.shape}")
    lin = affine[:nd, :nd]
    ras = np.einsum("ij,j...->...i", lin, ddf_vox)
    return ras * _RAS_TO_LPS[:nd]


def write_displacement_field(
    path: str | os.PathLike, ddf_vox: np.ndarray, affine: np.ndarray, *, overwrite: bool = False
) -> Path:
    """Write a voxel-unit field ``(D, *spatial)`` on the grid ``affine`` (RAS+) as an ITK displacement field NIfTI.

    The file reads in SimpleITK/ITK/ANTs as a ``DisplacementFieldTransform`` (mm, LPS) that resamples a moving
    image exactly as :func:`medfusion.fields.warp` does with the voxel field (tested).
    """
    import SimpleITK as sitk

    nd = np.asarray(ddf_vox).shape[0]
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
