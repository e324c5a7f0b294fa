"""The fast reading path: uncompressed pixel data straight from the bytes (oracle: pydicom's ``pixel_array``), and
``read_series(keep_int16=True)`` (the same values as the float32 path, as int16 only where that is exact)."""

from __future__ import annotations

import numpy as np
import pytest
from io_helpers import ct_small_series, dicom_test_file

from medfusion.io.dicom import read_series
from medfusion.io.dicom.pixels import native_pixels as _native_pixels

# greyscale, uncompressed little-endian files of pydicom's test data: 8 / 16 / 32 bits, signed and unsigned,
# BitsStored < BitsAllocated, single- and multi-frame
NATIVE_FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR2_UNCI.dcm",
    "emri_small.dcm",
    "rtdose.dcm",
    "693_UNCI.dcm",
]
# palette colour, 1-bit, RGB, big endian, JPEG 2000: pydicom decodes them
OTHER_FILES = ["OBXXXX1A.dcm", "liver_1frame.dcm", "SC_rgb.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm"]


@pytest.mark.parametrize("name", NATIVE_FILES)
def test_native_pixels_equal_pydicom(name):
    import pydicom

    ds = pydicom.dcmread(dicom_test_file(name))
    syntax = ds.file_meta.TransferSyntaxUID
    fast = _native_pixels(ds, syntax)
    expected = ds.pixel_array
    assert fast.dtype == expected.dtype and fast.shape == expected.shape
    np.testing.assert_array_equal(fast, expected)


@pytest.mark.parametrize("signed", [0, 1])
def test_native_pixels_ignore_bits_above_bits_stored(tmp_path, signed):
    """BitsStored 12 of 16 with garbage in the 4 high bits: shifted out (sign-extended when signed), as pydicom."""
    import pydicom

    ds = pydicom.dcmread(dicom_test_file("CT_small.dcm"))
    values = np.random.default_rng(0).integers(0, 1 << 16, (ds.Rows, ds.Columns), dtype=np.uint16)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, signed
    ds.PixelData = values.tobytes()
    ds.save_as(tmp_path / "x.dcm")
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    fast = _native_pixels(ds, ds.file_meta.TransferSyntaxUID)
    np.testing.assert_array_equal(fast, ds.pixel_array)
    assert fast.min() >= (-2048 if signed else 0) and fast.max() <= (2047 if signed else 4095)


@pytest.mark.parametrize("name", OTHER_FILES)
def test_other_pixel_data_is_left_to_pydicom(name):
    import pydicom

    ds = pydicom.dcmread(dicom_test_file(name))
    assert _native_pixels(ds, ds.file_meta.TransferSyntaxUID) is None


def test_keep_int16_gives_the_float_values_as_int16(tmp_path):
    files = ct_small_series(tmp_path / "ct", n=4)
    as_float = read_series(files)
    as_int = read_series(files, keep_int16=True)
    assert as_float.array.dtype == np.float32 and as_int.array.dtype == np.int16
    np.testing.assert_array_equal(as_int.array, as_float.array)
    np.testing.assert_array_equal(as_int.affine, as_float.affine)


def test_keep_int16_stays_float_where_int16_is_not_exact(tmp_path):
    """A fractional slope, or values beyond int16 after rescaling, keep the float32 array."""
    import pydicom

    files = ct_small_series(tmp_path / "ct", n=3)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = 0.5
        ds.save_as(path)
    assert read_series(files, keep_int16=True).array.dtype == np.float32
    for path in files:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = 1, 32000
        ds.save_as(path)
    volume = read_series(files, keep_int16=True)
    assert volume.array.dtype == np.float32 and volume.array.max() > 32767


def test_quiet_reading_skips_validation_only_where_it_would_just_warn():
    from pydicom import config

    from medfusion.io.dicom.header import quiet_reading

    settings = config.settings
    before = settings.reading_validation_mode
    try:
        for mode, inside in ((config.WARN, config.IGNORE), (config.RAISE, config.RAISE)):
            settings.reading_validation_mode = mode
            with quiet_reading():
                assert settings.reading_validation_mode == inside
            assert settings.reading_validation_mode == mode  # restored
    finally:
        settings.reading_validation_mode = before


@pytest.mark.parametrize(
    "dtype, slope, intercept",
    [("<u2", 1, -1024), ("<u2", 1, -32768), ("<i2", 1, 0), ("<i2", 2, -1), ("<u1", 3, -100), ("<i2", 1, 32768)],
)
def test_int16_rescale_is_exact_where_results_fit(dtype, slope, intercept):
    """``stored * slope + intercept`` in wrapped int16 arithmetic equals the exact result whenever that fits int16
    (uint16 values above 32767 and an intercept of +32768 included)."""
    from medfusion.io.dicom.read import _rescale_int16

    info = np.iinfo(np.dtype(dtype))
    lo = max(info.min, -(-(-32768 - intercept) // slope))
    hi = min(info.max, (32767 - intercept) // slope)
    values = np.random.default_rng(0).integers(lo, hi, size=(30, 20), endpoint=True).astype(dtype)
    values[0, :2] = lo, hi  # both ends of the range
    exact = values.astype(np.int64) * slope + intercept
    out = np.empty((20, 30), dtype=np.int16, order="F")
    _rescale_int16(values.T, slope, intercept, out)
    np.testing.assert_array_equal(out, exact.T)
