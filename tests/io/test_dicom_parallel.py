"""Header parsing in worker processes and pixel reading from recorded offsets: the same series, the same voxels."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pydicom
import pytest
from io_helpers import ct_small_series, dicom_test_file
from pydicom.uid import generate_uid

from medfusion.io.dicom import discover_series, read_series
from medfusion.io.dicom import discovery as discovery_module
from medfusion.io.dicom import read as read_module
from medfusion.io.dicom.discovery import parse_workers


def _mixed_folder(root):
    """Two acquisitions of one series, a localizer, a SEG object, an RLE-compressed (derived) MR, a copy of a file
    and a text file."""
    uid = generate_uid()
    ct_small_series(root / "a" / "phase1", n=4, series_uid=uid)
    for path in ct_small_series(root / "a" / "phase2", n=4, series_uid=uid, shuffle_seed=1):
        ds = pydicom.dcmread(path)
        ds.AcquisitionNumber = 3
        ds.save_as(path)
    for path in ct_small_series(root / "loc", n=2):
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    plain = ct_small_series(root / "b", n=5)
    shutil.copy(plain[0], root / "b" / "zz_copy_of_first")
    shutil.copy(dicom_test_file("liver_1frame.dcm"), root / "seg")
    shutil.copy(dicom_test_file("MR_small_RLE.dcm"), root / "rle")
    (root / "README.txt").write_text("not dicom")
    return root


def _summary(found):
    series = [
        (s.series_uid, s.part, s.split_reason, s.meta, s.frames, [f.pixel_ref for f in s.frames])
        for s in found.series
    ]
    return series, [(s.paths, s.reason, s.series_uid, s.description) for s in found.skipped]


def test_parallel_discovery_equals_serial_and_reads_the_same_voxels(tmp_path):
    root = _mixed_folder(tmp_path / "export")
    serial = discover_series(root, workers=1, include_derived=True)
    parallel = discover_series(root, workers=2, include_derived=True)
    assert _summary(parallel) == _summary(serial)
    reasons = " | ".join(s.reason for s in parallel.skipped)
    assert "localizer" in reasons and "Modality SEG" in reasons and "not DICOM" in reasons
    assert "another copy" in reasons
    assert len(parallel.series) == 4  # two acquisitions, series b, the RLE MR
    for a, b in zip(serial.series, parallel.series):
        np.testing.assert_array_equal(read_series(a).array, read_series(b).array)


def test_uncompressed_files_are_read_from_their_offsets_without_a_second_parse(tmp_path, monkeypatch):
    files = ct_small_series(tmp_path / "ct", n=4, shuffle_seed=None)
    found = discover_series(tmp_path / "ct", workers=2)  # parsed in other processes: nothing cached here
    (series,) = found.series
    assert all(f.pixel_ref is not None for f in series.frames)

    def no_decode(*args, **kwargs):
        raise AssertionError("the file was parsed again")

    monkeypatch.setattr(read_module, "_decode", no_decode)
    volume = read_series(series)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[:, :, k], expected.T)


def test_compressed_files_have_no_offset_and_are_decoded():
    found = discover_series(dicom_test_file("MR_small_RLE.dcm"), include_derived=True)
    assert found.series[0].frames[0].pixel_ref is None
    np.testing.assert_array_equal(
        read_series(found.series[0]).array,
        read_series(dicom_test_file("MR_small.dcm")).array,
    )


def test_a_file_changed_after_discovery_is_read_again(tmp_path):
    files = ct_small_series(tmp_path / "ct", n=3, shuffle_seed=None)
    (series,) = discover_series(tmp_path / "ct", workers=2).series
    ds = pydicom.dcmread(files[1])
    changed = (ds.pixel_array + 7).astype(np.int16)
    ds.PixelData = changed.tobytes()  # same size, other values
    ds.save_as(files[1])
    stat = os.stat(files[1])
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    volume = read_series(series)
    np.testing.assert_array_equal(
        volume.array[:, :, 1], (changed * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).T
    )


def _crash(paths):
    os._exit(3)  # a worker killed (e.g. by the OOM killer)


def test_a_broken_worker_pool_falls_back_to_this_process(tmp_path, monkeypatch):
    root = _mixed_folder(tmp_path / "export")
    serial = discover_series(root, workers=1)

    monkeypatch.setattr(discovery_module, "_parse_chunk", _crash)
    assert _summary(discover_series(root, workers=2)) == _summary(serial)


def test_parse_workers():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        parse_workers(100, 0)
    assert parse_workers(5) == 1  # a small folder is parsed here
    assert parse_workers(10_000, 3) == 3
    assert 1 <= parse_workers(10_000) <= 8


def test_metadata_of_a_file_gone_since_parsing_is_empty_not_an_error(tmp_path):
    (path,) = ct_small_series(tmp_path / "ct", n=1)
    assert discovery_module._meta(path)["Modality"] == "CT"
    path.unlink()
    meta = discovery_module._meta(path)
    assert meta["Modality"] is None and meta["SeriesInstanceUID"] is None
