"""Helpers for tests/io: builders of small DICOM series in temporary folders (from pydicom's CT_small.dcm and generated volumes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def dicom_test_file(name: str) -> Path:
    """A pydicom / pydicom-data test file, offline (``download=False``)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path)


def ct_small_series(
    folder: Path,
    n: int = 5,
    step: float = 5.0,
    *,
    series_uid: str | None = None,
    shuffle_seed: int | None = 0,
    lateral_shift: float = 0.0,
) -> list[Path]:
    """An ``n``-slice CT series from CT_small.dcm: slice k has raw pixels + 10 k and IPP z + k * step.

    File names and InstanceNumbers are shuffled (so sorting must use positions); returns files in slice order.
    """
    import pydicom
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(dicom_test_file("CT_small.dcm"))
    pixels = base.pixel_array.astype(np.int16)
    series_uid = series_uid or generate_uid()
    order = np.arange(n) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(n)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    x0, y0, z0 = (float(v) for v in base.ImagePositionPatient)
    for k in range(n):
        ds = base.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = int(n - order[k])
        ds.ImagePositionPatient = [x0 + k * lateral_shift, y0, z0 + k * step]
        ds.PixelData = (pixels + 10 * k).astype(np.int16).tobytes()
        path = folder / f"img_{order[k]:03d}"
        ds.save_as(path)
        files.append(path)
    return files


def oblique_affine(spacing=(0.7, 0.8, 2.5), angles=(0.3, 0.2), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """A RAS+ affine rotated about z then x (an oblique acquisition)."""
    a, b = angles
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rx @ rz @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def sitk_affine_ras(image) -> np.ndarray:
    """SimpleITK image geometry -> 4x4 voxel -> RAS+ affine (ITK is LPS+)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def sitk_read_series(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def convert_command(*argv: object) -> int:
    """Run ``medfusion convert ARGV`` through the command line's entry point; return its exit status."""
    from medfusion.cli import main

    return main(["convert", *(str(a) for a in argv)])
