"""2D/3D MONAI pipelines: shapes, value ranges, HU window, orientation, spacing, paired keys, slices from volumes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfusion.data.pipelines import build_transforms, hu_to_unit, unit_to_hu


def _save(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> str:
    affine = np.diag([*spacing[:3], 1.0]) if len(spacing) == 3 else spacing
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(path))
    return str(path)


def _run(pipeline, data: dict) -> list[dict]:
    det, rnd = pipeline
    out = rnd(det(dict(data)))
    return out if isinstance(out, list) else [out]


@pytest.fixture
def volume(rng) -> np.ndarray:
    """(20, 24, 12) 'CT' in [-500, 500] HU; slice k has mean 50 k - 300 so slices are identifiable."""
    noise = rng.uniform(-100, 100, size=(20, 24, 12))
    return noise + (50.0 * np.arange(12) - 300.0)[None, None, :]


def test_hu_to_unit_and_back() -> None:
    hu = np.array([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    unit = hu_to_unit(hu, (-1000, 1000))
    np.testing.assert_allclose(unit, [-1, -1, 0, 0.5, 1, 1])
    np.testing.assert_allclose(unit_to_hu(hu_to_unit(hu[1:5], (-1000, 1000)), (-1000, 1000)), hu[1:5])
    t = torch.tensor([-160.0, 40.0, 240.0])
    torch.testing.assert_close(hu_to_unit(t, (-160, 240)), torch.tensor([-1.0, 0.0, 1.0]))
    assert float(hu_to_unit(np.array(3000.0), (-1000, 1000), clip=False)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="high > low"):
        hu_to_unit(hu, (100, -100))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_train_shapes_value_range_and_num_samples(
    tmp_path: Path, volume: np.ndarray, spatial_dims: int
) -> None:
    data = volume if spatial_dims == 3 else volume[..., 5]
    path = _save(tmp_path / "ct.nii.gz", data)
    roi = (16, 16, 8)[:spatial_dims]
    pipe = build_transforms(["image"], spatial_dims=spatial_dims, roi_size=roi, num_samples=3, train=True)
    out = _run(pipe, {"image": path})
    assert len(out) == 3
    for sample in out:
        assert tuple(sample["image"].shape) == (1, *roi)
        assert sample["image"].min() >= -1.0 and sample["image"].max() <= 1.0
    # a window that saturates: every value is clipped into [-1, 1]
    narrow = build_transforms(["image"], spatial_dims=spatial_dims, roi_size=roi, hu_window=(-50, 50))
    x = _run(narrow, {"image": path})[0]["image"]
    assert x.min() >= -1.0 and x.max() <= 1.0 and (x.abs() == 1.0).any()


def test_hu_window_maps_exactly_without_crops(tmp_path: Path) -> None:
    hu = np.array([[-1000.0, -500.0], [0.0, 1000.0]])[..., None].repeat(3, axis=2)
    path = _save(tmp_path / "ct.nii.gz", hu)
    pipe = build_transforms(["image"], spatial_dims=3, train=False, crop_foreground=False)
    x = _run(pipe, {"image": path})[0]["image"]
    np.testing.assert_allclose(x[0, ..., 0].numpy(), [[-1.0, -0.5], [0.0, 1.0]], atol=1e-6)


def test_2d_slices_from_3d_volume_are_real_slices(tmp_path: Path, volume: np.ndarray) -> None:
    path = _save(tmp_path / "ct.nii.gz", volume)
    pipe = build_transforms(["image"], spatial_dims=2, num_samples=4, train=True, crop_foreground=False)
    unit_slices = hu_to_unit(volume, (-1000, 1000)).astype(np.float32)
    seen = set()
    for sample in _run(pipe, {"image": path}):
        x = sample["image"].numpy()
        assert x.shape == (1, 20, 24)
        k = int(np.argmin([np.abs(unit_slices[..., j] - x[0]).max() for j in range(12)]))
        np.testing.assert_allclose(x[0], unit_slices[..., k], atol=1e-6)
        seen.add(k)
    assert len(seen) > 1  # different slices drawn
    # evaluation: the central slice, deterministically; roi crops the plane
    ev = build_transforms(["image"], spatial_dims=2, roi_size=(16, 16), train=False, crop_foreground=False)
    a, b = _run(ev, {"image": path})[0]["image"], _run(ev, {"image": path})[0]["image"]
    assert tuple(a.shape) == (1, 16, 16) and torch.equal(a, b)
    np.testing.assert_allclose(a[0].numpy(), unit_slices[2:18, 4:20, 6], atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_paired_keys_get_identical_crops(tmp_path: Path, volume: np.ndarray, spatial_dims: int) -> None:
    source = _save(tmp_path / "src.nii.gz", volume)
    target = _save(tmp_path / "tgt.nii.gz", volume + 100.0)  # same anatomy, +100 HU: unit +0.1 everywhere
    roi = (8, 8, 4)[:spatial_dims]
    pipe = build_transforms(["source", "target"], spatial_dims=spatial_dims, roi_size=roi, num_samples=4)
    pipe.random.set_random_state(seed=1)
    for sample in _run(pipe, {"source": source, "target": target}):
        assert sample["source"].shape == sample["target"].shape == (1, *roi)
        torch.testing.assert_close(
            sample["target"] - sample["source"], torch.full_like(sample["source"], 0.1)
        )


def test_labels_nearest_aligned_and_label_aware_crops(tmp_path: Path, volume: np.ndarray) -> None:
    label = (volume > 100).astype(np.float32) * 2  # label value 2: non-binary values must survive
    img, lab = _save(tmp_path / "img.nii.gz", volume), _save(tmp_path / "lab.nii.gz", label)
    pipe = build_transforms(
        ["image", "label"], spatial_dims=3, roi_size=(8, 8, 4), num_samples=4, pixdim=(1.5,) * 3
    )
    for sample in _run(pipe, {"image": img, "label": lab}):
        assert sample["label"].shape == sample["image"].shape == (1, 8, 8, 4)
        assert set(sample["label"].unique().tolist()) <= {0.0, 2.0}
    # without resampling the label is exactly the thresholded image inside every crop
    plain = build_transforms(["image", "label"], spatial_dims=2, roi_size=(8, 8), num_samples=4)
    for sample in _run(plain, {"image": img, "label": lab}):
        expect = (sample["image"] > float(hu_to_unit(np.array(100.0), (-1000, 1000)))).float() * 2
        torch.testing.assert_close(sample["label"].as_tensor(), expect.as_tensor())


def test_orientation_to_ras_and_spacing(tmp_path: Path, volume: np.ndarray) -> None:
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])  # i runs right->left, j anterior->posterior
    path = _save(tmp_path / "lps.nii.gz", volume, spacing=lps)
    pipe = build_transforms(["image"], spatial_dims=3, train=False, crop_foreground=False)
    x = _run(pipe, {"image": path})[0]["image"]
    np.testing.assert_allclose(x[0].numpy(), hu_to_unit(volume[::-1, ::-1, :], (-1000, 1000)), atol=1e-6)
    assert np.allclose(np.diag(x.affine.numpy())[:3], [1.0, 1.0, 2.0])
    resampled = build_transforms(
        ["image"], spatial_dims=3, pixdim=(2.0, 2.0, 2.0), train=False, crop_foreground=False
    )
    y = _run(resampled, {"image": path})[0]["image"]
    assert tuple(y.shape) == (1, 10, 12, 12)


def test_foreground_crop_and_padding(tmp_path: Path) -> None:
    ct = np.full((30, 30, 10), -1024.0)
    ct[5:15, 8:20, 2:7] = 40.0  # the "body"
    path = _save(tmp_path / "ct.nii.gz", ct)
    x = _run(build_transforms(["image"], spatial_dims=3, train=False), {"image": path})[0]["image"]
    assert tuple(x.shape) == (1, 10, 12, 5)
    # a roi larger than the foreground is padded with -1 (air) for images
    y = _run(build_transforms(["image"], spatial_dims=3, roi_size=(16, 16, 8)), {"image": path})[0]["image"]
    assert tuple(y.shape) == (1, 16, 16, 8) and float(y.min()) == -1.0


def test_random_part_is_reproducible_from_its_seed(tmp_path: Path, volume: np.ndarray) -> None:
    path = _save(tmp_path / "ct.nii.gz", volume)
    det, rnd = build_transforms(["image"], spatial_dims=2, roi_size=(8, 8), num_samples=2)
    cached = det({"image": path})
    rnd.set_random_state(seed=7)
    a = [s["image"] for s in rnd(dict(cached))]
    rnd.set_random_state(seed=7)
    b = [s["image"] for s in rnd(dict(cached))]
    c = [s["image"] for s in rnd(dict(cached))]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        build_transforms(["image"], spatial_dims=4)
    with pytest.raises(ValueError, match="roi_size must have 2"):
        build_transforms(["image"], spatial_dims=2, roi_size=(8, 8, 8))
    with pytest.raises(ValueError, match="hu_window"):
        build_transforms(["image"], spatial_dims=2, hu_window=(100, 0))
    with pytest.raises(ValueError, match="num_samples"):
        build_transforms(["image"], spatial_dims=2, num_samples=0)
    with pytest.raises(ValueError, match="slice_axis"):
        build_transforms(["image"], spatial_dims=2, slice_axis=3)
    with pytest.raises(ValueError, match="disjoint"):
        build_transforms(["image"], spatial_dims=2, label_keys=["label"])


def _refusal(pipeline, data: dict) -> str:
    """The ``ValueError`` a pipeline raises on ``data`` (MONAI's ``Compose`` wraps it in a ``RuntimeError``)."""
    with pytest.raises(RuntimeError) as info:
        _run(pipeline, data)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError), repr(cause)
    return str(cause)


