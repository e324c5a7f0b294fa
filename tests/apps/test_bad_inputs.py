"""Bad input, every command: each case runs ``medfusion.cli.main`` on temporary folders and must give one line on
stderr naming the offending file (or setting) and what is wrong, no traceback, the exit status of
:mod:`medfusion.exit_codes`, and nothing partial in the output folder (no half-written file, no temporary).

The models are tiny and untrained (exported once per module); the scans are 32 x 32 x 3 NIfTI volumes in HU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pytest
import torch

from medfusion import keys
from medfusion.cli import main
from medfusion.exit_codes import EXIT_NOTHING_DONE
from medfusion.io.dicom import write_dicom_series
from medfusion.io.nifti import write_nifti
from medfusion.models.diffusion_ct import DiffusionCT, DiffusionCTAutoencoder
from medfusion.models.export import export_model
from medfusion.models.rddm import RDDM
from medfusion.models.segmentation import Segmentation

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])
SHAPE = (32, 32, 3)


def _ct(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """Air around a noisy soft-tissue block: a CT in HU."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[6:26, 6:26] = 40.0 + 30.0 * rng.standard_normal((20, 20, *shape[2:]))
    return vol


def _rddm(spatial_dims: int) -> RDDM:
    torch.manual_seed(0)
    unet = {
        "channels": (8, 8),
        "attention_levels": (False, False),
        "num_head_channels": 8,
        "norm_num_groups": 4,
    }
    return RDDM(spatial_dims=spatial_dims, ema_decay=None, num_sampling_steps=1, unet=unet)


