"""``medfusion standardize`` end to end (tiny DiffusionCT models) and the generic volume job it is built on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion import keys
from medfusion.apps.volume_job import apply_to_array, discover_inputs, plan_outputs
from medfusion.cli import main
from medfusion.io.nifti import read_nifti, write_nifti
from medfusion.io.run_report import read_report
from medfusion.models.diffusion_ct import DiffusionCT, DiffusionCTAutoencoder
from medfusion.models.export import export_model

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])


def _volume(seed=0, shape=(30, 28, 3)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[5:25, 5:23] = 40.0 + 20 * rng.standard_normal((20, 18, shape[2]))
    vol[10:14, 10:14] = 1500.0  # bone above the window: passed through unchanged
    return vol


def _tiny_model(root, spatial_dims: int = 2):
    """A tiny exported DiffusionCT (stage 1 under ``root/stage1``); returns ``(model, calibration batch)``."""
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(
        spatial_dims=spatial_dims, channels=(8, 16), latent_channels=2, norm_num_groups=4
    )
    g = torch.Generator().manual_seed(0)
    size = (32, 32) if spatial_dims == 2 else (16, 16, 16)
    tgt = torch.rand(4 if spatial_dims == 2 else 2, 1, *size, generator=g) * 2 - 1
    batch = {keys.SOURCE: tgt + 0.1 * torch.randn(tgt.shape, generator=g), keys.TARGET: tgt}
    ae.calibrate_latent_scale([batch])
    export_model(ae, root / "stage1")
    model = DiffusionCT(
        autoencoder=str(root / "stage1"), sampling={"num_steps": 2},
        denoiser={"channels": (16, 32), "num_head_channels": 8, "norm_num_groups": 8},
    )  # fmt: skip
    model.loss(batch)  # calibrates the residual scale
    return model, batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    export_model(_tiny_model(root)[0], root / "dct")
    return root


def test_apply_to_array_identity_oracle_2d_and_3d():
    vol = _volume()
    ident = lambda x: x  # noqa: E731
    out2 = apply_to_array(vol, ident, spatial_dims=2, batch_size=2, divisible_by=8)
    np.testing.assert_allclose(out2, vol, atol=1e-3)
    out3 = apply_to_array(vol[..., :2].repeat(8, axis=2), ident, spatial_dims=3, divisible_by=4)
    np.testing.assert_allclose(out3, vol[..., :2].repeat(8, axis=2), atol=1e-3)
    with pytest.raises(ValueError, match="3D array"):
        apply_to_array(vol[..., 0], ident, spatial_dims=3)


def test_standardize_nifti_file_and_folder(model_dir, tmp_path, capsys):
    vol = _volume()
    write_nifti(tmp_path / "in" / "a.nii.gz", vol, AFFINE)
    write_nifti(tmp_path / "in" / "b.nii.gz", _volume(1), AFFINE)
    out = tmp_path / "a_std.nii.gz"
    rc = main(["standardize", "--ckpt", str(model_dir / "dct"), "--input", str(tmp_path / "in" / "a.nii.gz"),
               "--output", str(out), "--device", "cpu", "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    res = read_nifti(out)
    assert res.array.shape == vol.shape
    np.testing.assert_allclose(res.affine, AFFINE)
    assert np.isfinite(res.array).all()
    assert np.all(res.array[10:14, 10:14] == 1500.0)  # outside the HU window: passed through
    # same seed -> same output; a folder gives one output per scan
    rc = main(["standardize", "--ckpt", str(model_dir / "dct"), "--input", str(tmp_path / "in"),
               "--output", str(tmp_path / "outdir"), "--device", "cpu", "--quiet"])  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "outdir").iterdir()) == ["a.nii.gz", "b.nii.gz", "standardize_report.csv"]
    np.testing.assert_array_equal(read_nifti(tmp_path / "outdir" / "a.nii.gz").array, res.array)


def test_standardize_refuses_to_overwrite(model_dir, tmp_path, capsys):
    write_nifti(tmp_path / "a.nii.gz", _volume(), AFFINE)
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"keep me")
    rc = main(["standardize", "--ckpt", str(model_dir / "dct"), "--input", str(tmp_path / "a.nii.gz"),
               "--output", str(out), "--quiet"])  # fmt: skip
    assert rc == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "case, message",
    [("missing", "not found"), ("text", "unsupported input"), ("empty_dir", "no NIfTI files and no usable DICOM"),
     ("dicom_from_nifti", "needs DICOM input"), ("wrong_model", "which does not restore images"),
     ("negative_sigma", "residual_sigma"), ("bad_sampler", "ddim"), ("strength_conditional", "strength"),
     ("mean_only_without_regression", "mean_only"), ("roi_2d", "3D models only"),
     ("overwrite_and_resume", "exclude each other")],
)  # fmt: skip
def test_bad_input_gives_clear_error(model_dir, tmp_path, capsys, case, message):
    write_nifti(tmp_path / "a.nii.gz", _volume(), AFFINE)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    inp = {
        "missing": tmp_path / "nope.nii.gz",
        "text": tmp_path / "notes.txt",
        "empty_dir": tmp_path / "empty",
    }.get(case, tmp_path / "a.nii.gz")
    args = ["standardize", "--ckpt", str(model_dir / ("stage1" if case == "wrong_model" else "dct")),
            "--input", str(inp), "--output", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    if case == "dicom_from_nifti":
        args += ["--format", "dicom"]
    args += {
        "negative_sigma": ["--decode", "residual", "--residual-sigma", "-1"],
        "bad_sampler": ["--sampler", "euler"],
        "strength_conditional": ["--strength", "0.3"],
        "mean_only_without_regression": ["--mean-only"],
        "roi_2d": ["--roi-size", "16", "16", "8"],
        "overwrite_and_resume": ["--overwrite", "--resume"],
    }.get(case, [])
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_standardize_dicom_series_to_derived_dicom(model_dir, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from medfusion.io.dicom import read_series, write_dicom_series

    vol = _volume(shape=(32, 32, 3))
    write_dicom_series(vol, tmp_path / "dicom_in", affine=AFFINE, series_description="sharp kernel",
                       derivation_description="test input")  # fmt: skip
    rc = main(["standardize", "--ckpt", str(model_dir / "dct"), "--input", str(tmp_path / "dicom_in"),
               "--output", str(tmp_path / "dicom_out"), "--format", "dicom", "--quiet"])  # fmt: skip
    assert rc == 0
    out = read_series(tmp_path / "dicom_out")
    assert out.array.shape == vol.shape
    np.testing.assert_allclose(out.affine, read_series(tmp_path / "dicom_in").affine, atol=1e-4)
    src = pydicom.dcmread(sorted((tmp_path / "dicom_in").iterdir())[0], stop_before_pixels=True)
    dst = pydicom.dcmread(sorted((tmp_path / "dicom_out").iterdir())[0], stop_before_pixels=True)
    assert dst.StudyInstanceUID == src.StudyInstanceUID and dst.SeriesInstanceUID != src.SeriesInstanceUID
    assert "DERIVED" in list(dst.ImageType)


def test_manifest_input_and_output_plan(model_dir, tmp_path):
    write_nifti(tmp_path / "data" / "c1" / "sharp.nii.gz", _volume(), AFFINE)
    write_nifti(tmp_path / "data" / "c2" / "sharp.nii.gz", _volume(2), AFFINE)
    manifest = {"test": [{"source": "c1/sharp.nii.gz", "case_id": "c1", "protocol": "sharp"},
                         {"source": "c2/sharp.nii.gz", "case_id": "c2", "protocol": "sharp"}]}  # fmt: skip
    (tmp_path / "data" / "m.json").write_text(json.dumps(manifest))
    items = discover_inputs(tmp_path / "data" / "m.json")
    assert [it.name for it in items] == ["c1_sharp", "c2_sharp"]
    with pytest.raises(ValueError, match="must be a folder"):
        plan_outputs(items, tmp_path / "x.nii.gz", "nifti")
    with pytest.raises(ValueError, match="no split"):
        discover_inputs(tmp_path / "data" / "m.json", split="validation")
    rc = main(["standardize", "--ckpt", str(model_dir / "dct"), "--input", str(tmp_path / "data" / "m.json"),
               "--output", str(tmp_path / "out"), "--quiet", "--steps", "1", "--sampler", "ddim"])  # fmt: skip
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["c1_sharp.nii.gz", "c2_sharp.nii.gz", "standardize_report.csv"]


def test_batch_continues_past_a_corrupt_scan_and_resumes(model_dir, tmp_path, capsys):
    """A bad file is reported (path + reason) and does not stop the batch; exit 1 = some failed; a second run with
    --resume computes only what is missing and leaves finished outputs alone."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_nifti(inp / "a.nii.gz", _volume(), AFFINE)
    inp.joinpath("b.nii.gz").write_bytes(b"\x1f\x8b not gzip")  # nibabel: ImageFileError / OSError
    args = ["standardize", "--ckpt", str(model_dir / "dct"), "--input", str(inp), "--output", str(out),
            "--quiet"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "failed" in err and "b.nii.gz" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "standardize_report.csv"]
    rows = {Path(r.input).name: r for r in read_report(out / "standardize_report.csv")}
    assert {k: r.status for k, r in rows.items()} == {"a.nii.gz": "written", "b.nii.gz": "failed"}
    assert rows["b.nii.gz"].reason  # why it failed
    assert rows["a.nii.gz"].output == str(out / "a.nii.gz") and rows["a.nii.gz"].seconds > 0
    assert rows["a.nii.gz"].cpu_peak_mb >= 0 and rows["a.nii.gz"].gpu_peak_mb is None  # per-case peak memory, CPU
    first = (out / "a.nii.gz").stat().st_mtime_ns
    assert main(args) == 2  # without --resume the existing output is refused, nothing is redone
    assert "refusing to overwrite" in capsys.readouterr().err
    write_nifti(inp / "b.nii.gz", _volume(1), AFFINE, overwrite=True)  # the user repairs the bad file
    assert main([*args, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "done" in text and "already done" in text
    assert (out / "a.nii.gz").stat().st_mtime_ns == first
    assert read_nifti(out / "b.nii.gz").array.shape == _volume(1).shape
    rows = {Path(r.input).name: r for r in read_report(out / "standardize_report.csv")}  # every input exactly once
    assert {k: r.status for k, r in rows.items()} == {"a.nii.gz": "already done", "b.nii.gz": "written"}
    assert rows["a.nii.gz"].seconds > 0  # the row of the run that wrote it, brought up to date


def test_all_scans_failing_exits_2(model_dir, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    inp.joinpath("a.nii.gz").write_bytes(b"garbage")
    rc = main(["standardize", "--ckpt", str(model_dir / "dct"), "--input", str(inp), "--output",
               str(tmp_path / "out"), "--quiet"])  # fmt: skip
    assert rc == 2
    assert "0/1 scans standardized" in capsys.readouterr().out


def test_derived_series_are_listed_and_need_include_derived(model_dir, tmp_path, capsys):
    """Our own DICOM output is a DERIVED series: discovery skips it by default and says how to include it."""
    pytest.importorskip("pydicom")
    from medfusion.io.dicom import write_dicom_series

    write_dicom_series(_volume(shape=(32, 32, 2)), tmp_path / "orig", affine=AFFINE, series_description="orig",
                       derivation_description="test input")  # fmt: skip
    args = ["standardize", "--ckpt", str(model_dir / "dct"), "--quiet"]
    to_dicom = ["--input", str(tmp_path / "orig"), "--output", str(tmp_path / "std"), "--format", "dicom"]
    assert main([*args, *to_dicom]) == 0
    args += ["--input", str(tmp_path / "std")]
    assert main([*args, "--output", str(tmp_path / "o1")]) == 2
    assert "--include-derived" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "o2.nii.gz"), "--include-derived"]) == 0
    assert (tmp_path / "o2.nii.gz").exists()