def test_2d_data_in_a_3d_pipeline_is_refused(tmp_path: Path, volume: np.ndarray) -> None:
    path = _save(tmp_path / "slice.nii.gz", volume[..., 0])
    message = _refusal(build_transforms(["image"], spatial_dims=3, roi_size=(8, 8, 4)), {"image": path})
    assert message.startswith(f"{path} (image): a 2D image of shape (20, 24) given to a 3D pipeline"), message


@pytest.mark.parametrize(
    "bad, says",
    [
        ("nan", "of 5760: every voxel must be a finite value"),
        ("inf", "0 NaN and 1 infinite voxels"),
        ("4d", "a 4D series (time points or channels) of shape (20, 24, 12, 2)"),
        ("empty", "empty image"),
    ],
)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_bad_scan_is_refused_naming_its_file(
    tmp_path: Path, volume: np.ndarray, bad: str, says: str, spatial_dims: int
) -> None:
    """NaN / infinite voxels, a 4D series, no voxels: ``ValueError`` naming the file and key, in train and eval."""
    broken = {
        "nan": np.where(volume > 0, np.nan, volume),
        "inf": np.where(volume == volume.max(), np.inf, volume),
        "4d": np.stack([volume, volume], axis=-1),
        "empty": np.zeros((0, 24, 12)),
    }[bad]
    good, path = _save(tmp_path / "good.nii.gz", volume), _save(tmp_path / "bad.nii.gz", broken)
    for train in (True, False):
        pipe = build_transforms(["source", "target"], spatial_dims=spatial_dims, train=train)
        message = _refusal(pipe, {"source": good, "target": path})
        assert message.startswith(f"{path} (target): "), message
        assert says in message, message
    ok = _run(
        build_transforms(["source", "target"], spatial_dims=spatial_dims), {"source": good, "target": good}
    )
    assert torch.isfinite(ok[0]["source"]).all()


