"""``convert_report.csv``: every input file once with its status; resumed runs, concurrent runs, faults."""

from __future__ import annotations

import errno
import multiprocessing
import shutil
import tempfile

import nibabel as nib
import numpy as np
import pytest
from io_helpers import convert_command, ct_small_series, dicom_test_file

from medfusion.io.claim import claim
from medfusion.io.convert import convert_tree, output_names
from medfusion.io.dicom import discover_series
from medfusion.io.run_report import read_report


@pytest.fixture
def tree(tmp_path):
    """Three CT series (one with a missing slice), a localizer, a copy of one file, a SEG and a text file."""
    root = tmp_path / "in"
    ct_small_series(root / "a", n=3)
    ct_small_series(root / "b", n=4)
    broken = ct_small_series(root / "gap", n=4)
    broken[1].unlink()
    shutil.copy(root / "a" / "img_000", root / "a_copy.dcm")  # same SOPInstanceUID: another copy
    shutil.copy(dicom_test_file("liver_1frame.dcm"), root / "seg.dcm")
    (root / "notes.txt").write_text("not dicom")
    import pydicom

    loc = pydicom.dcmread(dicom_test_file("CT_small.dcm"))
    loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.SeriesInstanceUID = pydicom.uid.generate_uid()
    loc.save_as(root / "scout.dcm")
    return root


