"""DICOM discovery / reading / writing: sorting, geometry vs SimpleITK, rescale, every bad-input error."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from io_helpers import ct_small_series, dicom_test_file, oblique_affine, sitk_affine_ras, sitk_read_series
from pydicom.uid import generate_uid

from medfusion.io.dicom import DicomSeriesError, discover_series, read_series, rescale_for, write_dicom_series

# ------------------------------------------------------------------------------------ sorting, geometry


def test_slices_sorted_by_position_not_name_or_instance_number(ct_series):
    raw = pydicom.dcmread(dicom_test_file("CT_small.dcm")).pixel_array.astype(np.float32)
    volume = read_series(ct_series[0].parent)
    assert volume.array.shape == (128, 128, 5)
    for k in range(5):  # slice k was written with raw + 10 k at z0 + 5 k
        np.testing.assert_array_equal(volume.array[:, :, k], (raw + 10 * k - 1024).T)
    np.testing.assert_allclose(volume.spacing, (0.661468, 0.661468, 5.0), atol=1e-6)


def test_hu_rescale_air_is_minus_1000(tmp_path):
    ds = pydicom.dcmread(dicom_test_file("CT_small.dcm"))
    assert float(ds.RescaleIntercept) == -1024
    pixels = ds.pixel_array.copy()
    pixels[:8, :8] = 24  # stored 24 -> 24 * 1 - 1024 = -1000 HU (air)
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "air.dcm")
    volume = read_series([tmp_path / "air.dcm"])
    assert volume.array.dtype == np.float32 and volume.array.shape == (128, 128)  # single slice -> 2D
    np.testing.assert_array_equal(volume.array[:8, :8], -1000.0)
    assert volume.meta["Modality"] == "CT"


@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_affine_and_voxels_agree_with_simpleitk(tmp_path, kind):
    import SimpleITK as sitk

    if kind == "axial":
        folder = ct_small_series(tmp_path / "s", n=4, step=2.5)[0].parent
    else:
        array = np.random.default_rng(0).integers(-1000, 2000, (16, 12, 6)).astype(np.float32)
        folder = tmp_path / "s"
        write_dicom_series(
            array,
            folder,
            affine=oblique_affine(),
            series_description="oblique",
            derivation_description="test",
        )
    volume = read_series(folder)
    image = sitk_read_series(folder)
    np.testing.assert_allclose(volume.affine, sitk_affine_ras(image), atol=1e-4)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def test_small_position_jitter_is_tolerated(tmp_path):
    files = ct_small_series(tmp_path / "s", n=6, step=1.0)
    for k, path in enumerate(files):  # low-precision IPP (+-0.01 mm), as some scanners write it
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + (0.01 if k % 2 else -0.01)
        ds.save_as(path)
    volume = read_series(files)
    assert volume.spacing[2] == pytest.approx(1.0, abs=0.01)


def test_uint16_above_32767_survives(tmp_path):
    ds = pydicom.dcmread(dicom_test_file("MR_small.dcm"))
    pixels = (ds.pixel_array.astype(np.int64) * 20 + 30000).clip(0, 65535).astype(np.uint16)
    assert pixels.max() > 32767
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "mr.dcm")
    volume = read_series([tmp_path / "mr.dcm"])
    assert volume.array.dtype == np.uint16  # no rescale -> stored type kept, never negative
    np.testing.assert_array_equal(volume.array, pixels.T)
    # and through our int16 writer (rescale intercept shifts the range losslessly)
    slope, intercept = rescale_for(volume.array)
    assert slope == 1.0 and intercept != 0.0
    write_dicom_series(
        volume.array,
        tmp_path / "out",
        affine=volume.affine,
        series_description="u16",
        derivation_description="test",
        meta={"Modality": "MR"},
    )
    back = read_series(tmp_path / "out")
    np.testing.assert_array_equal(back.array, pixels.T.astype(np.float32))


# ------------------------------------------------------------------------------------------ bad inputs


def test_missing_slice_names_the_gap(ct_series):
    ct_series[2].unlink()
    with pytest.raises(DicomSeriesError, match="missing slice") as info:
        read_series(ct_series[0].parent)
    assert ct_series[1].name in str(info.value) and ct_series[3].name in str(info.value)


def test_varying_spacing_is_refused(tmp_path):
    files = ct_small_series(tmp_path / "s", n=5, step=1.0)
    ds = pydicom.dcmread(files[4])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.4
    ds.save_as(files[4])
    with pytest.raises(DicomSeriesError, match="spacing varies"):
        read_series(files)


def test_duplicate_positions(ct_series):
    ds = pydicom.dcmread(ct_series[1])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(ct_series[0].parent / "copy_of_slice1")
    with pytest.raises(DicomSeriesError, match="duplicate slice positions") as info:
        read_series(ct_series[0].parent)
    assert "copy_of_slice1" in str(info.value) and "series " in str(info.value)


def test_gantry_tilt_is_refused(tmp_path):
    files = ct_small_series(tmp_path / "s", n=5, step=2.0, lateral_shift=0.5)
    with pytest.raises(DicomSeriesError, match="gantry tilt"):
        read_series(files)


def test_mixed_orientation_raises_and_discovery_splits(ct_series):
    ds = pydicom.dcmread(ct_series[4])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    ds.save_as(ct_series[4])
    with pytest.raises(DicomSeriesError, match="mixed image orientations"):
        read_series(ct_series)
    found = discover_series(ct_series[0].parent)
    assert len(found.series) == 2
    assert all("mixed orientation" in s.split_reason for s in found.series)
    assert sorted(len(s.frames) for s in found.series) == [1, 4]
    assert read_series(max(found.series, key=lambda s: len(s.frames))).array.shape == (128, 128, 4)


def test_mixed_image_size(ct_series):
    ds = pydicom.dcmread(ct_series[0])
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:64, :64]).tobytes()
    ds.Rows = ds.Columns = 64
    ds.save_as(ct_series[0])
    with pytest.raises(DicomSeriesError, match="mixed image sizes"):
        read_series(ct_series)
    assert "mixed image size" in discover_series(ct_series[0].parent).series[0].split_reason


@pytest.mark.parametrize(
    ("name", "modality"), [("liver_1frame.dcm", "SEG"), ("test-SR.dcm", "SR"), ("rtstruct.dcm", "RTSTRUCT")]
)
def test_non_image_object_passed_as_image(name, modality):
    with pytest.raises(DicomSeriesError, match=f"not an image.*Modality {modality}") as info:
        read_series([dicom_test_file(name)])
    assert name in str(info.value)


def test_corrupt_file_is_named(ct_series):
    data = ct_series[2].read_bytes()
    ct_series[2].write_bytes(data[: len(data) // 2])  # truncated in the pixel data
    with pytest.raises(DicomSeriesError) as info:
        read_series(ct_series)
    assert ct_series[2].name in str(info.value)


def test_files_of_two_series_are_refused(tmp_path):
    a = ct_small_series(tmp_path / "a", n=2)
    b = ct_small_series(tmp_path / "b", n=2)
    with pytest.raises(DicomSeriesError, match="2 different series"):
        read_series(a + b)
    with pytest.raises(DicomSeriesError, match="expected exactly one image series, found 2"):
        read_series(tmp_path)


# ----------------------------------------------------------------------------------------- discovery


def test_discovery_groups_splits_and_reports_skips(tmp_path):
    """Many series in one folder, localizer and derived skipped with reasons, repeats split."""
    root = tmp_path / "export"
    uid = generate_uid()
    ct_small_series(root / "a" / "phase1", n=3, series_uid=uid)
    phase2 = ct_small_series(root / "a" / "phase2", n=3, series_uid=uid, shuffle_seed=1)
    for path in phase2:  # same positions, second acquisition (contrast phase) in the same series
        ds = pydicom.dcmread(path)
        ds.AcquisitionNumber = 3  # CT_small itself has AcquisitionNumber 2
        ds.save_as(path)
    localizer = ct_small_series(root / "loc", n=2)
    for path in localizer:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    volume = read_series(ct_small_series(root / "b", n=3))
    write_dicom_series(
        volume.array,
        root / "derived",
        reference=root / "b",
        series_description="std",
        derivation_description="test",
    )
    shutil.copy(dicom_test_file("liver_1frame.dcm"), root / "seg")
    (root / "README.txt").write_text("not dicom")

    found = discover_series(root)
    reasons = " | ".join(s.reason for s in found.skipped)
    assert "localizer" in reasons and "derived" in reasons and "non-image object (Modality SEG" in reasons
    assert "not DICOM" in reasons
    parts = [s for s in found.series if s.series_uid == uid]
    assert len(parts) == 2 and "AcquisitionNumber" in parts[0].split_reason
    assert len(found.series) == 3  # phase 1, phase 2, series b
    for part in parts:
        assert read_series(part).array.shape == (128, 128, 3)
    with_derived = discover_series(root, include_derived=True, include_localizers=True)
    assert len(with_derived.series) == 5


# ---------------------------------------------------------------------------- multi-frame, compressed


def test_enhanced_multiframe_mr():
    path = dicom_test_file("emri_small.dcm")
    expected = pydicom.dcmread(path).pixel_array  # (frames, rows, columns)
    with pytest.warns(UserWarning) as record:
        volume = read_series(path)
    assert any("nominal geometry" in str(w.message) for w in record)  # no per-frame positions in this file
    assert volume.array.shape == (64, 64, 10)
    np.testing.assert_array_equal(volume.array, expected.transpose(2, 1, 0))
    assert volume.meta["warnings"]


@pytest.mark.parametrize(
    "name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm"]
)
def test_compressed_syntaxes_decode_to_uncompressed_pixels(name):
    reference = read_series(dicom_test_file("MR_small.dcm"))
    volume = read_series(dicom_test_file(name))
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine)


def test_undecodable_pixel_data_names_syntax_and_file(tmp_path):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(dicom_test_file("MR_small_jpeg_ls_lossless.dcm"))
    ds.PixelData = encapsulate([b"\xff\xd8garbage" * 8])
    ds.save_as(tmp_path / "broken.dcm")
    with pytest.raises(DicomSeriesError, match="JPEG-LS") as info:
        read_series([tmp_path / "broken.dcm"])
    assert "broken.dcm" in str(info.value) and "transfer syntax" in str(info.value)


# ------------------------------------------------------------------------------------------ writing


def test_write_with_reference_round_trip(tmp_path, ct_series):
    reference = discover_series(ct_series[0].parent).series[0]
    source = read_series(reference)
    standardized = source.array * 0.5 + 0.25  # non-integer values -> slope < 1
    files = write_dicom_series(
        standardized,
        tmp_path / "std",
        reference=reference,
        series_description="standardized B30f",
        derivation_description="medfusion DiffusionCT standardization",
        meta={"ConvolutionKernel": "B30f"},
    )
    assert len(files) == 5 and all(f.is_file() for f in files)
    back = read_series(tmp_path / "std")
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-6)
    slope, _ = rescale_for(standardized)
    assert np.abs(back.array - standardized).max() <= slope / 2 + 1e-3

    ref_ds = pydicom.dcmread(ct_series[0], stop_before_pixels=True)
    out = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {d.SeriesInstanceUID for d in out} != {ref_ds.SeriesInstanceUID} and len(
        {d.SeriesInstanceUID for d in out}
    ) == 1
    ref_sops = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in ct_series}
    assert not ref_sops & {d.SOPInstanceUID for d in out}
    for key in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID", "StudyDate"):
        assert out[0].get(key) == ref_ds.get(key), key
    assert out[0].DerivationDescription == "medfusion DiffusionCT standardization"
    assert out[0].SeriesDescription == "standardized B30f" and out[0].ConvolutionKernel == "B30f"
    assert list(out[0].ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert out[0].ReferencedSeriesSequence[0].SeriesInstanceUID == ref_ds.SeriesInstanceUID


def test_write_fresh_ct_series_from_affine_and_meta(tmp_path):
    hu = np.full((16, 16, 4), -1000.0, dtype=np.float32)
    hu[4:12, 4:12] = 40.0
    meta = {
        "Manufacturer": "SIEMENS",
        "ConvolutionKernel": "B70f",
        "KVP": 120,
        "Exposure": 200,
        "PatientID": "P7",
    }
    write_dicom_series(
        hu,
        tmp_path / "ct",
        affine=oblique_affine(),
        series_description="sim",
        derivation_description="phantom",
        meta=meta,
    )
    volume = read_series(tmp_path / "ct")
    np.testing.assert_array_equal(volume.array, hu)
    np.testing.assert_allclose(volume.affine, oblique_affine(), atol=1e-6)
    assert volume.meta["ConvolutionKernel"] == "B70f" and volume.meta["KVP"] == 120.0
    assert volume.meta["ImageType"][:2] == ["ORIGINAL", "PRIMARY"]


def test_write_refuses_bad_arguments(tmp_path):
    kwargs = {"series_description": "x", "derivation_description": "y"}
    with pytest.raises(ValueError, match="needs `affine`"):
        write_dicom_series(np.zeros((4, 4, 2)), tmp_path / "a", **kwargs)
    with pytest.raises(ValueError, match="not DICOM keywords"):
        write_dicom_series(
            np.zeros((4, 4, 2)), tmp_path / "a", affine=np.eye(4), meta={"Kernel": "B"}, **kwargs
        )
    with pytest.raises(ValueError, match="valid: CT, MR"):
        write_dicom_series(
            np.zeros((4, 4, 2)), tmp_path / "a", affine=np.eye(4), meta={"Modality": "US"}, **kwargs
        )
    write_dicom_series(np.zeros((4, 4, 2)), tmp_path / "a", affine=np.eye(4), **kwargs)
    with pytest.raises(FileExistsError):
        write_dicom_series(np.zeros((4, 4, 2)), tmp_path / "a", affine=np.eye(4), **kwargs)


def test_write_2d_image_round_trip(tmp_path):
    image = np.arange(-500, -500 + 12 * 10, dtype=np.float32).reshape(12, 10)
    affine = oblique_affine(spacing=(0.5, 0.6, 3.0))
    files = write_dicom_series(
        image, tmp_path / "one", affine=affine, series_description="2d", derivation_description="t"
    )
    volume = read_series(files)
    assert volume.array.shape == (12, 10)
    np.testing.assert_array_equal(volume.array, image)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)  # slice axis from SliceThickness
