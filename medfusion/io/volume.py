"""The in-memory image: a voxel array, its voxel -> world affine and acquisition metadata.

Conventions (shared by every reader and writer in medfusion):

* ``array`` is indexed ``[i, j, k]`` (2D images: ``[i, j]``) in NIfTI/nibabel voxel order. For DICOM,
  ``i`` is the column index, ``j`` the row index and ``k`` the slice index sorted along the slice normal.
* ``affine`` is the 4x4 voxel -> world matrix in **RAS+ millimetres** (the NIfTI / nibabel convention).
  DICOM patient coordinates are LPS+, so ``affine = diag(-1, -1, 1, 1) @ affine_lps``.
* Spacing is the column norms of the affine (never its diagonal, which is wrong for oblique scans).
* CT intensities are Hounsfield units (float32) after RescaleSlope / RescaleIntercept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 2D or 3D image with its geometry.

    Args:
        array: voxel values, shape ``(I, J)`` or ``(I, J, K)``; HU for CT.
        affine: ``(4, 4)`` voxel index -> RAS+ world position in mm.
        meta: acquisition parameters (DICOM keywords such as ``Manufacturer``, ``KVP``, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm per spatial array axis (column norms of the affine); a 4D ``array[i, j, k, t]`` gives
        three values (the affine is spatial; time points are listed in ``meta["time_values"]``)."""
        return voxel_spacing(self.affine, min(self.array.ndim, 3))

    @property
    def affine_lps(self) -> np.ndarray:
        """The affine in DICOM / ITK LPS+ world coordinates."""
        return LPS_TO_RAS @ self.affine


def voxel_spacing(affine: np.ndarray, ndim: int = 3) -> tuple[float, ...]:
    """Spacing in mm of the first ``ndim`` voxel axes: the norms of the affine's columns."""
    affine = np.asarray(affine, dtype=float)
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :ndim], axis=0))
