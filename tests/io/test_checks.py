"""``medfusion.io.checks``: what a CT model can be given, each refusal saying what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from medfusion.io.checks import MIN_SPAN_FRACTION, check_scan, check_window

WINDOW = (-1000.0, 1000.0)


def _ct(shape=(16, 16, 3)) -> np.ndarray:
    vol = np.full(shape, -1000.0, np.float32)
    vol[4:12, 4:12] = 40.0
    return vol


@pytest.mark.parametrize("dims", [2, 3])
def test_a_ct_in_hu_passes_and_int16_storage_too(dims):
    check_scan(_ct(), spatial_dims=dims, hu_window=WINDOW)
    check_scan(_ct().astype(np.int16), spatial_dims=dims, hu_window=WINDOW)
    check_scan(_ct()[..., 0], spatial_dims=2, hu_window=WINDOW)  # one slice for a 2D model


@pytest.mark.parametrize(
    "array, dims, message",
    [
        (np.zeros((0, 16, 3), np.float32), 2, r"empty image \(shape \(0, 16, 3\)\)"),
        (
            np.stack([_ct(), _ct()], -1),
            2,
            r"a 4D series \(time points or channels\) of shape \(16, 16, 3, 2\)",
        ),
        (np.zeros(16, np.float32), 2, "a 1D array"),
        (_ct()[..., 0], 3, r"a 2D image of shape \(16, 16\) given to a 3D model"),
        (np.where(_ct() > 0, np.nan, _ct()), 2, "192 NaN and 0 infinite voxels of 768"),
        (np.where(_ct() > 0, -np.inf, _ct()), 2, "0 NaN and 192 infinite voxels"),
        (
            _ct() + 3000.0,
            2,
            r"no voxel inside the model's HU window \[-1000, 1000\] \(values span \[2000, 3040\]\)",
        ),
        (np.full((16, 16, 3), 40.0, np.float32), 2, r"values span only \[40, 40\]"),
        ((_ct() + 1000.0) / 2000.0, 2, "already normalised"),
        (_ct().astype(np.complex64), 2, "real numbers"),
    ],
    ids=["empty", "4d", "1d", "2d-for-3d", "nan", "inf", "raw-values", "constant", "normalised", "complex"],
)
def test_what_cannot_go_through_a_ct_model_is_refused_saying_why(array, dims, message):
    with pytest.raises(ValueError, match=message):
        check_scan(array, spatial_dims=dims, hu_window=WINDOW)


def test_the_span_limit_is_a_fraction_of_the_window():
    width = WINDOW[1] - WINDOW[0]
    vol = np.zeros((8, 8), np.float32)
    vol[0, 0] = MIN_SPAN_FRACTION * width  # exactly the limit: accepted
    check_scan(vol, spatial_dims=2, hu_window=WINDOW)
    vol[0, 0] *= 0.99
    with pytest.raises(ValueError, match="under 1% of the HU window"):
        check_scan(vol, spatial_dims=2, hu_window=WINDOW)
    check_scan(vol, spatial_dims=2, hu_window=(-10.0, 10.0))  # a narrow window: the same span is enough


@pytest.mark.parametrize("window", [(0.0, 0.0), (100.0, -100.0), (float("nan"), 1.0), (-1.0, float("inf"))])
def test_a_window_must_be_finite_and_increasing(window):
    with pytest.raises(ValueError, match="--hu-window must be two finite values LOW < HIGH"):
        check_window(window, "--hu-window")
    assert check_window((-1000, 1000)) == (-1000.0, 1000.0)
