"""The Python API (:mod:`medfusion.api`): its docstring examples run as doctests, it agrees with the command line,
volumes keep their geometry and metadata, and ``import medfusion`` stays cheap."""

from __future__ import annotations

import doctest
import subprocess
import sys

import numpy as np
import pytest
import torch

import medfusion
from medfusion import api, keys
from medfusion.cli import main
from medfusion.io.dicom import write_dicom_series
from medfusion.io.nifti import read_nifti, write_nifti
from medfusion.models.export import export_model

AFFINE = np.diag([0.7, 0.7, 2.5, 1.0])


def _ct() -> api.Volume:
    arr = np.full((24, 24, 3), -1000.0, np.float32)
    arr[6:18, 6:18] = 40.0
    return api.Volume(arr, AFFINE.copy())


def _tiny_rddm():
    from medfusion.models.rddm import RDDM

    torch.manual_seed(0)
    return RDDM(
        spatial_dims=2, ema_decay=None, num_sampling_steps=2,
        unet={"channels": (8, 8), "attention_levels": (False, False), "num_head_channels": 8, "norm_num_groups": 4},
    )  # fmt: skip


def _tiny_diffusion_ct(root):
    from medfusion.models.diffusion_ct import DiffusionCT, DiffusionCTAutoencoder

    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(spatial_dims=2, channels=(8, 16), latent_channels=2, norm_num_groups=4)
    g = torch.Generator().manual_seed(0)
    tgt = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    batch = {keys.SOURCE: tgt + 0.1 * torch.randn(tgt.shape, generator=g), keys.TARGET: tgt}
    ae.calibrate_latent_scale([batch])
    export_model(ae, root / "stage1")
    model = DiffusionCT(
        autoencoder=str(root / "stage1"), sampling={"num_steps": 2},
        denoiser={"channels": (16, 32), "num_head_channels": 8, "norm_num_groups": 8},
    )  # fmt: skip
    model.loss(batch)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    export_model(_tiny_rddm(), root / "rddm")
    export_model(_tiny_diffusion_ct(root), root / "dct")
    ct = _ct()
    write_nifti(root / "ct.nii.gz", ct.array, ct.affine)
    write_dicom_series(ct.array, root / "dicom", affine=ct.affine, series_description="test",
                       derivation_description="synthetic", meta={"Modality": "CT"})  # fmt: skip
    from medfusion.data.builtin import make_dataset

    make_dataset(root / "builtin", n_patients=5, dim=2, size=32, protocols=["standard", "sharp"], seed=1,
                 progress=False)  # fmt: skip
    return root


