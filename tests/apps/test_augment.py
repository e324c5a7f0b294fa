"""``medfusion augment`` as a batch: a bad case is reported and the others are written; the exit status follows
:mod:`medfusion.exit_codes` (forward-process baseline, no model, so it runs in seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medfusion.cli import main
from medfusion.exit_codes import EXIT_NOTHING_DONE, EXIT_OK, EXIT_SOME_FAILED
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
