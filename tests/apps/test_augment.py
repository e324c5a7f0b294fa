"""``medfusion augment`` as a batch: a bad case is reported and the others are written; the exit status follows
:mod:`medfusion.exit_codes` (forward-process baseline, no model, so it runs in seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion.cli import main
from medfusion.data.pipelines import VoxelFieldToGridd
from medfusion.exit_codes import EXIT_NOTHING_DONE, EXIT_OK, EXIT_SOME_FAILED
from medfusion.io.displacement import read_voxel_field
from medfusion.io.nifti import write_nifti
from medfusion.io.run_report import read_report


def _manifest(tmp_path, images: dict[str, bool]) -> str:
    """A segment manifest over ``images`` (name -> readable); unreadable ones hold garbage."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, ok in images.items():
        if ok:
            yy, xx = np.mgrid[:32, :32]
            disc = ((yy - 16) ** 2 + (xx - 16) ** 2 < 81).astype(np.float32)
            write_nifti(tmp_path / f"{name}.nii.gz", 1000 * disc - 500, np.eye(4))
            write_nifti(tmp_path / f"{name}_lab.nii.gz", disc.astype(np.int16), np.eye(4))
        else:
            (tmp_path / f"{name}.nii.gz").write_bytes(b"not a nifti")
            (tmp_path / f"{name}_lab.nii.gz").write_bytes(b"not a nifti")
        entries.append({"image": f"{name}.nii.gz", "label": f"{name}_lab.nii.gz"})
    (tmp_path / "m.json").write_text(json.dumps({"task": "segment", "training": entries}))
    return str(tmp_path / "m.json")


def _args(manifest: str, out) -> list[str]:
    return ["augment", "--input", manifest, "--n", "1", "--output", str(out), "--t-range", "2", "3"]


def test_a_bad_case_is_reported_and_the_others_are_written(tmp_path, capsys):
    manifest = _manifest(tmp_path, {"good": True, "bad": False})
    assert main(_args(manifest, tmp_path / "out")) == EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert "failed" in err and "bad.nii.gz" in err
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [r["image"] for r in doc["training"]] == ["images/good_aug000.nii.gz"]
    assert (tmp_path / "out" / "images" / "good_aug000.nii.gz").exists()


def test_exit_status_when_everything_or_nothing_works(tmp_path, capsys):
    good = _manifest(tmp_path / "a", {"good": True})
    assert main(_args(good, tmp_path / "a" / "out")) == EXIT_OK
    assert main(_args(_manifest(tmp_path / "b", {"bad": False}), tmp_path / "b" / "out")) == EXIT_NOTHING_DONE
    assert main([*_args(good, tmp_path / "c"), "--n", "0"]) == EXIT_NOTHING_DONE
    assert "--n must be >= 1" in capsys.readouterr().err


def test_report_has_one_row_per_case_and_a_resumed_run_brings_it_up_to_date(tmp_path, capsys):
    manifest = _manifest(tmp_path, {"good": True, "bad": False})
    out = tmp_path / "out"
    assert main([*_args(manifest, out), "--n", "2"]) == EXIT_SOME_FAILED
    rows = {Path(r.input).name: r for r in read_report(out / "augment_report.csv")}
    assert {k: r.status for k, r in rows.items()} == {"good.nii.gz": "written", "bad.nii.gz": "failed"}
    assert "bad.nii.gz" in rows["bad.nii.gz"].input and rows["bad.nii.gz"].reason
    stamp = (out / "images" / "good_aug001.nii.gz").stat().st_mtime_ns
    for suffix in ("", "_lab"):  # the user repairs the bad case
        (tmp_path / f"bad{suffix}.nii.gz").write_bytes((tmp_path / f"good{suffix}.nii.gz").read_bytes())
    assert main([*_args(manifest, out), "--n", "2"]) == EXIT_OK
    rows = {Path(r.input).name: r.status for r in read_report(out / "augment_report.csv")}
    assert rows == {"good.nii.gz": "already done", "bad.nii.gz": "written"}  # every case exactly once
    assert (out / "images" / "good_aug001.nii.gz").stat().st_mtime_ns == stamp  # not recomputed
    doc = json.loads((out / "manifest.json").read_text())
    assert sorted(r["image"] for r in doc["training"]) == [
        f"images/{c}_aug00{k}.nii.gz" for c in ("bad", "good") for k in (0, 1)
    ]


# ------------------------------------------------------------------------------------ --pairs (registration)
def _rotated_affine() -> np.ndarray:
    """Axes swapped and flipped, anisotropic, offset: the register pipeline reorients, the ITK file converts."""
    a = np.eye(4)
    a[:3, :3] = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([0.8, 1.2, 2.0])
    a[:3, 3] = [5.0, -3.0, 2.0]
    return a