@pytest.mark.parametrize("broken", ["config", "weights", "shapes"])
def test_a_broken_model_folder_names_the_file(model_dir, tmp_path, capsys, broken):
    import shutil

    import yaml

    bad = tmp_path / "model"
    shutil.copytree(model_dir / "dct", bad)
    if broken == "config":
        (bad / "config.yaml").write_text("class_path: [unclosed")
    elif broken == "weights":
        (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    else:
        cfg = yaml.safe_load((bad / "config.yaml").read_text())
        cfg["init_args"]["channels"] = [8, 16]
        (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_nifti(tmp_path / "a.nii.gz", _volume(), AFFINE)
    rc = main(["standardize", "--ckpt", str(bad), "--input", str(tmp_path / "a.nii.gz"), "--output",
               str(tmp_path / "o.nii.gz"), "--quiet"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert str(bad) in err and ("config.yaml" in err or "model.safetensors" in err)
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_scan_stored_in_another_voxel_order_gets_the_same_axial_slices(model_dir, tmp_path):
    """Training reorients to RAS and slices axially; so does standardize: the same anatomy stored as (slice
    reversed, i, j) with the matching affine gives the same output in world space, in the input's own voxel order."""
    import nibabel as nib

    vol = _volume(shape=(32, 32, 3))
    a = AFFINE.copy()
    perm = np.ascontiguousarray(vol.transpose(2, 0, 1)[::-1])  # voxel (p, q, r) = vol[q, r, 2 - p]
    a_perm = np.eye(4)
    a_perm[:3, 0], a_perm[:3, 1], a_perm[:3, 2] = -a[:3, 2], a[:3, 0], a[:3, 1]
    a_perm[:3, 3] = a[:3, 3] + 2 * a[:3, 2]
    canon = nib.as_closest_canonical(nib.Nifti1Image(perm, a_perm))
    np.testing.assert_array_equal(np.asarray(canon.dataobj), vol)  # the same image in world space
    write_nifti(tmp_path / "ras.nii.gz", vol, a)
    write_nifti(tmp_path / "perm.nii.gz", perm, a_perm)
    for name in ("ras", "perm"):
        rc = main(["standardize", "--ckpt", str(model_dir / "dct"), "--input", str(tmp_path / f"{name}.nii.gz"),
                   "--output", str(tmp_path / f"out_{name}.nii.gz"), "--quiet"])  # fmt: skip
        assert rc == 0
    out_ras, out_perm = read_nifti(tmp_path / "out_ras.nii.gz"), read_nifti(tmp_path / "out_perm.nii.gz")
    np.testing.assert_allclose(out_perm.affine, a_perm)
    assert out_perm.array.shape == perm.shape
    back = nib.as_closest_canonical(nib.Nifti1Image(out_perm.array, out_perm.affine))
    np.testing.assert_allclose(np.asarray(back.dataobj), out_ras.array, atol=1e-4)
    assert not np.allclose(out_ras.array, vol, atol=1.0)  # the model did change the image


def test_3d_model_standardizes_in_sliding_windows(tmp_path, capsys):
    """3D DiffusionCT: windows run inside the model; one window as large as the (padded) volume gives the
    whole-volume result (the windows' shared noise field is the whole volume's), smaller overlapping windows a
    reproducible result of the input's shape."""
    model, _ = _tiny_model(tmp_path, spatial_dims=3)
    export_model(model, tmp_path / "dct3d")
    shape = (30, 28, 18)
    write_nifti(tmp_path / "v.nii.gz", _volume(shape=shape), AFFINE)
    padded = [str(s + (-s) % model.divisible_by) for s in shape]
    runs = {"whole": [], "one_window": ["--roi-size", *padded], "windows": ["--roi-size", "16", "16", "16"],
            "windows_again": ["--roi-size", "16", "16", "16"]}  # fmt: skip
    outs = {}
    for name, extra in runs.items():
        rc = main(["standardize", "--ckpt", str(tmp_path / "dct3d"), "--input", str(tmp_path / "v.nii.gz"),
                   "--output", str(tmp_path / f"{name}.nii.gz"), "--quiet", *extra])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        outs[name] = read_nifti(tmp_path / f"{name}.nii.gz").array
    np.testing.assert_allclose(outs["one_window"], outs["whole"], atol=1e-2)
    assert outs["windows"].shape == shape and np.isfinite(outs["windows"]).all()
    np.testing.assert_array_equal(outs["windows"], outs["windows_again"])  # seeded per scan: reproducible
    assert not np.allclose(outs["windows"], _volume(shape=shape), atol=1.0)


def test_sample_and_mean_only_choose_the_output_and_exclude_each_other(monkeypatch, capsys):
    """``--mean-only`` forces the posterior mean, ``--sample`` the DDPM sample; neither leaves the model's default."""
    from medfusion.apps import standardize as S

    seen = []
    monkeypatch.setattr(S, "run_restorer", lambda args, *, command, options, verb: seen.append(options) or 0)
    base = ["standardize", "--ckpt", "m", "--input", "i.nii.gz", "--output", "o", "--quiet"]
    for flag, expect in (([], None), (["--sample"], False), (["--mean-only"], True)):
        assert main(base + flag) == 0 and seen[-1]["mean_only"] is expect
    with pytest.raises(SystemExit) as err:
        main(base + ["--sample", "--mean-only"])
    assert err.value.code == 2 and "not allowed with" in capsys.readouterr().err
