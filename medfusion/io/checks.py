"""Checks of a scan's voxels before a model sees it: shape, finite values, and values that are Hounsfield units.

A model trained on CT maps its HU window ``(low, high)`` linearly to [-1, 1] (:mod:`medfusion.data.pipelines`);
voxels outside the window keep their input value. Fed something that is not a CT in HU, such a model returns
plausible-looking numbers without complaint, so the volume commands refuse, with one line naming what is wrong:

* an array with no voxels, or not 2D / 3D (a 4D series, a multi-channel image): one 2D or 3D scan per file;
* a 2D image given to a 3D model (a 2D model runs a 3D volume slice by slice, so that way round is fine);
* NaN or infinite voxels (IEEE 754 non-finite values have no HU, and one NaN spreads through every convolution);
* no voxel inside the HU window (raw stored values, e.g. 0..4095 without RescaleSlope / RescaleIntercept, or
  another modality);
* values spanning under 1 % of the window's width: a constant image, or one already normalised to [0, 1] or
  [-1, 1] (a CT slab of air and tissue spans hundreds of HU).
"""

from __future__ import annotations

import numpy as np

MIN_SPAN_FRACTION = 0.01
"""Smallest ``(max - min) / (high - low)`` a scan may span (1 %: 20 HU of the usual [-1000, 1000] window)."""


def check_window(hu_window: tuple[float, float], what: str = "HU window") -> tuple[float, float]:
    """``(low, high)`` as floats; ``ValueError`` unless both are finite and ``low < high``."""
    low, high = (float(v) for v in hu_window)
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"{what} must be two finite values LOW < HIGH in HU, got ({low:g}, {high:g})")
    return low, high


def check_scan(array: np.ndarray, *, spatial_dims: int, hu_window: tuple[float, float]) -> None:
    """``ValueError`` saying what is wrong when ``array`` (HU, ``(I, J)`` or ``(I, J, K)``) cannot go through a
    ``spatial_dims``-D model trained on ``hu_window`` (see the module docstring); returns None when it can."""
    arr = np.asarray(array)
    if arr.size == 0:
        raise ValueError(f"empty image (shape {arr.shape}): it has no voxels")
    if arr.ndim not in (2, 3):
        what = "a 4D series (time points or channels)" if arr.ndim == 4 else f"a {arr.ndim}D array"
        raise ValueError(
            f"{what} of shape {arr.shape}: one 2D or 3D scan per file expected (split it into 3D volumes first)"
        )
    if spatial_dims == 3 and arr.ndim == 2:
        raise ValueError(
            f"a 2D image of shape {arr.shape} given to a 3D model: use a 2D model or a 3D volume"
        )
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"voxels of type {arr.dtype}: expected real numbers (HU)")
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        raise ValueError(
            f"{n_nan} NaN and {n_inf} infinite voxels of {arr.size}: every voxel must be a finite HU value"
        )
    low, high = check_window(hu_window)
    lo, hi = float(arr.min()), float(arr.max())
    if not ((arr >= low) & (arr <= high)).any():
        raise ValueError(
            f"no voxel inside the model's HU window [{low:g}, {high:g}] (values span [{lo:g}, {hi:g}]): "
            "not a CT in Hounsfield units (raw stored values, or another modality?)"
        )
    if hi - lo < MIN_SPAN_FRACTION * (high - low):
        raise ValueError(
            f"values span only [{lo:g}, {hi:g}], under {MIN_SPAN_FRACTION:.0%} of the HU window "
            f"[{low:g}, {high:g}]: a constant image, or one already normalised, not a CT in Hounsfield units"
        )