def _pair_input(tmp_path, shape: tuple[int, ...]) -> str:
    """One labelled image (a smooth blob on a ripple, inside the HU window: no clipping; the label: the blob's
    core) and its segment manifest."""
    nd = len(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    radius = np.array(shape, dtype=float).reshape(nd, *[1] * nd) / 3
    r2 = (((grid - radius * 1.5) / radius) ** 2).sum(0)
    inside = (r2 < 1).astype(np.float32)
    write_nifti(tmp_path / "a.nii.gz", (600 * np.exp(-r2) - 400 + 50 * np.sin(grid[0] / 2)).astype(np.float32),
                _rotated_affine())  # fmt: skip
    write_nifti(tmp_path / "a_lab.nii.gz", inside.astype(np.int16), _rotated_affine())
    (tmp_path / "m.json").write_text(
        json.dumps({"task": "segment", "training": [{"image": "a.nii.gz", "label": "a_lab.nii.gz"}]})
    )
    return str(tmp_path / "m.json")


def _inside(ddf: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial): voxels whose pulled point ``x + u(x)`` stays inside the grid (no padding differences)."""
    spatial = ddf.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij"))[None] + ddf
    return torch.stack([(grid[:, d] >= 0) & (grid[:, d] <= s - 1) for d, s in enumerate(spatial)]).all(0)[
        :, None
    ]


@pytest.mark.parametrize("shape", [(32, 24), (16, 16, 8)])
def test_pairs_load_as_a_register_batch_whose_field_warps_moving_onto_fixed(tmp_path, shape):
    """``augment --pairs`` -> ``ManifestDataModule(task="register")``: the batch's ``ddf`` (voxels, pull, on the
    reoriented grid) warps ``moving`` onto ``fixed``; SimpleITK with the ITK file does the same on disk (oracle)."""
    import SimpleITK as sitk

    from medfusion.data.datamodule import ManifestDataModule
    from medfusion.fields import warp
    from medfusion.io.nifti import read_nifti

    nd, out = len(shape), tmp_path / "out"
    assert (
        main([*_args(_pair_input(tmp_path, shape), out), "--pairs", "--n", "2", "--t-range", "20", "24"]) == 0
    )
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["task"] == "register" and len(doc["training"]) == 2
    entry = doc["training"][1]
    assert {k: entry[k] for k in ("moving", "moving_label", "fixed", "fixed_label", "ddf", "ddf_itk")} == {
        "moving": "moving/a.nii.gz", "moving_label": "moving_labels/a.nii.gz", "fixed": "fixed/a_aug001.nii.gz",
        "fixed_label": "fixed_labels/a_aug001.nii.gz", "ddf": "fields/a_aug001.nii.gz",
        "ddf_itk": "fields_itk/a_aug001.nii.gz",
    }  # fmt: skip
    np.testing.assert_array_equal(
        read_nifti(out / entry["moving"]).array, read_nifti(tmp_path / "a.nii.gz").array
    )

    dm = ManifestDataModule(str(out / "manifest.json"), task="register", spatial_dims=nd, batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    moving, fixed, ddf = batch["moving"], batch["fixed"], batch["ddf"]
    assert ddf.shape == (2, nd, *moving.shape[2:]) and moving.shape[2:] == (shape[1], shape[0], *shape[2:])
    assert (
        0.3 < float(ddf.abs().max()) < 10 and float((moving - fixed).abs().max()) > 0.2
    )  # a real deformation
    inside = _inside(ddf)
    assert inside.float().mean() > 0.7
    torch.testing.assert_close(warp(moving, ddf)[inside], fixed[inside], atol=1e-4, rtol=0)
    moved_label = warp(batch["moving_label"], ddf, mode="nearest")
    assert (moved_label == batch["fixed_label"])[inside].float().mean() > 0.99

    # resampled to another spacing: the field's components follow the grid (up to interpolation error), and
    # clearly better than the components as loaded (re-expression switched off)
    def resampled_error() -> tuple[float, float]:
        dm = ManifestDataModule(str(out / "manifest.json"), task="register", spatial_dims=nd, batch_size=2,
                                pixdim=[1.0] * nd)  # fmt: skip
        batch = next(iter(dm.train_dataloader()))
        moving, fixed, ddf = batch["moving"], batch["fixed"], batch["ddf"]
        inside = _inside(ddf)
        return float((warp(moving, ddf) - fixed).abs()[inside].mean()), float(
            (moving - fixed).abs()[inside].mean()
        )

    error, before = resampled_error()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VoxelFieldToGridd, "__call__", lambda self, data: dict(data))
        raw, _ = resampled_error()
    assert error < 0.5 * before and error < 0.5 * raw, (error, before, raw)

    for k in range(2):  # the ITK file: sitk.Resample(moving, fixed, DisplacementFieldTransform) = fixed
        e = doc["training"][k]
        mov, fix = (sitk.ReadImage(str(out / e[key]), sitk.sitkFloat64) for key in ("moving", "fixed"))
        tx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / e["ddf_itk"]), sitk.sitkVectorFloat64))
        theirs = sitk.GetArrayFromImage(sitk.Resample(mov, fix, tx, sitk.sitkLinear, 0.0)).transpose()
        ours, field = read_nifti(out / e["fixed"]).array, read_voxel_field(out / e["ddf"]).ddf
        inside = _inside(torch.from_numpy(field)[None])[0, 0].numpy()
        np.testing.assert_allclose(theirs[inside], ours[inside], rtol=1e-5, atol=1e-3)  # float32 files


def test_pairs_of_3d_fields_are_refused_as_2d_slices(tmp_path):
    from medfusion.data.datamodule import ManifestDataModule

    out = tmp_path / "out"
    assert main([*_args(_pair_input(tmp_path, (16, 16, 8)), out), "--pairs", "--t-range", "20", "24"]) == 0
    dm = ManifestDataModule(str(out / "manifest.json"), task="register", spatial_dims=2, batch_size=1)
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps the transform's ValueError
        next(iter(dm.train_dataloader()))
    assert "ddf: a 3D field cannot be cut into 2D slices along axis 2" in str(err.value.__cause__)


def test_pairs_resume_and_report(tmp_path, capsys):
    manifest = _manifest(tmp_path, {"good": True, "bad": False})
    out = tmp_path / "out"
    assert main([*_args(manifest, out), "--pairs", "--n", "2"]) == EXIT_SOME_FAILED
    rows = {Path(r.input).name: r.status for r in read_report(out / "augment_report.csv")}
    assert rows == {"good.nii.gz": "written", "bad.nii.gz": "failed"}
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        ["augment_report.csv", "manifest.json", "moving/good.nii.gz", "moving_labels/good.nii.gz"]
        + [
            f"{d}/good_aug00{k}.nii.gz"
            for d in ("fixed", "fixed_labels", "fields", "fields_itk")
            for k in (0, 1)
        ]
    )  # nothing of the bad case, no temporary file
    stamp = (out / "fixed" / "good_aug001.nii.gz").stat().st_mtime_ns
    (tmp_path / "bad.nii.gz").write_bytes((tmp_path / "good.nii.gz").read_bytes())
    (tmp_path / "bad_lab.nii.gz").write_bytes((tmp_path / "good_lab.nii.gz").read_bytes())
    assert main([*_args(manifest, out), "--pairs", "--n", "2"]) == EXIT_OK
    rows = {Path(r.input).name: r.status for r in read_report(out / "augment_report.csv")}
    assert rows == {"good.nii.gz": "already done", "bad.nii.gz": "written"}
    assert (out / "fixed" / "good_aug001.nii.gz").stat().st_mtime_ns == stamp
    doc = json.loads((out / "manifest.json").read_text())
    assert sorted(e["fixed"] for e in doc["training"]) == [
        f"fixed/{c}_aug00{k}.nii.gz" for c in ("bad", "good") for k in (0, 1)
    ]


# ------------------------------------------------------------------------------------------------ bad input
def _tiny_rddm_export(folder: Path) -> str:
    """A model of another task (restoration) for ``--ckpt``."""
    from medfusion.models.export import export_model
    from medfusion.models.rddm import RDDM

    torch.manual_seed(0)
    model = RDDM(
        spatial_dims=2, ema_decay=None, num_sampling_steps=2,
        unet={"channels": (8, 8), "attention_levels": (False, False), "num_head_channels": 8, "norm_num_groups": 4},
    )  # fmt: skip
    return str(export_model(model, folder))


def _drdm_net(folder: Path, spatial_dims: int) -> str:
    """Recovery-net weights (``.safetensors``) of a ``spatial_dims`` DRDM model."""
    from safetensors.torch import save_file

    from medfusion.nets.drdm import DRDMRecoveryNet

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"drdm{spatial_dims}d.safetensors"
    save_file(DRDMRecoveryNet(spatial_dims=spatial_dims).state_dict(), str(path))
    return str(path)


def _case(tmp_path, image: np.ndarray, label: np.ndarray | None = None) -> str:
    """A one-case manifest over ``image`` (and ``label``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_nifti(tmp_path / "scan.nii.gz", image, np.eye(4))
    entry = {"image": "scan.nii.gz"}
    if label is not None:
        write_nifti(tmp_path / "scan_lab.nii.gz", label, np.eye(4))
        entry["label"] = "scan_lab.nii.gz"
    task = "segment" if label is not None else "image"
    (tmp_path / "m.json").write_text(json.dumps({"task": task, "training": [entry]}))
    return str(tmp_path / "m.json")


_DISC = np.pad(np.ones((8, 8), np.float32), 12)
_NAN = _DISC.copy()
_NAN[3, 4] = np.nan


@pytest.mark.parametrize(
    "case, named, what",
    [
        ("missing manifest", "nowhere.json", "manifest file not found"),
        ("missing image", "gone.nii.gz", "file not found"),
        ("nan", "scan.nii.gz", "NaN or infinite"),
        ("4d", "scan.nii.gz", "4D image"),
        ("label shape", "scan_lab.nii.gz", "label of shape"),
        ("other task", "rddm", "RDDM model, not DRDM"),
        ("register manifest", "m.json", "has no 'image'"),
        ("3d image, 2d model", "scan.nii.gz", "3D image for a 2D model"),
        ("2d image, 3d model", "scan.nii.gz", "2D image for a 3D model"),
    ],
)
def test_bad_input_gives_one_line_naming_the_file_and_writes_nothing(tmp_path, capsys, case, named, what):
    """Arguments or a manifest that cannot work: exit 2 before any output; a bad case: a ``failed`` row (exit 2
    when it is the only one) and none of its files."""
    extra: list[str] = []
    if case == "missing manifest":
        manifest = str(tmp_path / "nowhere.json")
    elif case == "missing image":
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / "m.json").write_text(
            json.dumps({"task": "image", "training": [{"image": "gone.nii.gz"}]})
        )
        manifest = str(tmp_path / "m.json")
    elif case == "nan":
        manifest = _case(tmp_path, _NAN)
    elif case == "4d":
        manifest = _case(tmp_path, np.stack([_DISC[..., None]] * 2, axis=-1).repeat(3, axis=2))
    elif case == "label shape":
        manifest = _case(tmp_path, _DISC, np.zeros((16, 16), np.int16))
    elif case == "other task":
        manifest, extra = _case(tmp_path, _DISC), ["--ckpt", _tiny_rddm_export(tmp_path / "rddm")]
    elif case == "register manifest":
        _case(tmp_path, _DISC)
        doc = {"task": "register", "training": [{"moving": "scan.nii.gz", "fixed": "scan.nii.gz"}]}
        (tmp_path / "m.json").write_text(json.dumps(doc))
        manifest = str(tmp_path / "m.json")
    elif case == "3d image, 2d model":
        manifest = _case(tmp_path, np.stack([_DISC] * 3, axis=-1))
        extra = ["--ckpt", _drdm_net(tmp_path / "nets", 2)]
    else:
        manifest, extra = _case(tmp_path, _DISC), ["--ckpt", _drdm_net(tmp_path / "nets", 3)]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([*_args(manifest, out), "--pairs", *extra]) == EXIT_NOTHING_DONE
    lines = [line for line in capsys.readouterr().err.splitlines() if "nvImageCodec" not in line]
    assert len(lines) == 1 and named in lines[0] and what in lines[0], lines
    assert "Traceback" not in lines[0]
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.exists() else []
    assert left in (
        [],
        ["augment_report.csv"],
    )  # the run report at most: no output, manifest or temporary file


