"""Manifests: JSON/CSV equivalence, path resolution, every validation error, building from sidecars, the CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from medfusion.data.manifest import (
    TASK_KEYS,
    ManifestError,
    build_manifest_from_converted,
    load_manifest,
    write_manifest,
)


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for p in ("p0", "p1", "p2"):
        _touch(root, f"{p}/b60f.nii.gz", f"{p}/b30f.nii.gz")
    return root


def _entry(p: str, **extra) -> dict:
    return {
        "source": f"{p}/b60f.nii.gz",
        "target": f"{p}/b30f.nii.gz",
        "protocol": "B60f",
        "case_id": p,
        **extra,
    }


def _json(root: Path, doc: dict, name: str = "manifest.json") -> Path:
    path = root / name
    path.write_text(json.dumps(doc))
    return path


def _good(root: Path) -> Path:
    return _json(
        root,
        {"task": "standardize", "training": [_entry("p0"), _entry("p1")], "validation": [_entry("p2")]},
    )


def test_json_paths_resolve_relative_to_manifest_folder(data_root: Path, monkeypatch) -> None:
    path = _good(data_root)
    monkeypatch.chdir(data_root.parent)  # resolution must not depend on the working directory
    m = load_manifest(path)
    assert m.task == "standardize" and m.root == data_root
    first = m.split("train")[0]
    assert first["source"] == str(data_root / "p0" / "b60f.nii.gz")
    assert first["protocol"] == "B60f" and first["case_id"] == "p0"  # strings pass through untouched
    assert [e["case_id"] for e in m.split("val")] == ["p2"]
    assert m.split("test") == []
    assert m.path_keys == ("source", "target")
    with pytest.raises(ValueError, match="valid"):
        m.split("holdout")


def test_csv_and_json_load_identically(data_root: Path) -> None:
    rows = ["split,source,target,protocol,case_id"]
    rows += [f"training,{p}/b60f.nii.gz,{p}/b30f.nii.gz,B60f,{p}" for p in ("p0", "p1")]
    rows += ["val,p2/b60f.nii.gz,p2/b30f.nii.gz,B60f,p2"]
    csv_path = data_root / "manifest.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    from_csv = load_manifest(csv_path, task="standardize")
    from_json = load_manifest(_good(data_root))
    assert from_csv.splits == from_json.splits


def test_write_then_load_round_trip_json_and_csv(data_root: Path) -> None:
    m = load_manifest(_good(data_root))
    for name in ("out.json", "out.csv"):
        out = write_manifest(data_root / name, m.splits, task="standardize", name="demo")
        text = out.read_text()
        assert str(data_root) not in text  # relative paths only
        assert load_manifest(out, task="standardize").splits == m.splits
    with pytest.raises(FileExistsError):
        write_manifest(data_root / "out.json", m.splits, task="standardize")
    # refuses to write paths outside the manifest's folder unless asked to
    with pytest.raises(ManifestError, match="outside"):
        write_manifest(data_root / "p0" / "sub.json", m.splits, task="standardize")
    out = write_manifest(data_root / "manifests" / "m.json", m.splits, task="standardize", allow_outside=True)
    assert '"../p0/b60f.nii.gz"' in out.read_text()
    with pytest.raises(ManifestError, match="escapes"):
        load_manifest(out)
    assert load_manifest(out, allow_outside=True).splits == m.splits


def test_missing_file_names_manifest_and_entry(data_root: Path) -> None:
    (data_root / "p1" / "b30f.nii.gz").unlink()
    path = _good(data_root)
    with pytest.raises(ManifestError, match=r"manifest\.json.*training\[1\].*'target'.*not found"):
        load_manifest(path)
    assert load_manifest(path, check_files=False).split("training")[1]["target"].endswith("p1/b30f.nii.gz")


@pytest.mark.parametrize("bad", ["../outside.nii.gz", "p0/../../outside.nii.gz", "/abs/outside.nii.gz"])
def test_paths_escaping_the_folder_are_refused(data_root: Path, bad: str) -> None:
    _touch(data_root.parent, "outside.nii.gz")
    doc = {"training": [_entry("p0", source=bad)]}
    path = _json(data_root, doc)
    with pytest.raises(ManifestError, match=r"manifest\.json.*training\[0\].*'source'"):
        load_manifest(path, task="standardize", check_files=False)
    if not bad.startswith("/"):
        m = load_manifest(path, task="standardize", allow_outside=True)
        assert m.split("training")[0]["source"] == str(data_root.parent / "outside.nii.gz")


def test_empty_split_and_no_split(data_root: Path) -> None:
    with pytest.raises(ManifestError, match="'validation' is empty"):
        load_manifest(_json(data_root, {"training": [_entry("p0")], "validation": []}), task="standardize")
    with pytest.raises(ManifestError, match="no splits"):
        load_manifest(_json(data_root, {"task": "standardize"}))


def test_unknown_task_lists_valid_ones(data_root: Path) -> None:
    with pytest.raises(ManifestError, match="valid tasks: standardize, restore, segment, register, image"):
        load_manifest(_good(data_root), task="denoise")
    with pytest.raises(ManifestError, match="unknown task 'denoise'"):
        load_manifest(_json(data_root, {"task": "denoise", "training": [_entry("p0")]}))
    with pytest.raises(ManifestError, match="declares task 'standardize'"):
        load_manifest(_good(data_root), task="restore")
    assert set(TASK_KEYS) == {"standardize", "restore", "segment", "register", "image"}


def test_missing_keys_for_task(data_root: Path) -> None:
    path = _json(data_root, {"training": [_entry("p0")]})
    with pytest.raises(ManifestError, match=r"training\[0\].*missing key\(s\) \['image', 'label'\].*segment"):
        load_manifest(path, task="segment")
    partial = {"training": [_entry("p0"), {"source": "p1/b60f.nii.gz"}]}
    with pytest.raises(ManifestError, match=r"training\[1\].*missing key\(s\) \['target'\]"):
        load_manifest(_json(data_root, partial), task="standardize")


def test_unknown_split_and_bad_format(data_root: Path) -> None:
    csv_path = data_root / "m.csv"
    csv_path.write_text("split,source,target\nholdout,p0/b60f.nii.gz,p0/b30f.nii.gz\n")
    with pytest.raises(ManifestError, match="unknown split 'holdout'"):
        load_manifest(csv_path)
    csv_path.write_text("source,target\np0/b60f.nii.gz,p0/b30f.nii.gz\n")
    with pytest.raises(ManifestError, match="'split' column"):
        load_manifest(csv_path)
    (data_root / "m.yaml").write_text("training: []")
    with pytest.raises(ManifestError, match="valid: .json, .csv"):
        load_manifest(data_root / "m.yaml")


def test_duplicate_case_or_file_across_splits(data_root: Path) -> None:
    same_case = {"training": [_entry("p0")], "test": [_entry("p1", case_id="p0")]}
    with pytest.raises(ManifestError, match=r"test\[0\]: case_id 'p0' also appears in training\[0\]"):
        load_manifest(_json(data_root, same_case), task="standardize")
    same_file = {"training": [_entry("p0", case_id="a")], "validation": [_entry("p0", case_id="b")]}
    with pytest.raises(ManifestError, match="file .*p0/b60f.nii.gz.* also appears"):
        load_manifest(_json(data_root, same_file), task="standardize")
    # the same case twice inside one split is fine (several protocols of one patient)
    ok = {"training": [_entry("p0"), _entry("p0", source="p1/b60f.nii.gz")]}
    assert len(load_manifest(_json(data_root, ok), task="standardize").split("training")) == 2
    # registration: one atlas shared as the fixed image of every split is allowed
    reg = {
        "training": [{"moving": "p0/b60f.nii.gz", "fixed": "p2/b30f.nii.gz"}],
        "test": [{"moving": "p1/b60f.nii.gz", "fixed": "p2/b30f.nii.gz"}],
    }
    assert (
        load_manifest(_json(data_root, reg), task="register")
        .split("test")[0]["fixed"]
        .endswith("p2/b30f.nii.gz")
    )


def _fake_converted(root: Path, n_patients: int = 6) -> Path:
    """Folders as `medfusion convert` writes them: X.nii.gz + X.json sidecar per series."""
    for p in range(n_patients):
        for number, kernel in ((2, "B30f"), (3, "B60f"), (4, "B70f")):
            if p == 0 and kernel == "B30f":
                continue  # a study without the standard kernel: skipped
            stem = root / f"P{p:02d}" / f"{number:03d}_{kernel}"
            _touch(root, stem.relative_to(root).as_posix() + ".nii.gz")
            meta = {
                "PatientID": f"P{p:02d}",
                "StudyInstanceUID": f"1.2.{p}",
                "SeriesInstanceUID": f"1.2.{p}.{number}",
                "SeriesNumber": number,
                "ConvolutionKernel": kernel,
                "Manufacturer": "SIEMENS",
                "KVP": 120,
                "Modality": "CT",
            }
            stem.with_suffix(".json").write_text(json.dumps(meta))
    (root / "notes.json").write_text("{}")  # a JSON without a NIfTI is ignored
    return root


def test_build_manifest_from_converted_pairs_by_kernel_and_splits_by_patient(tmp_path: Path) -> None:
    root = _fake_converted(tmp_path / "conv")
    m = build_manifest_from_converted(
        root, task="standardize", standard="B30f", split=(0.5, 0.25, 0.25), seed=0
    )
    entries = [e for items in m.splits.values() for e in items]
    assert len(entries) == 5 * 2  # P00 has no standard series
    for e in entries:
        assert (
            e["target"].endswith("002_B30f.nii.gz") and Path(e["source"]).parent == Path(e["target"]).parent
        )
        assert (
            e["protocol"] in ("B60f | 120kV", "B70f | 120kV")
            and e["case_id"] == Path(e["source"]).parent.name
        )
    patients = {s: {e["case_id"] for e in items} for s, items in m.splits.items()}
    assert set(patients) == {"training", "validation", "test"}
    assert sum(len(v) for v in patients.values()) == 5  # each patient in exactly one split
    # deterministic for a seed; the most common kernel is the default standard
    again = build_manifest_from_converted(
        root, task="standardize", standard="B30f", split=(0.5, 0.25, 0.25), seed=0
    )
    assert again.splits == m.splits
    default = build_manifest_from_converted(root, task="standardize")
    assert all(not e["target"].endswith("B30f.nii.gz") for items in default.splits.values() for e in items)
    images = build_manifest_from_converted(root, task="image")
    assert sum(len(v) for v in images.splits.values()) == 17
    with pytest.raises(ManifestError, match="B45f.*values present"):
        build_manifest_from_converted(root, task="standardize", standard="B45f")
    with pytest.raises(ManifestError, match="supported here"):
        build_manifest_from_converted(root, task="segment")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no NIfTI"):
        build_manifest_from_converted(tmp_path / "empty", task="image")


def test_manifest_cli_writes_a_loadable_manifest(tmp_path: Path, capsys, monkeypatch) -> None:
    from medfusion.cli import main

    root = _fake_converted(tmp_path / "conv")
    monkeypatch.chdir(tmp_path)  # a relative DIR, as users type it
    assert main(["manifest", "conv", "--task", "standardize", "--standard", "B30f"]) == 0
    m = load_manifest(root / "manifest.json")
    assert m.task == "standardize" and sum(len(v) for v in m.splits.values()) == 10
    assert main(["manifest", str(root), "--task", "standardize"]) == 2  # EXIT_NOTHING_DONE: nothing written
    assert "already exists" in capsys.readouterr().err
    out = root / "kernels.csv"
    assert (
        main(["manifest", str(root), "--task", "image", "--output", str(out), "--split", "1", "0", "0"]) == 0
    )
    assert list(load_manifest(out, task="image").splits) == ["training"]


def test_manifest_module_is_import_cheap() -> None:
    import subprocess

    code = "import sys, medfusion.data.manifest; assert not {'torch','monai','lightning'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("name", ["example_standardize.json", "example_segment.csv", "example_register.json"])
def test_shipped_example_manifests_are_valid(name: str) -> None:
    path = Path(__file__).resolve().parents[2] / "data_manifests" / name
    m = load_manifest(path, check_files=False)  # the example data itself is not shipped
    task = m.task or "segment"
    m = load_manifest(path, task=task, check_files=False)
    assert all(str(path.parent) in e[TASK_KEYS[task][0]] for items in m.splits.values() for e in items)


def test_data_root_lets_manifests_live_in_a_subfolder(tmp_path):
    """A manifest in DIR/manifests/ declaring ``"data_root": ".."`` has paths relative to itself (``../case_0/a``,
    as MONAI reads them) that may reach up to DIR and no further; the old ``"root": ".."`` format still loads."""
    data = tmp_path / "ds"
    for c in ("case_0", "case_1"):
        _touch(data, f"{c}/a.nii.gz", f"{c}/b.nii.gz")
    splits = {
        split: [{"source": str(data / c / "a.nii.gz"), "target": str(data / c / "b.nii.gz"), "case_id": c}]
        for split, c in (("training", "case_0"), ("test", "case_1"))
    }
    path = write_manifest(data / "manifests" / "m.json", splits, task="standardize", data_root="..")
    doc = json.loads(path.read_text())
    assert (
        doc["data_root"] == ".."
        and "root" not in doc
        and doc["training"][0]["source"] == "../case_0/a.nii.gz"
    )
    m = load_manifest(path)
    assert m.root == data and m.split("training")[0]["source"] == str(data / "case_0/a.nii.gz")
    doc["training"][0]["source"] = "../../outside.nii.gz"
    (tmp_path / "outside.nii.gz").write_bytes(b"x")
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="escapes"):
        load_manifest(path)
    doc["data_root"] = "/abs"
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="relative folder"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="outside the manifest's data folder"):
        write_manifest(data / "manifests" / "n.json", splits, task="standardize")  # no data_root
    # the old format: paths relative to the declared root
    old = {
        "task": "standardize",
        "root": "..",
        "training": [{"source": "case_0/a.nii.gz", "target": "case_0/b.nii.gz"}],
    }
    legacy = _json(data / "manifests", old, "old.json")
    assert load_manifest(legacy).split("training")[0]["target"] == str(data / "case_0/b.nii.gz")


def _monai_paths(path: Path) -> list[dict]:
    from monai.data import load_decathlon_datalist

    doc = json.loads(path.read_text())
    splits = [s for s in ("training", "validation", "test") if s in doc]
    return [e for s in splits for e in load_decathlon_datalist(str(path), data_list_key=s)]


def _check_with_monai(path: Path, check_files: bool = True) -> int:
    """MONAI's own loader resolves every path of ``path`` to what medfusion's does (and the files exist)."""
    m = load_manifest(path, check_files=check_files)
    ours = [e for s in ("training", "validation", "test") for e in m.split(s)]
    theirs = _monai_paths(path)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        for key in m.path_keys:
            if check_files:
                assert os.path.normpath(b[key]) == a[key] and Path(b[key]).exists(), b[key]
            else:  # MONAI joins a non-image key to the datalist's folder only when that file exists
                assert os.path.normpath(os.path.join(path.parent.absolute(), b[key])) == a[key]
    return len(theirs)


def test_every_manifest_we_write_loads_with_monai(tmp_path):
    pytest.importorskip("monai")
    from medfusion.cli import main
    from medfusion.data.builtin import make_dataset

    built = make_dataset(tmp_path / "builtin", n_patients=3, size=16, seed=0, progress=False)
    assert sum(_check_with_monai(p) for p in built.values()) > 0
    root = _fake_converted(tmp_path / "conv")
    assert main(["manifest", str(root), "--task", "standardize", "--standard", "B30f"]) == 0
    assert _check_with_monai(root / "manifest.json") == 10
    sub = root / "manifests" / "std.json"
    write_manifest(sub, load_manifest(root / "manifest.json").splits, task="standardize", data_root="..")
    assert _check_with_monai(sub) == 10
    shipped = Path(__file__).resolve().parents[2] / "data_manifests"
    for path in sorted(shipped.glob("*.json")):  # their data is not shipped: same paths, no file check
        assert _check_with_monai(path, check_files=False) > 0


def _acquisition_export(root: Path) -> Path:
    """10 patients x 7 protocols: 3 kernels at full dose, the standard kernel at 2 lower doses and 2 thicknesses,
    and one sharp protocol that shares its kernel name with another (different description)."""
    protocols = [
        (2, "B30f", 1.0, 200, "Abdomen 1.0 B30f"),  # the standard
        (3, "B30f", 1.0, 50, "Abdomen 1.0 B30f 25%"),
        (4, "B30f", 1.0, 100, "Abdomen 1.0 B30f 50%"),
        (5, "B30f", 3.0, 200, "Abdomen 3.0 B30f"),
        (6, "B30f", 5.0, 200, "Abdomen 5.0 B30f"),
        (7, "B60f", 1.0, 200, "Abdomen 1.0 B60f"),
        (8, "B60f", 1.0, 200, "Lung 1.0 B60f"),
    ]
    for p in range(10):
        for number, kernel, thickness, mas, description in protocols:
            stem = root / f"P{p:02d}" / f"{number:03d}_{kernel}"
            _touch(root, stem.relative_to(root).as_posix() + ".nii.gz")
            meta = {
                "PatientID": f"P{p:02d}",
                "StudyInstanceUID": f"1.2.{p}",
                "SeriesNumber": number,
                "ConvolutionKernel": kernel,
                "SliceThickness": thickness,
                "KVP": 120,
                "Exposure": mas,
                "SeriesDescription": description,
            }
            stem.with_suffix(".json").write_text(json.dumps(meta))
        if p == 9:  # a repeat of the standard in one study
            _touch(root, "P09/009_B30f.nii.gz")
            (root / "P09/009_B30f.json").write_text(
                json.dumps(
                    {
                        **meta,
                        **dict(
                            zip(
                                (
                                    "SeriesNumber",
                                    "ConvolutionKernel",
                                    "SliceThickness",
                                    "Exposure",
                                    "SeriesDescription",
                                ),
                                (9, "B30f", 1.0, 200, "Abdomen 1.0 B30f"),
                            )
                        ),
                    }
                )
            )
    return root


def test_protocols_told_apart_by_acquisition_and_nothing_dropped(tmp_path, capsys):
    from medfusion.cli import main

    root = _acquisition_export(tmp_path / "conv")
    m = build_manifest_from_converted(root, task="standardize", standard="200mAs | Abdomen 1.0 B30f")
    entries = [e for items in m.splits.values() for e in items]
    assert len(entries) == 10 * 6  # every non-standard series of every patient is a pair
    assert len({e["protocol"] for e in entries}) == 6  # dose, thickness and same-kernel variants stay apart
    assert m.extra["standard"] == "B30f | 1mm | 120kV | 200mAs | Abdomen 1.0 B30f"
    assert [t["target"].endswith("002_B30f.nii.gz") for t in m.extra["targets"]] == [True] * 10
    (excluded,) = m.extra["excluded"]  # the repeat: listed with its reason, not silently dropped
    assert excluded["series"].endswith("P09/009_B30f.nii.gz") and "002_B30f" in excluded["reason"]
    every = {str(p) for p in root.rglob("*.nii.gz")}
    used = {e[k] for e in entries for k in ("source", "target")} | {x["series"] for x in m.extra["excluded"]}
    assert used == every
    with pytest.raises(ManifestError, match="matches several protocols"):
        build_manifest_from_converted(root, task="standardize", standard="B30f")
    by_kernel = build_manifest_from_converted(root, task="standardize", group_by="ConvolutionKernel")
    assert len(by_kernel.extra["excluded"]) == 10 * 4 + 1  # kernel-only grouping: the variants are listed
    assert main(["manifest", str(root), "--task", "standardize"]) == 0
    text = capsys.readouterr().out
    assert text.count("target    P") == 10 and "excluded  P09/009_B30f.nii.gz" in text
    doc = json.loads((root / "manifest.json").read_text())
    assert doc["targets"][0]["target"] == "P00/002_B30f.nii.gz" and len(doc["excluded"]) == 1
    assert load_manifest(root / "manifest.json").extra["standard"] == doc["standard"]
