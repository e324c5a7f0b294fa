"""ITK/ANTs displacement-field export: SimpleITK resamples with our file exactly as medfusion's warp does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfusion.fields import warp
from medfusion.io.displacement import voxel_to_mm_lps, write_displacement_field


def _affine_3d():
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # non-diagonal, like the phantoms
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([0.8, 1.2, 2.0])
    a[:3, 3] = [10.0, -20.0, 5.0]
    return a


def test_translation_units_and_axes():
    a = _affine_3d()
    u = np.zeros((3, 4, 4, 4))
    u[0] = 1.0  # one voxel along array axis i
    d = voxel_to_mm_lps(u, a)
    ras = a[:3, :3] @ np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(d[1, 2, 3], ras * np.array([-1, -1, 1]))
    with pytest.raises(ValueError, match="D = 2 or 3"):
        voxel_to_mm_lps(np.zeros((4, 5, 5)), a)


def test_simpleitk_resampling_with_the_file_matches_our_warp(tmp_path):
    import SimpleITK as sitk

    from medfusion.io.nifti import read_nifti, write_nifti

    rng = np.random.default_rng(0)
    shape = (12, 10, 8)
    image = rng.normal(size=shape).astype(np.float32)
    a = _affine_3d()
    grid = np.stack(np.meshgrid(*[np.linspace(0, np.pi, s) for s in shape], indexing="ij"))
    u = 1.5 * np.sin(grid[[1, 2, 0]])  # smooth field, up to 1.5 voxels
    ours = warp(
        torch.from_numpy(image)[None, None], torch.from_numpy(u).float()[None], padding_mode="border"
    )[0, 0]

    write_nifti(tmp_path / "img.nii.gz", image, a)
    field = write_displacement_field(tmp_path / "field.nii.gz", u, a)
    moving = sitk.ReadImage(str(tmp_path / "img.nii.gz"), sitk.sitkFloat64)
    disp = sitk.ReadImage(str(field), sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(disp)
    out = sitk.Resample(moving, moving, tx, sitk.sitkLinear, 0.0)
    write_nifti(tmp_path / "out.nii.gz", np.zeros(shape, np.float32), a)
    sitk.WriteImage(sitk.Cast(out, sitk.sitkFloat32), str(tmp_path / "theirs.nii.gz"))
    theirs = read_nifti(tmp_path / "theirs.nii.gz").array
    # compare where the pulled point stays inside the image (no padding differences)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")) + u
    inside = np.all([(idx[d] >= 0) & (idx[d] <= shape[d] - 1) for d in range(3)], axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(theirs[inside], ours.numpy()[inside], atol=1e-4)


def test_refuses_to_overwrite(tmp_path):
    a = np.eye(4)
    write_displacement_field(tmp_path / "f.nii.gz", np.zeros((2, 4, 4)), a)
    with pytest.raises(FileExistsError):
        write_displacement_field(tmp_path / "f.nii.gz", np.zeros((2, 4, 4)), a)