def test_fit_trains_a_registration_config_on_the_pairs(tmp_path, monkeypatch):
    """``augment --pairs`` then ``medfusion fit`` of the registration config (tiny net) on the written manifest, with
    the supervised term reading the known field ``ddf``."""
    from medfusion.data.datamodule import ManifestDataModule
    from medfusion.models.registration import Registration

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pairs"
    assert (
        main([*_args(_pair_input(tmp_path, (32, 32)), out), "--pairs", "--n", "2", "--t-range", "20", "24"])
        == 0
    )
    tiny = ["--model.init_args.channels", "[8, 8, 8, 8]", "--model.init_args.final_conv_channels", "[8]"]
    args = ["fit", "--config", str(root / "configs/registration/builtin2d.yaml"),
            "--data.init_args.manifest", str(out / "manifest.json"), "--data.init_args.roi_size", "[32, 32]",
            "--data.init_args.batch_size", "2", "--model.init_args.supervised_weight", "1.0", *tiny,
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_checkpointing", "false", "--trainer.logger", "false",
            "--trainer.callbacks", "[]"]  # fmt: skip
    assert main(args) == 0
    batch = next(
        iter(ManifestDataModule(str(out / "manifest.json"), task="register", batch_size=2).train_dataloader())
    )
    model = Registration(channels=(8, 8, 8, 8), final_conv_channels=(8,), supervised_weight=1.0)
    parts = model.losses(batch)
    assert torch.isfinite(parts["supervised"]) and parts["supervised"] > 0