def test_docstring_examples_run(data, tmp_path):
    globs = {
        "api": api, "np": np, "ct": _ct(), "ct_path": data / "ct.nii.gz", "dicom_dir": data / "dicom",
        "model_dir": data / "rddm", "standard_model_dir": data / "dct", "tmp": tmp_path,
        "model": api.load_model(data / "rddm"), "manifest": data / "builtin" / "manifests" / "standardize.json",
    }  # fmt: skip
    result = doctest.testmod(api, globs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0, result


def test_api_and_command_line_give_the_same_volume_in_any_voxel_order(data, tmp_path):
    """A scan stored in LPS order: the API reorients to RAS for the model and back; identical to the CLI's file."""
    ct = _ct()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = api.Volume(ct.array[::-1, ::-1].copy(), ct.affine @ flip @ np.array(
        [[1, 0, 0, 23], [0, 1, 0, 23], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float), {"PatientID": "p1"})  # fmt: skip
    path = api.write_volume(tmp_path / "lps.nii.gz", lps)
    rc = main(["restore", "--ckpt", str(data / "rddm"), "--input", str(path), "--output", str(tmp_path / "o.nii.gz"),
               "--eta", "1", "--seed", "4", "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    out = api.restore(path, data / "rddm", eta=1.0, seed=4)
    np.testing.assert_array_equal(out.array, read_nifti(tmp_path / "o.nii.gz").array)
    np.testing.assert_allclose(out.affine, lps.affine, atol=1e-5)  # NIfTI stores float32
    assert out.meta["PatientID"] == "p1" and "RDDM" in out.meta["DerivationDescription"]
    same = api.restore(
        ct, data / "rddm", eta=1.0, seed=4
    )  # the RAS-stored twin: the same voxels, flipped back
    np.testing.assert_allclose(out.array, same.array[::-1, ::-1], atol=1e-4)


def test_api_augment_matches_the_command_line_for_one_case(data, tmp_path):
    import json

    ct = _ct()
    lab = api.Volume((ct.array > 0).astype(np.int16), ct.affine)
    write_nifti(tmp_path / "img.nii.gz", ct.array, ct.affine)
    write_nifti(tmp_path / "lab.nii.gz", lab.array, ct.affine)
    doc = {"task": "segment", "training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    rc = main(["augment", "--input", str(tmp_path / "m.json"), "--n", "2", "--output", str(tmp_path / "out"),
               "--t-range", "2", "3", "--seed", "7"])  # fmt: skip
    assert rc == 0
    samples = api.augment(ct, label=lab, n=2, t_range=(2, 3), seed=7)
    for k, s in enumerate(samples):
        np.testing.assert_array_equal(
            s.image.array, read_nifti(tmp_path / "out" / "images" / f"img_aug00{k}.nii.gz").array
        )
        np.testing.assert_array_equal(
            s.label.array, read_nifti(tmp_path / "out" / "labels" / f"img_aug00{k}.nii.gz").array
        )
        assert set(np.unique(s.label.array)) <= {0, 1}


def test_bad_arguments_raise_clearly(data):
    with pytest.raises(ValueError, match="does not restore images"):
        api.restore(_ct(), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="valid"):
        api.restore(_ct(), data / "rddm", strength=0.5)
    with pytest.raises(FileNotFoundError, match="no scan at"):
        api.read_volume(data / "missing.nii.gz")
    with pytest.raises(ValueError, match="n must be >= 1"):
        api.augment(_ct(), n=0)
    with pytest.raises(TypeError, match="a Volume or a path"):
        api.standardize(3, data / "dct")


@pytest.mark.parametrize(
    "bad, says",
    [
        ("nan", "NaN and 0 infinite voxels"),
        ("4d", "a 4D series (time points or channels) of shape (24, 24, 3, 2)"),
        ("constant", "a constant image, or one already normalised"),
        ("raw", "no voxel inside the model's HU window"),
    ],
)
def test_restore_refuses_what_the_command_line_refuses(data, tmp_path, bad, says):
    """The voxel checks of ``medfusion restore`` (:func:`medfusion.io.checks.check_scan`), in memory and from a
    file (then the message names it); a given HU window must be the model's, as ``--hu-window``."""
    ct = _ct().array
    array = {
        "nan": np.where(ct > 0, np.nan, ct),
        "4d": np.stack([ct, ct], axis=-1),
        "constant": np.full(ct.shape, 40.0),
        "raw": ct + 3000.0,
    }[bad].astype(np.float32)
    model = api.load_model(data / "rddm")
    with pytest.raises(ValueError) as info:
        api.restore(api.Volume(array, AFFINE.copy()), model)
    assert says in str(info.value)
    path = write_nifti(tmp_path / f"{bad}.nii.gz", array, AFFINE)
    with pytest.raises(ValueError) as info:
        api.standardize(path, data / "dct")
    assert str(info.value).startswith(f"{path}: ") and says in str(info.value)
    with pytest.raises(ValueError, match=r"differs from the window RDDM was trained with \(-1000 1000\)"):
        api.restore(_ct(), model, hu_window=(-500.0, 500.0))


def test_import_medfusion_is_cheap_and_the_api_is_reexported():
    code = "import sys, medfusion; assert 'torch' not in sys.modules and 'medfusion.api' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert medfusion.standardize is api.standardize and medfusion.Volume is api.Volume
    with pytest.raises(AttributeError):
        medfusion.no_such_name  # noqa: B018


def test_lazy_names_of_the_package_are_the_api():
    """``medfusion._API`` repeats ``medfusion.api.__all__`` so that ``import medfusion`` imports no torch."""
    import medfusion
    import medfusion.api

    assert set(medfusion._API) == set(medfusion.api.__all__)
