"""Displacement fields on disk: our voxel fields round-trip exactly, and SimpleITK resamples with the ITK file
exactly as medfusion's warp does with the voxel field (the oracle), in 2D and 3D."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medfusion.fields import warp
from medfusion.io.displacement import (
    NIFTI_INTENT_VECTOR,
    read_voxel_field,
    voxel_to_mm_lps,
    write_displacement_field,
    write_voxel_field,
)


def _affine(nd: int) -> np.ndarray:
    """A non-diagonal RAS+ affine (axes swapped and flipped, anisotropic, offset), like the phantoms'."""
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([0.8, 1.2, 2.0])
    a[:3, 3] = [10.0, -20.0, 5.0 if nd == 3 else 0.0]
    return a


def _smooth_field(shape: tuple[int, ...], amplitude: float = 1.5) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(0, np.pi, s) for s in shape], indexing="ij"))
    nd = len(shape)
    return amplitude * np.sin(grid[[(d + 1) % nd for d in range(nd)]])  # up to 1.5 voxels


def test_translation_units_and_axes():
    a = _affine(3)
    u = np.zeros((3, 4, 4, 4))
    u[0] = 1.0  # one voxel along array axis i
    d = voxel_to_mm_lps(u, a)
    ras = a[:3, :3] @ np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(d[1, 2, 3], ras * np.array([-1, -1, 1]))
    with pytest.raises(ValueError, match="D = 2 or 3"):
        voxel_to_mm_lps(np.zeros((4, 5, 5)), a)


@pytest.mark.parametrize("shape", [(12, 10, 8), (12, 10)])
def test_files_are_nifti_vector_images_of_the_standard_layout(tmp_path, shape):
    nd = len(shape)
    u = _smooth_field(shape).astype(np.float32)
    expected = (*shape, *(1,) * (3 - nd), 1, nd)
    for name, write in (("vox", write_voxel_field), ("itk", write_displacement_field)):
        img = nib.load(write(tmp_path / f"{name}.nii.gz", u, _affine(nd)))
        assert img.shape == expected and int(img.header["intent_code"]) == NIFTI_INTENT_VECTOR
    back = read_voxel_field(tmp_path / "vox.nii.gz", spatial_dims=nd)
    np.testing.assert_array_equal(back.ddf, u)
    np.testing.assert_allclose(back.affine, _affine(nd), atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 10, 8), (14, 12)])
def test_simpleitk_resampling_with_the_file_matches_our_warp(tmp_path, shape):
    """``sitk.Resample(moving, fixed, DisplacementFieldTransform(file))`` = our pull warp of moving (the oracle)."""
    import SimpleITK as sitk

    from medfusion.io.nifti import read_nifti, write_nifti

    nd = len(shape)
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    a = _affine(nd)
    u = _smooth_field(shape)
    ours = warp(torch.from_numpy(image)[None, None], torch.from_numpy(u).float()[None], padding_mode="border")
    ours = ours[0, 0].numpy()

    write_nifti(tmp_path / "moving.nii.gz", image, a)
    write_nifti(tmp_path / "fixed.nii.gz", np.zeros(shape, np.float32), a)  # the reference grid
    field = write_displacement_field(tmp_path / "field.nii.gz", u, a)
    moving = sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat64)
    fixed = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"), sitk.sitkFloat64)
    tx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(field), sitk.sitkVectorFloat64))
    out = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0)
    sitk.WriteImage(sitk.Cast(out, sitk.sitkFloat32), str(tmp_path / "theirs.nii.gz"))
    theirs = read_nifti(tmp_path / "theirs.nii.gz").array.reshape(shape)
    # compare where the pulled point stays inside the image (no padding differences)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")) + u
    inside = np.all([(idx[d] >= 0) & (idx[d] <= shape[d] - 1) for d in range(nd)], axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-4)


def test_reading_refuses_what_is_not_a_field(tmp_path):
    from medfusion.io.nifti import write_nifti

    write_nifti(tmp_path / "image.nii.gz", np.zeros((6, 5, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"image\.nii\.gz: not a displacement field"):
        read_voxel_field(tmp_path / "image.nii.gz")
    write_voxel_field(tmp_path / "f2.nii.gz", np.zeros((2, 6, 5)), np.eye(4))
    with pytest.raises(ValueError, match=r"f2\.nii\.gz: a 2D field where a 3D one"):
        read_voxel_field(tmp_path / "f2.nii.gz", spatial_dims=3)
    bad = np.zeros((3, 4, 4, 4))
    bad[0, 1, 1, 1] = np.nan
    write_voxel_field(tmp_path / "nan.nii.gz", bad, np.eye(4))
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: the field has NaN"):
        read_voxel_field(tmp_path / "nan.nii.gz")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_voxel_field(tmp_path / "missing.nii.gz")


def test_refuses_to_overwrite(tmp_path):
    a = np.eye(4)
    for write in (write_displacement_field, write_voxel_field):
        write(tmp_path / "f.nii.gz", np.zeros((2, 4, 4)), a, overwrite=True)
        with pytest.raises(FileExistsError):
            write(tmp_path / "f.nii.gz", np.zeros((2, 4, 4)), a)