def test_scans_of_different_ranks_in_one_case_are_refused(tmp_path: Path, volume: np.ndarray) -> None:
    """A 2D slice paired with a 3D volume, even in a 2D pipeline (which slices 3D volumes): both files named."""
    flat, vol = _save(tmp_path / "flat.nii.gz", volume[..., 0]), _save(tmp_path / "vol.nii.gz", volume)
    message = _refusal(
        build_transforms(["source", "target"], spatial_dims=2), {"source": flat, "target": vol}
    )
    assert "the scans of one case must have the same rank" in message
    assert f"{flat} (source) is 2D (20, 24)" in message and f"{vol} (target) is 3D (20, 24, 12)" in message


def test_dicom_series_folder_loads_as_a_volume(tmp_path: Path, monkeypatch) -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    folder = Path(pydicom_data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    if not folder.is_dir():
        pytest.skip("pydicom's CT5N test series (5 slices) is not installed")
    from medfusion.data import pipelines

    calls = []
    if pipelines._dicom_reader_available():  # our reader (medfusion.io.dicom) must be the one used
        read = pipelines.MedfusionDicomReader.read
        monkeypatch.setattr(
            pipelines.MedfusionDicomReader, "read", lambda self, d, **kw: calls.append(d) or read(self, d)
        )
    pipe = build_transforms(["image"], spatial_dims=3, train=False, crop_foreground=False)
    x = _run(pipe, {"image": str(folder)})[0]["image"]
    assert tuple(x.shape) == (1, 16, 16, 5)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert len(calls) == int(pipelines._dicom_reader_available())
    if calls:  # same voxels as medfusion.io.dicom.read_series, after RAS orientation
        from medfusion.io.dicom import read_series

        vol = read_series(folder)
        to_ras = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(vol.affine), nib.orientations.axcodes2ornt("RAS")
        )
        expect = nib.orientations.apply_orientation(vol.array.astype(np.float32), to_ras)
        np.testing.assert_allclose(x[0].numpy(), hu_to_unit(expect, (-1000, 1000)), atol=1e-6)
