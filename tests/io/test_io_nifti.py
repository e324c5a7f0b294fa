"""NIfTI round trips, spacing from column norms, atomic writes, agreement with SimpleITK world coordinates."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from io_helpers import ct_small_series, oblique_affine, sitk_read_series

from medfusion.io.dicom import read_series, write_dicom_series
from medfusion.io.nifti import read_nifti, sidecar_path, write_nifti


@pytest.mark.parametrize("shape", [(6, 5, 4), (7, 9)])
def test_round_trip_2d_and_3d(tmp_path, rng, shape):
    array = rng.normal(size=shape).astype(np.float32)
    affine = oblique_affine(spacing=(0.5, 0.75, 2.0))
    path = write_nifti(tmp_path / "x.nii.gz", array, affine)
    volume = read_nifti(path)
    assert volume.array.shape == shape and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    # spacing = column norms of the (oblique) affine, not its diagonal
    np.testing.assert_allclose(volume.spacing, (0.5, 0.75, 2.0)[: len(shape)], atol=1e-6)
    assert not np.allclose(np.abs(np.diag(affine)[: len(shape)]), volume.spacing)
    assert nib.load(path).header.get_sform(coded=True)[1] == 1


def test_integer_dtype_and_sidecar(tmp_path):
    hu = np.array([[-1000.0, 40.0], [1200.0, 3.0]], dtype=np.float32)[:, :, None]
    path = write_nifti(tmp_path / "ct.nii", hu, np.eye(4), dtype="int16")
    sidecar_path(path).write_text(json.dumps({"ConvolutionKernel": "B30f"}))
    volume = read_nifti(path)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, hu)
    assert volume.meta["ConvolutionKernel"] == "B30f"
    with pytest.raises(ValueError, match="do not fit"):
        write_nifti(tmp_path / "big.nii", hu * 100, np.eye(4), dtype="int16")


def test_refuses_overwrite_and_bad_names(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", np.zeros((2, 2, 2)), np.eye(4))
    with pytest.raises(FileExistsError):
        write_nifti(tmp_path / "a.nii.gz", np.zeros((2, 2, 2)), np.eye(4))
    write_nifti(tmp_path / "a.nii.gz", np.ones((2, 2, 2)), np.eye(4), overwrite=True)
    assert read_nifti(tmp_path / "a.nii.gz").array.max() == 1
    with pytest.raises(ValueError, match="valid NIfTI suffixes"):
        write_nifti(tmp_path / "a.nrrd", np.zeros((2, 2)), np.eye(4))


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(img, filename):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    import medfusion.io.nifti as nifti

    monkeypatch.setattr(nib, "save", broken_save)  # .nii
    monkeypatch.setattr(nifti, "write_gzip", lambda path, data: broken_save(None, path))  # .nii.gz
    for name in ("a.nii.gz", "a.nii"):
        with pytest.raises(KeyboardInterrupt):
            write_nifti(tmp_path / name, np.zeros((2, 2, 2)), np.eye(4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("engine", ["isal", "zlib"])
def test_parallel_gzip_is_standard_and_independent_of_threads(tmp_path, monkeypatch, engine):
    """write_gzip: one gzip member that gzip / nibabel read back, the same bytes for any number of threads, with
    ISA-L and with zlib, from one buffer or several consecutive ones."""
    import gzip
    import zlib

    from medfusion.io import nifti
    from medfusion.io.nifti import write_gzip

    if engine == "zlib":
        monkeypatch.setattr(nifti, "_deflate_engine", lambda: zlib)
    else:
        pytest.importorskip("isal")
    data = np.random.default_rng(0).integers(0, 40, (1 << 22) * 2 + 12345, dtype=np.uint8).tobytes()
    outputs = []
    for threads in (1, 2, 3):
        write_gzip(tmp_path / f"{threads}.gz", data, threads=threads)
        outputs.append((tmp_path / f"{threads}.gz").read_bytes())
        assert gzip.decompress(outputs[-1]) == data
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0][:3] == b"\x1f\x8b\x08"
    pieces = [data[:352], data[352 : (1 << 22) + 9], b"", data[(1 << 22) + 9 :]]
    for threads in (1, 2):
        write_gzip(tmp_path / "parts.gz", pieces, threads=threads)
        assert gzip.decompress((tmp_path / "parts.gz").read_bytes()) == data
    write_gzip(tmp_path / "empty.gz", b"")
    assert gzip.decompress((tmp_path / "empty.gz").read_bytes()) == b""
    # a .nii.gz holds exactly the bytes nibabel writes for the .nii
    array = np.asfortranarray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    write_nifti(tmp_path / "v.nii.gz", array, np.diag([0.5, 0.6, 2.0, 1.0]))
    write_nifti(tmp_path / "v.nii", array, np.diag([0.5, 0.6, 2.0, 1.0]))
    assert gzip.decompress((tmp_path / "v.nii.gz").read_bytes()) == (tmp_path / "v.nii").read_bytes()


@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_marker_voxel_same_world_position_in_dicom_nifti_and_simpleitk(tmp_path, kind):
    """One voxel, one LPS position in the DICOM, our NIfTI (nibabel and SimpleITK)."""
    import SimpleITK as sitk

    if kind == "axial":
        folder = ct_small_series(tmp_path / "dcm", n=4, step=3.0)[0].parent
    else:
        folder = tmp_path / "dcm"
        write_dicom_series(
            np.zeros((10, 8, 5), np.float32),
            folder,
            affine=oblique_affine(),
            series_description="o",
            derivation_description="t",
        )
    volume = read_series(folder)
    marker = (3, 5, 2)
    nifti = write_nifti(tmp_path / "v.nii.gz", volume.array, volume.affine)
    from_dicom = np.array(sitk_read_series(folder).TransformIndexToPhysicalPoint(marker))
    from_nifti_sitk = np.array(sitk.ReadImage(str(nifti)).TransformIndexToPhysicalPoint(marker))
    ras = nib.load(nifti).affine @ np.array([*marker, 1.0])
    from_nifti_nib = np.array([-ras[0], -ras[1], ras[2]])  # RAS -> LPS
    np.testing.assert_allclose(from_nifti_sitk, from_dicom, atol=1e-4)
    np.testing.assert_allclose(from_nifti_nib, from_dicom, atol=1e-4)


def test_nii_gz_of_several_chunks_reads_the_same_in_nibabel_simpleitk_and_monai(tmp_path):
    """A .nii.gz deflated in parallel chunks (more than one 4 MiB chunk) reads back voxel-identical in nibabel,
    SimpleITK (ITK's own zlib) and MONAI's LoadImage, and gzip's CRC and size check pass."""
    import gzip

    import SimpleITK as sitk
    from monai.transforms import LoadImage

    rng = np.random.default_rng(3)
    array = np.asfortranarray(rng.integers(-1024, 2000, (160, 150, 96), dtype=np.int16))  # 4.6 MB
    path = write_nifti(tmp_path / "big.nii.gz", array, np.diag([0.7, 0.7, 1.0, 1.0]))
    gzip.decompress(path.read_bytes())  # raises on a bad CRC-32 or length
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), array)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), array.transpose(2, 1, 0))
    loaded = LoadImage(image_only=True, reader="NibabelReader")(str(path))
    np.testing.assert_array_equal(np.asarray(loaded), array)
