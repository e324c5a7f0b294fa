"""``medfusion make-data``: files, affines, manifests, split by patient, resume and conflicts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medfusion.apps.make_data import add_arguments, run
from medfusion.data.builtin import REPEAT, make_dataset, split_cases
from medfusion.data.ctsim import PROTOCOLS, STANDARD
from medfusion.data.manifest import load_manifest
from medfusion.data.phantoms import LABELS
from medfusion.exit_codes import EXIT_NOTHING_DONE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin") / "data"
    manifests = make_dataset(out, n_patients=5, size=32, seed=1, progress=False)
    return out, manifests


def test_files_and_geometry(tiny):
    out, _ = tiny
    cases = sorted(p.name for p in out.glob("case_*"))
    assert cases == [f"case_{i:03d}" for i in range(5)]
    for name in ["phantom", "label", *PROTOCOLS, REPEAT]:
        img = nib.load(out / "case_000" / f"{name}.nii.gz")
        assert img.shape == (32, 32)  # 2D data as 2D NIfTI
        np.testing.assert_allclose(nib.affines.voxel_sizes(img.affine)[:2], 400.0 / 32)
    lab = np.asarray(nib.load(out / "case_000" / "label.nii.gz").dataobj)
    assert lab.dtype == np.uint8 and set(np.unique(lab).tolist()) <= set(LABELS)
    std = nib.load(out / "case_000" / "standard.nii.gz").get_fdata()
    rep = nib.load(out / "case_000" / f"{REPEAT}.nii.gz").get_fdata()
    ph = nib.load(out / "case_000" / "phantom.nii.gz").get_fdata()
    assert not np.array_equal(std, rep)  # another noise draw of the same anatomy
    assert np.corrcoef(std.ravel(), rep.ravel())[0, 1] > 0.95
    assert np.corrcoef(std.ravel(), ph.ravel())[0, 1] > 0.95
    config = json.loads((out / "dataset.json").read_text())
    assert config["n_patients"] == 5 and set(config["protocols"]) == set(PROTOCOLS)


def test_manifests_are_valid_and_split_by_patient(tiny):
    out, manifests = tiny
    assert set(manifests) == {"standardize", "restore", "segment", "register", "image"}
    seen: dict[str, str] = {}
    for task, path in manifests.items():
        assert path == out / "manifests" / f"{task}.json"
        doc = json.loads(path.read_text())
        assert doc["task"] == task and doc["name"] and doc["description"]
        m = load_manifest(path, task=task)  # files exist, keys, no leakage
        for split, entries in m.splits.items():
            for e in entries:
                case = e["case_id"].split("_to_")[0]
                assert seen.setdefault(case, split) == split, f"{case} in two splits"
        for entry in doc["training"]:  # relative to the manifest's folder
            assert all(not str(v).startswith("/") for v in entry.values())
    std = load_manifest(manifests["standardize"])
    protocols = {e["protocol"] for e in std.split("training")}
    assert protocols == set(PROTOCOLS) - {STANDARD}
    assert all(e["target"].endswith(f"{STANDARD}.nii.gz") for e in std.split("training"))
    restore = load_manifest(manifests["restore"])
    assert all(e["source"].endswith("low_dose.nii.gz") for e in restore.split("training"))
    reg = load_manifest(manifests["register"])
    for e in reg.split("training"):
        assert e["moving"] != e["fixed"]


def test_rerun_is_idempotent_and_resumes(tiny, tmp_path):
    out, _ = tiny
    target = out / "case_002" / "sharp.nii.gz"
    before = nib.load(target).get_fdata()
    stamp = (out / "case_001" / "standard.nii.gz").stat().st_mtime_ns
    target.unlink()  # an interrupted run: one file missing
    make_dataset(out, n_patients=5, size=32, seed=1, progress=False)
    np.testing.assert_array_equal(nib.load(target).get_fdata(), before)  # deterministic regeneration
    assert (out / "case_001" / "standard.nii.gz").stat().st_mtime_ns == stamp  # complete cases untouched
    assert not list(out.rglob("*.part*"))
    with pytest.raises(ValueError, match="other parameters"):
        make_dataset(out, n_patients=5, size=48, seed=1, progress=False)


def test_split_cases():
    ids = [f"c{i}" for i in range(24)]
    s = split_cases(ids, (0.7, 0.15, 0.15), 0)
    assert [len(s[k]) for k in ("training", "validation", "test")] == [17, 4, 3]
    assert sorted(sum(s.values(), [])) == sorted(ids)
    assert split_cases(ids, (0.7, 0.15, 0.15), 0) == s
    small = split_cases(ids[:4], (0.7, 0.15, 0.15), 0)
    assert all(len(v) >= 1 for v in small.values())
    with pytest.raises(ValueError):
        split_cases(ids, (1.0, 0.0), 0)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="valid"):
        make_dataset(tmp_path, n_patients=2, size=32, protocols=["standard", "ultra"], progress=False)
    with pytest.raises(ValueError, match="standard"):
        make_dataset(tmp_path, n_patients=2, size=32, protocols=["sharp"], progress=False)
    with pytest.raises(ValueError, match="dim"):
        make_dataset(tmp_path, dim=4, progress=False)


def test_cli_3d_with_dicom(tmp_path):
    import argparse

    pydicom = pytest.importorskip("pydicom")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "d3"
    args = parser.parse_args(
        [
            "--output",
            str(out),
            "--patients",
            "3",
            "--dim",
            "3",
            "--size",
            "16",
            "--depth",
            "6",
            "--protocols",
            "standard,sharp",
            "--dicom",
            "--no-progress",
        ]
    )
    assert run(args) == 0
    vol = nib.load(out / "case_000" / "sharp.nii.gz")
    assert vol.shape == (16, 16, 6)
    files = sorted((out / "dicom" / "case_000" / "sharp").glob("*.dcm"))
    assert len(files) == 6
    ds = pydicom.dcmread(files[0])
    assert ds.ConvolutionKernel == PROTOCOLS["sharp"].kernel
    assert float(ds.KVP) == 120 and float(ds.SliceThickness) == 1.0 and ds.Manufacturer
    assert int(ds.Exposure) == 200 and ds.PatientID == "case_000"
    assert [float(v) for v in ds.PixelSpacing] == [25.0, 25.0]
    # the DICOM series holds the same HU as the NIfTI, in the usual display orientation
    from medfusion.io.dicom import read_series

    dcm = read_series(out / "dicom" / "case_000" / "sharp")
    np.testing.assert_allclose(
        nib.affines.apply_affine(dcm.affine, [3, 5, 2]),
        nib.affines.apply_affine(vol.affine, [5, 3, 2]),
        atol=1e-3,
    )
    np.testing.assert_allclose(dcm.array[3, 5, 2], vol.get_fdata()[5, 3, 2], atol=1.0)
    parser.parse_args(["--output", str(out)])
    # other parameters in the same folder: nothing written, exit status 2 (medfusion.exit_codes)
    assert (
        run(parser.parse_args(["--output", str(out), "--size", "20", "--no-progress"])) == EXIT_NOTHING_DONE
    )
    assert (
        run(parser.parse_args(["--output", str(tmp_path / "x"), "--protocols", "nope", "--no-progress"])) == 2
    )
    assert not (tmp_path / "x" / "case_000").exists()
