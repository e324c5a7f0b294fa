"""``medfusion convert``: end to end on a temporary tree, exit codes, resume, atomicity, INPUT protection."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from io_helpers import convert_command, ct_small_series, dicom_test_file, oblique_affine

from medfusion.io.convert import convert_tree
from medfusion.io.dicom import read_series, write_dicom_series
from medfusion.io.run_report import read_report


def _snapshot(root):
    """mtimes of every file but the run report (a rerun brings the report up to date)."""
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.name != "convert_report.csv"}


@pytest.fixture
def tree(tmp_path):
    """Two good series, one with a missing slice, a SEG object and a text file."""
    root = tmp_path / "in"
    ct_small_series(root / "patient1" / "ct", n=4)
    write_dicom_series(
        np.arange(8 * 6 * 3, dtype=np.float32).reshape(8, 6, 3) - 1000,
        root / "patient2" / "sim",
        affine=oblique_affine(),
        series_description="sim B70f",
        derivation_description="phantom",
        meta={"PatientID": "P2", "ConvolutionKernel": "B70f", "KVP": 120, "SeriesNumber": 3},
    )
    broken = ct_small_series(root / "patient3" / "gap", n=4)
    broken[1].unlink()
    shutil.copy(dicom_test_file("liver_1frame.dcm"), root / "seg.dcm")
    (root / "notes.txt").write_text("not dicom")
    return root


def test_convert_end_to_end_summary_resume(tree, tmp_path, capsys):
    out = tmp_path / "out"
    before = _snapshot(tree)
    assert convert_command(str(tree), str(out), "--no-progress") == 1  # some failed
    text = capsys.readouterr().out
    assert "converted 2, skipped 2, failed 1" in text and "missing slice" in text
    niftis = sorted(out.rglob("*.nii.gz"))
    assert len(niftis) == 2 and _snapshot(tree) == before  # INPUT untouched
    # one line per series (2 converted, 1 failed), one per group of skipped files (2 reasons), the counts
    lines = text.splitlines()
    assert len(lines) == 6 and lines[-1].startswith("converted 2, skipped 2, failed 1")
    for nifti in niftis:
        (line,) = [x for x in lines if str(nifti.relative_to(out)) in x]
        assert line.split()[0] == "converted"
    (failed,) = [x for x in lines if x.startswith("failed")]
    assert "patient3/gap" in failed and "missing slice" in failed and "3 files" in failed
    statuses = sorted(x.split()[0] for x in lines[:-1])
    assert statuses == ["converted", "converted", "failed", "skipped", "skipped"]
    sim = next(p for p in niftis if "P2" in str(p))
    assert sim.name == "003_sim_B70f.nii.gz"
    sidecar = json.loads(sim.with_name("003_sim_B70f.json").read_text())
    assert sidecar["ConvolutionKernel"] == "B70f" and sidecar["KVP"] == 120.0 and sidecar["PatientID"] == "P2"
    assert len(sidecar["source_files"]) == 3 and sidecar["Exposure"] is None
    img = nib.load(sim)
    reference = read_series(tree / "patient2" / "sim")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), reference.array)
    np.testing.assert_allclose(img.affine, reference.affine, atol=1e-5)

    # rerun: complete outputs are skipped, files untouched
    stamps = _snapshot(out)
    assert convert_command(str(tree), str(out), "--no-progress") == 1
    text = capsys.readouterr().out
    assert "already converted" in text and _snapshot(out) == stamps
    assert len([x for x in text.splitlines() if "already converted" in x]) == 2  # one line per series
    # an output without its sidecar (interrupted between the two writes) is redone
    sim.with_name("003_sim_B70f.json").unlink()
    report = convert_tree(tree, out, progress=False)
    assert [o.output for o in report.converted] == [sim]


def test_exit_codes_all_ok_and_all_failed(tmp_path):
    """medfusion.exit_codes: 0 every series converted; 2 nothing converted (every series failed, or no DICOM)."""
    good = tmp_path / "good"
    ct_small_series(good / "a", n=3)
    assert convert_command(str(good), str(tmp_path / "o1"), "--no-progress") == 0
    bad = tmp_path / "bad"
    ct_small_series(bad / "a", n=4)[1].unlink()
    assert convert_command(str(bad), str(tmp_path / "o2"), "--no-progress") == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("x")
    assert convert_command(str(empty), str(tmp_path / "o3"), "--no-progress") == 2


def test_refuses_output_inside_input(tree, capsys):
    before = _snapshot(tree)
    assert convert_command(str(tree), str(tree / "nifti"), "--no-progress") == 2
    assert "inside INPUT" in capsys.readouterr().err
    with pytest.raises(ValueError, match="inside INPUT"):
        convert_tree(tree, tree, progress=False)
    assert _snapshot(tree) == before


def test_interrupted_run_leaves_no_partial_file(tree, tmp_path, monkeypatch):
    calls = []

    def killed_save(filename, data, *args, **kwargs):
        calls.append(filename)
        with open(filename, "wb") as handle:
            handle.write(b"half a nifti")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the first write

    import medfusion.io.nifti as nifti

    monkeypatch.setattr(nifti, "write_gzip", killed_save)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_tree(tree, out, progress=False)
    # nothing but the run report (of the files done before the interrupt); no temporary, no claim left
    assert calls and [p.name for p in out.rglob("*") if p.is_file()] == ["convert_report.csv"]
    assert "converted" not in {r.status for r in read_report(out / "convert_report.csv")}
    monkeypatch.undo()
    assert convert_tree(tree, out, progress=False).exit_code == 1  # the rerun converts everything it can


def test_parallel_workers_match_serial(tree, tmp_path):
    serial = convert_tree(tree, tmp_path / "s", progress=False)
    parallel = convert_tree(tree, tmp_path / "p", workers=2, progress=True)
    assert len(parallel.converted) == len(serial.converted) == 2 and len(parallel.failed) == 1
    for a in sorted((tmp_path / "s").rglob("*.nii.gz")):
        b = tmp_path / "p" / a.relative_to(tmp_path / "s")
        np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())


def test_derived_series_only_with_flag(tmp_path):
    root = tmp_path / "in"
    volume = read_series(ct_small_series(root / "src", n=3))
    write_dicom_series(
        volume.array,
        root / "std",
        reference=root / "src",
        series_description="std",
        derivation_description="t",
    )
    report = convert_tree(root, tmp_path / "o1", progress=False)
    assert len(report.converted) == 1 and any("derived" in o.reason for o in report.skipped)
    report = convert_tree(root, tmp_path / "o2", progress=False, include_derived=True)
    assert len(report.converted) == 2