def _diffusion_ct(root: Path) -> DiffusionCT:
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(spatial_dims=2, channels=(8, 16), latent_channels=2, norm_num_groups=4)
    tgt = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {keys.SOURCE: tgt, keys.TARGET: tgt}
    ae.calibrate_latent_scale([batch])
    export_model(ae, root / "stage1")
    model = DiffusionCT(
        autoencoder=str(root / "stage1"), sampling={"num_steps": 1},
        denoiser={"channels": (16, 32), "num_head_channels": 8, "norm_num_groups": 8},
    )  # fmt: skip
    model.loss(batch)  # calibrates the residual scale
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Models (``models/<name>``) and scans (``scans/<name>``): every bad input of the matrix, read only."""
    root = tmp_path_factory.mktemp("bad_inputs")
    models = root / "models"
    export_model(_diffusion_ct(models), models / "dct")
    export_model(_rddm(2), models / "rddm")
    export_model(_rddm(3), models / "rddm3d")
    torch.manual_seed(0)
    seg = Segmentation(num_classes=3, spatial_dims=2, channels=(8, 16), strides=(2,), num_res_units=1)
    export_model(seg, models / "segmentation")
    (models / "garbage.ckpt").write_bytes(b"not a checkpoint")
    scans = root / "scans"
    ct = _ct()
    volumes = {
        "good": ct,
        "nan": np.where(ct > 0, np.nan, ct).astype(np.float32),
        "inf": np.where(ct > 60, np.inf, ct).astype(np.float32),
        "constant": np.full(SHAPE, -1000.0, np.float32),
        "normalised": ((ct + 1000.0) / 2000.0).astype(np.float32),  # [0, 1], not HU
        "raw": (ct + 3000.0).astype(
            np.float32
        ),  # stored values without the rescale intercept: all above 1000
        "4d": np.stack([ct, ct], axis=-1),
        "2d": ct[..., 0],
    }
    for name, vol in volumes.items():
        write_nifti(scans / f"{name}.nii.gz", vol, AFFINE)
    nib.save(nib.Nifti1Image(np.zeros((0, 32, 3), np.float32), AFFINE), str(scans / "zero_size.nii.gz"))
    (scans / "zero_bytes.nii.gz").write_bytes(b"")
    write_dicom_series(
        ct, root / "dicom", affine=AFFINE, series_description="ct", derivation_description="test"
    )
    truncated = root / "truncated_dicom"
    write_dicom_series(ct, truncated, affine=AFFINE, series_description="ct", derivation_description="test")
    victim = sorted(truncated.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-500])  # PixelData shorter than Rows x Columns x 2
    (root / "nifti_folder").mkdir()
    write_nifti(root / "nifti_folder" / "scan.nii.gz", ct, AFFINE)
    (root / "empty").mkdir()
    converted = root / "converted"  # what `convert` writes, with one sidecar that is not JSON
    write_nifti(converted / "p1" / "s1.nii.gz", ct, AFFINE)
    (converted / "p1" / "s1.json").write_text("{not json")
    return root


class Case(NamedTuple):
    """One bad input: the command line (``{d}`` = the data folder, ``{o}`` = this case's output folder), the
    exit status, what the one stderr line must name (``{d}`` / ``{o}`` filled in) and say."""

    args: tuple[str, ...]
    names: str
    says: str
    code: int = EXIT_NOTHING_DONE


def _volume_case(command: str, model: str, scan: str, says: str, *extra: str, names: str = "scan") -> Case:
    """``medfusion standardize|restore`` on ``scan`` (a file of ``scans/`` or a path under the data folder) with
    ``models/<model>``; the line must name the scan (``names="scan"``), the model (``"model"``) or ``names``."""
    path = f"{{d}}/scans/{scan}" if scan.endswith(".nii.gz") else f"{{d}}/{scan}"
    ckpt = f"{{d}}/models/{model}"
    args = (command, "--ckpt", ckpt, "--input", path, "--output", "{o}", "--quiet", *extra)
    return Case(args, names={"scan": path, "model": ckpt}.get(names, names), says=says)


CASES: dict[str, Case] = {
    # ---- standardize (DiffusionCT) and restore (RDDM): the inputs
    "standardize-missing-input": _volume_case("standardize", "dct", "missing.nii.gz", "not found"),
    "standardize-nan": _volume_case("standardize", "dct", "nan.nii.gz", "NaN"),
    "standardize-inf": _volume_case("standardize", "dct", "inf.nii.gz", "infinite"),
    "standardize-zero-bytes": _volume_case("standardize", "dct", "zero_bytes.nii.gz", "Empty file"),
    "standardize-zero-size": _volume_case("standardize", "dct", "zero_size.nii.gz", "no voxels"),
    "standardize-constant": _volume_case("standardize", "dct", "constant.nii.gz", "constant image"),
    "standardize-4d": _volume_case("standardize", "dct", "4d.nii.gz", "4D series"),
    "standardize-hu-normalised-input": _volume_case("standardize", "dct", "normalised.nii.gz", "normalised"),
    "standardize-hu-raw-values": _volume_case("standardize", "dct", "raw.nii.gz", "no voxel inside"),
    "standardize-nifti-as-dicom": _volume_case(
        "standardize", "dct", "good.nii.gz", "not DICOM", "--format", "dicom"
    ),
    "standardize-text-file": _volume_case(
        "standardize", "dct", "models/dct/config.yaml", "unsupported input"
    ),
    "standardize-empty-folder": _volume_case(
        "standardize", "dct", "empty", "no NIfTI files and no usable DICOM"
    ),
    "restore-nan": _volume_case("restore", "rddm", "nan.nii.gz", "NaN"),
    "restore-3d-model-on-2d": _volume_case("restore", "rddm3d", "2d.nii.gz", "given to a 3D model"),
    "restore-4d": _volume_case("restore", "rddm", "4d.nii.gz", "4D series"),
    # ---- ... the models and the HU window
    "standardize-missing-model": _volume_case(
        "standardize", "nothing", "good.nii.gz", "model not found", names="model"
    ),
    "standardize-segmentation-model": _volume_case(
        "standardize",
        "segmentation",
        "good.nii.gz",
        "holds a Segmentation, which does not restore",
        names="model",
    ),
    "standardize-restoration-model": _volume_case(
        "standardize", "rddm", "good.nii.gz", "holds a RDDM, a model for `medfusion restore`", names="model"
    ),
    "restore-standardization-model": _volume_case(
        "restore",
        "dct",
        "good.nii.gz",
        "holds a DiffusionCT, a model for `medfusion standardize`",
        names="model",
    ),
    "restore-nifti-as-model": _volume_case(
        "restore", "../scans/good.nii.gz", "good.nii.gz", "neither an exported model folder", names="model"
    ),
    "restore-hu-window-not-the-models": _volume_case(
        "restore",
        "rddm",
        "good.nii.gz",
        "differs from the window RDDM was trained with (-1000 1000)",
        "--hu-window",
        "-500",
        "500",
        names="--hu-window -500 500",
    ),
    "restore-hu-window-reversed": _volume_case(
        "restore", "rddm", "good.nii.gz", "LOW < HIGH", "--hu-window", "100", "-100", names="--hu-window"
    ),
    # ---- convert (DICOM -> NIfTI)
    "convert-missing": Case(("convert", "{d}/missing", "{o}", "--no-progress"), "{d}/missing", "not found"),
    "convert-nifti-file": Case(
        ("convert", "{d}/scans/good.nii.gz", "{o}", "--no-progress"),
        "{d}/scans/good.nii.gz",
        "needs no conversion",
    ),
    "convert-nifti-folder": Case(
        ("convert", "{d}/nifti_folder", "{o}", "--no-progress"), "{d}/nifti_folder/scan.nii.gz", "not DICOM"
    ),
    "convert-empty-folder": Case(
        ("convert", "{d}/empty", "{o}", "--no-progress"), "{d}/empty", "nothing to convert"
    ),
    "convert-truncated-pixel-data": Case(
        ("convert", "{d}/truncated_dicom", "{o}", "--no-progress"), "IM00002.dcm", "pixel data is truncated"
    ),
    # ---- manifest (converted folder -> datalist)
    "manifest-missing": Case(
        ("manifest", "{d}/missing", "--task", "standardize", "--output", "{o}/m.json"),
        "{d}/missing",
        "not found",
    ),  # fmt: skip
    "manifest-nifti-file": Case(
        ("manifest", "{d}/scans/good.nii.gz", "--task", "standardize", "--output", "{o}/m.json"),
        "{d}/scans/good.nii.gz",
        "is a file",
    ),  # fmt: skip
    "manifest-dicom-folder": Case(
        ("manifest", "{d}/dicom", "--task", "standardize", "--output", "{o}/m.json"),
        "{d}/dicom",
        "no NIfTI + JSON sidecar pairs",
    ),  # fmt: skip
    "manifest-broken-sidecar": Case(
        ("manifest", "{d}/converted", "--task", "standardize", "--output", "{o}/m.json"),
        "{d}/converted/p1/s1.json",
        "not valid JSON",
    ),  # fmt: skip
    # ---- export (checkpoint -> model folder)
    "export-missing": Case(
        ("export", "--ckpt", "{d}/missing.ckpt", "--output", "{o}"), "{d}/missing.ckpt", "model not found"
    ),  # fmt: skip
    "export-nifti": Case(
        ("export", "--ckpt", "{d}/scans/good.nii.gz", "--output", "{o}"),
        "{d}/scans/good.nii.gz",
        "neither an exported model folder",
    ),  # fmt: skip
    "export-dicom-folder": Case(
        ("export", "--ckpt", "{d}/dicom", "--output", "{o}"), "{d}/dicom", "not an exported model"
    ),  # fmt: skip
    "export-garbage-ckpt": Case(
        ("export", "--ckpt", "{d}/models/garbage.ckpt", "--output", "{o}"),
        "{d}/models/garbage.ckpt",
        "could not be loaded",
    ),  # fmt: skip
    # ---- make-data (its one input is the output folder)
    "make-data-output-is-a-file": Case(
        (
            "make-data",
            "--output",
            "{d}/scans/good.nii.gz",
            "--patients",
            "2",
            "--size",
            "16",
            "--no-progress",
        ),
        "{d}/scans/good.nii.gz",
        "is a file",
    ),
}


def _fill(text: str, data: Path, out: Path) -> str:
    return text.replace("{d}", str(data)).replace("{o}", str(out))


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _leftovers(folder: Path) -> list[str]:
    """Temporaries and claims anywhere under ``folder`` (what a half-done write leaves)."""
    return sorted(str(p) for p in folder.rglob("*") if ".part" in p.name or p.name.endswith(".claim"))


def check_one_line_error(err: str, names: str, says: str) -> str:
    """The stderr of a failed command: exactly one line, no traceback, naming ``names`` and saying ``says``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert names in lines[0], (names, lines[0])
    assert says in lines[0], (says, lines[0])
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_the_exit_code_and_nothing_partial(name, data, tmp_path, capsys):
    case = CASES[name]
    before = _snapshot(data)
    out = tmp_path / "out"
    code = main([_fill(a, data, out) for a in case.args])
    err = capsys.readouterr().err
    assert code == case.code, err
    check_one_line_error(err, _fill(case.names, data, out), case.says)
    assert _snapshot(data) == before  # inputs untouched (convert writes no report into INPUT, ...)
    written = sorted(p.name for p in out.rglob("*") if p.is_file()) if out.exists() else []
    assert all(n.endswith("_report.csv") for n in written), written  # at most the run report
    assert _leftovers(tmp_path) == [] and _leftovers(data) == []


def test_a_bad_scan_in_a_batch_fails_alone(data, tmp_path, capsys):
    """A folder with good and bad scans: each bad one is one line on stderr naming it, the good one is written,
    exit status 1 (some failed); the run report lists every input exactly once."""
    from medfusion.io.run_report import read_report

    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("good", "nan", "constant", "4d"):
        (inp / f"{name}.nii.gz").write_bytes((data / "scans" / f"{name}.nii.gz").read_bytes())
    out = tmp_path / "out"
    args = [
        "standardize",
        "--ckpt",
        str(data / "models" / "dct"),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert sorted(Path(line.split()[1]).name for line in lines) == [
        "4d.nii.gz",
        "constant.nii.gz",
        "nan.nii.gz",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", "standardize_report.csv"]
    rows = read_report(out / "standardize_report.csv")
    assert sorted((Path(r.input).name, r.status) for r in rows) == [
        ("4d.nii.gz", "failed"), ("constant.nii.gz", "failed"), ("good.nii.gz", "written"), ("nan.nii.gz", "failed")
    ]  # fmt: skip
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ fit (LightningCLI)
FIT_CONFIG = """model:
  class_path: medfusion.models.supervised.SupervisedRestorer
  init_args: {spatial_dims: 2, channels: [4, 8], strides: [2], num_res_units: 0, hu_window: [-1000.0, 1000.0]}
data:
  class_path: medfusion.data.datamodule.ManifestDataModule
  init_args: {manifest: MANIFEST, task: standardize, spatial_dims: 2, roi_size: [16, 16], batch_size: 2,
              hu_window: [-1000.0, 1000.0]}
trainer: {max_steps: 1, enable_progress_bar: false, enable_model_summary: false, limit_val_batches: 0,
          num_sanity_val_steps: 0, logger: false, accelerator: cpu, devices: 1}
"""


def _fit_setup(root: Path, data: Path, bad_source: str | None = None) -> Path:
    """Three pairs of good scans, a manifest whose first source is ``bad_source`` (a file of ``data/scans``) and
    the config; returns the config path."""
    entries = []
    for i in range(3):
        for key in ("source", "target"):
            write_nifti(root / f"p{i}" / f"{key}.nii.gz", _ct(i), AFFINE)
        entries.append({"source": f"p{i}/source.nii.gz", "target": f"p{i}/target.nii.gz", "case_id": f"p{i}"})
    if bad_source is not None:
        (root / bad_source).write_bytes((data / "scans" / bad_source).read_bytes())
        entries[0]["source"] = bad_source
    (root / "manifest.json").write_text(json.dumps({"training": entries[:2], "validation": entries[2:]}))
    config = root / "fit.yaml"
    config.write_text(FIT_CONFIG.replace("MANIFEST", str(root / "manifest.json")))
    return config


FIT_CASES: dict[str, tuple[list[str], str, str]] = {
    "missing-config": (["--config={r}/nothing.yaml"], "{r}/nothing.yaml", "not found"),
    "missing-manifest": (
        ["--data.init_args.manifest={r}/nothing.json"],
        "{r}/nothing.json",
        "manifest file not found",
    ),
    "missing-scan-in-manifest": (
        ["--data.init_args.manifest={r}/broken.json"],
        "{r}/broken.json",
        "file not found: 'gone.nii.gz'",
    ),
    "hu-window-model-vs-data": (
        ["--data.init_args.hu_window=[-500,500]"],
        "hu_window",
        "differs from the data's hu_window (-500.0, 500.0)",
    ),
    "3d-model-2d-data": (
        ["--model.init_args.spatial_dims=3"],
        "spatial_dims=3",
        "data.init_args.spatial_dims=2",
    ),
}
# the data pipeline checks the voxels it loads (medfusion.data.checks.CheckScand): these must name the file
FIT_DATA_CASES = {
    "nan-scan": ("nan.nii.gz", "NaN"),
    "4d-scan": ("4d.nii.gz", "4D"),
    "2d-scan-paired-with-3d": ("2d.nii.gz", "2D"),
}


def _run_fit(args: list[str], root: Path, monkeypatch) -> int:
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["medfusion"])  # LightningCLI warns when sys.argv also has arguments
    return main(args)


@pytest.mark.parametrize("name", list(FIT_CASES))
def test_fit_bad_config_or_data_is_one_line(name, data, tmp_path, monkeypatch, capsys):
    config = _fit_setup(tmp_path, data)
    broken = json.loads((tmp_path / "manifest.json").read_text())
    broken["training"][0]["source"] = "gone.nii.gz"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    extra, names, says = FIT_CASES[name]
    args = ["fit", f"--config={config}", *(a.replace("{r}", str(tmp_path)) for a in extra)]
    capsys.readouterr()
    assert _run_fit(args, tmp_path, monkeypatch) == EXIT_NOTHING_DONE
    err = capsys.readouterr().err
    # Lightning prints its own notes (seed, devices) before a failure that comes after setup: the error is the
    # one line that starts with "medfusion fit:", and it is the last
    ours = [line for line in err.splitlines() if line.startswith("medfusion fit:")]
    assert len(ours) == 1 and err.strip().splitlines()[-1] == ours[0], err
    check_one_line_error(ours[0], names.replace("{r}", str(tmp_path)), says)
    assert "Traceback" not in err
    assert list(tmp_path.rglob("*.ckpt")) == [] and _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", list(FIT_DATA_CASES))
def test_fit_bad_scan_names_the_file(name, data, tmp_path, monkeypatch, capsys):
    bad, says = FIT_DATA_CASES[name]
    config = _fit_setup(tmp_path, data, bad_source=bad)
    capsys.readouterr()
    code = _run_fit(["fit", f"--config={config}"], tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == EXIT_NOTHING_DONE, err
    ours = [line for line in err.splitlines() if line.startswith("medfusion fit:")]
    assert len(ours) == 1, err
    check_one_line_error(ours[0], str(tmp_path / bad), says)


def test_every_command_is_in_the_matrix():
    """A new command gets its bad-input cases here, or in its own test file named below."""
    from medfusion.cli import COMMANDS

    elsewhere = {
        "augment": "tests/apps/test_augment.py",
        "evaluate": "tests/apps/test_evaluate.py, tests/apps/test_evaluate_downstream.py",
        "dpm-v3-stats": "tests/models/test_dpm_v3_stats.py",
        "demo": "runs on built-in data only (its bad options: tests/apps/test_demo.py)",
    }
    covered = {case.args[0] for case in CASES.values()} | {"fit"}
    assert set(COMMANDS) - covered <= set(elsewhere), set(COMMANDS) - covered
