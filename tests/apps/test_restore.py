"""The one volume job of ``medfusion standardize`` / ``restore``: the Restorer contract seen from the app (a small
deterministic fake model), and ``medfusion restore`` end to end on tiny real RDDM / DiffIR models."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from medfusion.apps.volume_job import load_restorer, restore_scans
from medfusion.cli import main
from medfusion.data.pipelines import hu_to_unit, unit_to_hu
from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE, EXIT_OK
from medfusion.io.nifti import read_nifti, write_nifti
from medfusion.models.base import Restorer
from medfusion.models.export import export_model

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])
AFFINE[:3, 3] = (-10.0, 5.0, 30.0)


class FakeRestorer(nn.Module):
    """Deterministic Restorer: ``(x + 1) · 0.5^num_steps - 1 + eta · u`` with ``u ~ U(0, 1)`` per image from the
    generator; records every call. The sliding-window options are accepted (3D) and ignored."""

    def __init__(self, spatial_dims: int = 2, divisible_by: int = 4) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self._divisible_by = divisible_by
        self.calls: list[dict[str, Any]] = []

    @property
    def divisible_by(self) -> int:
        return self._divisible_by

    @property
    def hu_window(self) -> tuple[float, float]:
        return (-1000.0, 1000.0)

    def inference_options(self) -> dict[str, Any]:
        window = {"sw_batch_size": 2, "overlap": 0.25} if self.spatial_dims == 3 else {}
        return {"num_steps": 1, "eta": 0.0, **window}

    def check_options(self, **options: Any) -> None:
        valid = self.inference_options()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"FakeRestorer takes no option {', '.join(unknown)}; valid: {', '.join(valid)}")
        if options.get("num_steps", 1) < 1:
            raise ValueError(f"num_steps must be >= 1, got {options['num_steps']}")

    def describe(self, **options: Any) -> str:
        return f"fake restoration, {options.get('num_steps', 1)} steps"

    def restore(self, images: Tensor, *, generator=None, roi_size=None, **options: Any) -> Tensor:
        self.check_options(**options)
        self.calls.append({"shape": tuple(images.shape), "roi_size": roi_size, "options": dict(options)})
        opts = {**self.inference_options(), **options}
        u = torch.rand(images.shape[0], generator=generator).view(-1, *[1] * (images.ndim - 1))
        return (images + 1) * 0.5 ** opts["num_steps"] - 1 + opts["eta"] * u.to(images.device)


def _volume(seed: int = 0, shape=(30, 26, 3)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = (-800.0 + 1500.0 * rng.random(shape)).astype(np.float32)
    vol[0, 0, :] = -1500.0  # below the window: passed through
    return vol


def test_the_fake_is_a_restorer_and_a_plain_module_is_not(tmp_path, monkeypatch):
    assert isinstance(FakeRestorer(), Restorer)
    assert not isinstance(nn.Linear(2, 2), Restorer)
    import medfusion.models.export as export

    monkeypatch.setattr(export, "load_model", lambda path: nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"some/model holds a Linear, which does not restore images"):
        load_restorer("some/model")


def test_restore_scans_applies_restore_with_its_options_to_every_scan(tmp_path):
    """Oracle: the fake's formula in [-1, 1], mapped back to HU; voxels outside the window keep their value; 2D
    slices come in batches padded to multiples of divisible_by; the generator is reseeded per scan."""
    vol = _volume()
    write_nifti(tmp_path / "in" / "a.nii.gz", vol, AFFINE)
    write_nifti(tmp_path / "in" / "b.nii.gz", vol, AFFINE)  # the same scan twice: the same output (per-scan seed)
    model = FakeRestorer()
    results = restore_scans(
        model, tmp_path / "in", tmp_path / "out", options={"num_steps": 2}, batch_size=2, show_progress=False
    )
    assert [r.status for r in results] == ["written", "written"]
    unit = np.asarray(hu_to_unit(vol, (-1000.0, 1000.0)), dtype=np.float32)
    expected = np.asarray(unit_to_hu((unit + 1) * 0.25 - 1, (-1000.0, 1000.0)), dtype=np.float32)
    expected[0, 0, :] = -1500.0
    a = read_nifti(tmp_path / "out" / "a.nii.gz")
    np.testing.assert_allclose(a.array, expected, atol=1e-2)
    np.testing.assert_allclose(a.affine, AFFINE)
    assert [c["shape"] for c in model.calls] == [(2, 1, 32, 28), (1, 1, 32, 28)] * 2  # 3 slices, batch 2, padded
    assert all(c["options"] == {"num_steps": 2} and c["roi_size"] is None for c in model.calls)
    model.calls.clear()
    restore_scans(model, tmp_path / "in", tmp_path / "noisy", options={"eta": 0.5}, seed=3, show_progress=False)
    noisy = [read_nifti(tmp_path / "noisy" / f"{n}.nii.gz").array for n in "ab"]
    np.testing.assert_array_equal(noisy[0], noisy[1])
    assert not np.allclose(noisy[0], read_nifti(tmp_path / "out" / "a.nii.gz").array)


def test_options_are_checked_before_any_scan_is_read(tmp_path):
    model = FakeRestorer()
    with pytest.raises(ValueError, match="no option strength; valid: num_steps, eta"):
        restore_scans(model, tmp_path / "missing", tmp_path / "out", options={"strength": 0.3})
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        restore_scans(model, tmp_path / "missing", tmp_path / "out", options={"num_steps": 0})
    with pytest.raises(ValueError, match="3D models only"):
        restore_scans(model, tmp_path / "missing", tmp_path / "out", roi_size=(16, 16, 16))
    with pytest.raises(ValueError, match="multiples of 4"):
        restore_scans(FakeRestorer(spatial_dims=3), tmp_path / "missing", tmp_path / "out", roi_size=(16, 16, 6))
    assert model.calls == []


def test_command_line_flags_become_the_models_options(tmp_path, monkeypatch, capsys):
    """3D: the volume in one call with the window size and the window options; 2D: --overlap is refused."""
    import medfusion.models.export as export

    fake = FakeRestorer(spatial_dims=3)
    monkeypatch.setattr(export, "load_model", lambda path: fake)
    write_nifti(tmp_path / "v.nii.gz", _volume(shape=(18, 16, 10)), AFFINE)
    args = ["restore", "--ckpt", "fake", "--input", str(tmp_path / "v.nii.gz"), "--quiet", "--device", "cpu"]
    rc = main([*args, "--output", str(tmp_path / "o.nii.gz"), "--steps", "3", "--roi-size", "8", "8", "8",
               "--batch-size", "5", "--overlap", "0.5"])  # fmt: skip
    assert rc == EXIT_OK, capsys.readouterr().err
    (call,) = fake.calls
    assert call["shape"] == (1, 1, 20, 16, 12) and call["roi_size"] == (8, 8, 8)
    assert call["options"] == {"num_steps": 3, "sw_batch_size": 5, "overlap": 0.5}
    monkeypatch.setattr(export, "load_model", lambda path: FakeRestorer(spatial_dims=2))
    assert main([*args, "--output", str(tmp_path / "o3.nii.gz"), "--overlap", "0.5"]) == EXIT_NOTHING_DONE
    assert "--overlap applies to 3D models only" in capsys.readouterr().err
    assert not (tmp_path / "o3.nii.gz").exists()


def test_help_states_the_exit_codes(capsys):
    for command in ("restore", "standardize", "export", "augment"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert " ".join(EXIT_CODES_HELP.split()[:6]) in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------------- real tiny models
def _tiny_rddm(spatial_dims: int):
    from medfusion.models.rddm import RDDM

    torch.manual_seed(0)
    return RDDM(
        spatial_dims=spatial_dims, ema_decay=None, num_sampling_steps=2,
        unet={"channels": (8, 8), "attention_levels": (False, False), "num_head_channels": 8, "norm_num_groups": 4},
    )  # fmt: skip


def test_restore_end_to_end_from_the_command_line(tmp_path, capsys):
    export_model(_tiny_rddm(2), tmp_path / "rddm")
    vol = _volume()
    write_nifti(tmp_path / "in" / "scan.nii.gz", vol, AFFINE)
    args = ["restore", "--ckpt", str(tmp_path / "rddm"), "--input", str(tmp_path / "in"), "--output",
            str(tmp_path / "out"), "--device", "cpu", "--quiet", "--steps", "2", "--eta", "0.5"]  # fmt: skip
    assert main(args) == EXIT_OK, capsys.readouterr().err
    out = read_nifti(tmp_path / "out" / "scan.nii.gz")
    np.testing.assert_allclose(out.affine, AFFINE)
    assert out.array.shape == vol.shape and np.isfinite(out.array).all()
    assert np.abs(out.array - vol).mean() > 1.0  # the (untrained) model did change the scan
    assert out.array[0, 0, 0] == -1500.0
    stamp = (tmp_path / "out" / "scan.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--resume"]) == EXIT_OK
    assert "1 already done" in capsys.readouterr().out
    assert (tmp_path / "out" / "scan.nii.gz").stat().st_mtime_ns == stamp


def test_restore_refuses_what_the_model_cannot_take(tmp_path, capsys):
    from medfusion.models.diffir import DiffIRStage2

    torch.manual_seed(0)
    dirformer = {"dim": 8, "num_blocks": (1, 1, 1, 1), "num_refinement_blocks": 1, "heads": (1, 1, 2, 2)}
    cpen = {"downscale": 2, "n_feats": 8, "n_encoder_res": 1}
    export_model(DiffIRStage2(dirformer=dirformer, cpen=cpen, ema_decay=None), tmp_path / "diffir")
    write_nifti(tmp_path / "scan.nii.gz", _volume(), AFFINE)
    args = ["restore", "--ckpt", str(tmp_path / "diffir"), "--input", str(tmp_path / "scan.nii.gz"), "--output",
            str(tmp_path / "out.nii.gz"), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*args, "--steps", "3"]) == EXIT_NOTHING_DONE
    assert "num_steps" in capsys.readouterr().err
    assert not (tmp_path / "out.nii.gz").exists()
    assert main(args) == EXIT_OK, capsys.readouterr().err
    assert not np.allclose(read_nifti(tmp_path / "out.nii.gz").array, _volume(), atol=1.0)


def test_sliding_windows_that_cover_the_volume_equal_whole_volume_inference(tmp_path, capsys):
    """3D RDDM: one window as large as the (padded) volume gives exactly the whole-volume result."""
    export_model(_tiny_rddm(3), tmp_path / "rddm3d")
    write_nifti(tmp_path / "v.nii.gz", _volume(shape=(13, 12, 10)), AFFINE)  # padded to (14, 12, 10)
    outs = []
    for name, extra in (("whole", []), ("window", ["--roi-size", "14", "12", "10"])):
        rc = main(["restore", "--ckpt", str(tmp_path / "rddm3d"), "--input", str(tmp_path / "v.nii.gz"), "--output",
                   str(tmp_path / f"{name}.nii.gz"), "--device", "cpu", "--quiet", *extra])  # fmt: skip
        assert rc == EXIT_OK, capsys.readouterr().err
        outs.append(read_nifti(tmp_path / f"{name}.nii.gz").array)
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-3)