def _inputs(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _leftovers(out):
    return [p for p in out.rglob(".*") if p.suffix in (".part", ".claim") or ".part" in p.name]


def test_every_input_once_with_status_and_resume(tree, tmp_path):
    out = tmp_path / "out"
    convert_tree(tree, out, progress=False)
    rows = {r.input: r for r in read_report(out / "convert_report.csv")}
    assert set(rows) == _inputs(tree)  # every file exactly once (keys are unique)
    status = {k: r.status for k, r in rows.items()}
    assert [status[f"a/img_00{i}"] for i in range(3)] == ["converted"] * 3
    assert {status[k] for k in rows if k.startswith("gap/")} == {"failed"}
    gap = min(k for k in rows if k.startswith("gap/"))
    assert "missing slice" in rows[gap].reason and rows[gap].output == ""
    assert (
        status["notes.txt"] == status["seg.dcm"] == status["scout.dcm"] == status["a_copy.dcm"] == "skipped"
    )
    assert "--include-localizers" in rows["scout.dcm"].reason
    assert "same SOPInstanceUID" in rows["a_copy.dcm"].reason and "a/img_000" in rows["a_copy.dcm"].reason
    a = rows["a/img_000"]
    assert (out / a.output).is_file() and a.series_uid and a.seconds > 0 and a.time.endswith("Z")

    # a resumed run: converted series are "already done" with their earlier output; the report is updated
    (tree / "notes.txt").unlink()
    ct_small_series(tree / "c", n=3)
    convert_tree(tree, out, progress=False)
    again = {r.input: r for r in read_report(out / "convert_report.csv")}
    assert again["a/img_000"].status == "already done" and again["a/img_000"].output == a.output
    assert {again[f"c/img_00{i}"].status for i in range(3)} == {"converted"}
    assert again[gap].status == "failed"
    assert "notes.txt" in again  # a row of an earlier run is kept
    assert _leftovers(out) == []


def test_series_claimed_by_another_process_is_left_alone(tree, tmp_path):
    out = tmp_path / "out"
    found = discover_series(tree)
    names = dict(zip((s.files[0].parent.name for s in found.series), output_names(found.series)))
    target = out / f"{names['b']}.nii.gz"
    out.mkdir()
    with claim(target, out):  # another convert holds series b
        report = convert_tree(tree, out, progress=False)
    rows = {r.input: r for r in read_report(out / "convert_report.csv")}
    assert rows["b/img_000"].status == "skipped" and "another process" in rows["b/img_000"].reason
    assert not target.exists() and rows["a/img_000"].status == "converted"
    assert any("another process" in o.reason for o in report.skipped)
    convert_tree(tree, out, progress=False)  # the claim is gone: the rerun converts it
    assert target.is_file() and _leftovers(out) == []


def _run(tree, out, queue):
    report = convert_tree(tree, out, progress=False)
    queue.put([(o.status, o.series_uid, o.reason) for o in report.outcomes if o.series_uid])


def test_two_processes_on_one_output(tree, tmp_path):
    for k in range(6):
        ct_small_series(tree / f"more{k}", n=6)
    out = tmp_path / "out"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_run, args=(tree, out, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    converted = [uid for outcomes in results for status, uid, _ in outcomes if status == "converted"]
    assert len(converted) == len(set(converted)) == 8  # every good series converted once, by one of them
    rows = read_report(out / "convert_report.csv")
    assert {r.input for r in rows} == _inputs(tree)
    assert {r.status for r in rows if r.input.startswith("more")} <= {"converted", "already done"}
    for nifti in out.rglob("*.nii.gz"):
        assert nib.load(nifti).get_fdata().shape[2] in (3, 4, 6)
    assert _leftovers(out) == []


def test_full_disk_during_a_write_fails_that_series_only(tree, tmp_path, monkeypatch):
    def full(filename, data, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    import medfusion.io.nifti as nifti

    monkeypatch.setattr(nifti, "write_gzip", full)
    out = tmp_path / "out"
    report = convert_tree(tree, out, progress=False)
    assert not report.converted and all(
        "No space left" in o.reason for o in report.failed if "gap" not in str(o)
    )
    assert list(out.rglob("*.nii.gz")) == [] and _leftovers(out) == []
    assert {r.status for r in read_report(out / "convert_report.csv") if r.input.startswith("a/")} == {
        "failed"
    }


def test_read_only_output_is_one_clear_error(tree, tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert convert_command(tree, out, "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medfusion convert: OUTPUT {out} is not writable: Read-only file system"]
    assert list(out.iterdir()) == []


def test_single_legacy_multiframe_keeps_its_one_geometry(tmp_path):
    """An old-style multi-frame MR (one IPP / IOP for the object, no per-frame positions) is written with that
    origin and orientation; the note says the frames are in stored order."""
    import pydicom

    ds = pydicom.dcmread(dicom_test_file("CT_small.dcm"))
    frames = np.stack([ds.pixel_array + 10 * k for k in range(3)]).astype(np.int16)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.Modality = "MR"
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    root = tmp_path / "in"
    root.mkdir()
    ds.save_as(root / "mr.dcm")
    report = convert_tree(root, tmp_path / "out", progress=False)
    (outcome,) = report.converted
    img = nib.load(outcome.output)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(img.affine[:3, 3], ipp * [-1, -1, 1], atol=1e-4)
    np.testing.assert_allclose(img.affine[:3, 0] / np.linalg.norm(img.affine[:3, 0]), [0, -1, 0], atol=1e-6)
    assert img.shape == (128, 128, 3) and "stored order" in outcome.reason


def _tree_files(out):
    """Every file under ``out`` with its bytes, but the run report (it records times)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "convert_report.csv"
    }


def _written_niftis(out):
    """Finished NIfTI outputs under ``out`` (temporary ``.part`` files are hidden and not counted)."""
    return [p for p in out.rglob("*.nii.gz") if not p.name.startswith(".")] if out.exists() else []


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tree, tmp_path):
    """SIGKILL ``medfusion convert`` at seeded random moments, rerun it: the outputs are bit-identical to an
    uninterrupted run, no temporary or claim file is left, and the report lists every input once.

    Half the kills fall at a random time (start-up included); the other half right after the k-th output appears
    (k seeded), so that kills in the middle of the work happen however fast the machine is."""
    import subprocess
    import sys
    import time

    for k in range(8):
        ct_small_series(tree / f"more{k}", n=16)
    reference = tmp_path / "reference"
    convert_tree(tree, reference, progress=False)
    expected = _tree_files(reference)
    n_outputs = len([p for p in expected if p.endswith(".nii.gz")])
    command = [
        sys.executable,
        "-m",
        "medfusion.cli",
        "convert",
        str(tree),
        str(tmp_path / "timed"),
        "--no-progress",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    full = time.perf_counter() - start  # start-up and conversion: the timed kills fall anywhere in it
    rng = np.random.default_rng(0)
    interrupted = 0
    for trial in range(20):
        out = tmp_path / f"killed{trial}"
        command[-2] = str(out)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if trial % 2:
            time.sleep(float(rng.uniform(0.2, 1.0)) * full)
        else:
            after = int(rng.integers(1, n_outputs))
            while len(_written_niftis(out)) < after and process.poll() is None:
                time.sleep(0.001)
        process.kill()
        process.wait()
        interrupted += trial % 2 == 0 and 0 < len(_written_niftis(out)) < n_outputs
        subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _tree_files(out) == expected, trial
        assert _leftovers(out) == []
        assert {r.input for r in read_report(out / "convert_report.csv")} == _inputs(tree)
    assert interrupted >= 5  # of the 10 output-triggered kills, most land in the middle of the work
