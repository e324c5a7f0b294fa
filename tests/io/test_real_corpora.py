"""Every file of pydicom's test files and of pydicom-data through ``convert`` (packaged copies, no download).

No traceback, every input file exactly once in ``convert_report.csv``, and every CT / MR / PT volume written agrees
with SimpleITK's reading of the same files (GDCM): world coordinates of the voxel grid and the voxel values.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfusion.io.convert import convert_tree
from medfusion.io.run_report import read_report
from medfusion.io.volume import LPS_TO_RAS


def _corpus_folders() -> list[Path]:
    """The folders holding pydicom's test files and pydicom-data's files (offline)."""
    import pydicom.data

    folders = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        from pydicom.data.data_manager import get_external_sources

        for source in get_external_sources().values():
            root = Path(source.data_path)
            if root.is_dir():
                folders.append(root)
    except Exception:  # noqa: BLE001 - pydicom-data not installed: test files only
        pass
    return folders


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _sitk_read(files: list[str]):
    import SimpleITK as sitk

    if len(files) == 1:
        return sitk.ReadImage(files[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _compare_with_sitk(nifti: Path, sidecar: dict) -> str | None:
    """None if the NIfTI and SimpleITK's reading agree (grid corners in RAS mm, voxel values), else what differs."""
    import SimpleITK as sitk

    try:
        image = _sitk_read(sidecar["source_files"])
    except RuntimeError as exc:
        return f"SimpleITK cannot read it: {str(exc).splitlines()[0]}"
    ours = nib.load(nifti)
    data = np.asanyarray(ours.dataobj).astype(np.float64)
    theirs = sitk.GetArrayFromImage(image).astype(np.float64)  # (k, j, i)
    if theirs.ndim == data.ndim + 1 and theirs.shape[0] == 1:  # one slice: SimpleITK keeps a 3D grid
        theirs = theirs[0]
    theirs = theirs.T
    if theirs.shape != data.shape:
        return f"shape {data.shape} != SimpleITK {theirs.shape}"
    if not np.allclose(data, theirs, atol=1e-3 * max(1.0, np.abs(theirs).max())):
        return f"values differ (max {np.abs(data - theirs).max():g})"
    size = data.shape[:3]
    corners = [np.array(c) for c in np.ndindex(*(2,) * len(size))] or [np.zeros(0)]
    for corner in corners:
        index = [int(c * (n - 1)) for c, n in zip(corner, size)]
        if len(index) == 2 and image.GetDimension() == 3:
            index = [*index, 0]
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = (LPS_TO_RAS[:3, :3] @ lps) if lps.size == 3 else lps * [-1, -1]
        full = np.zeros(3)
        full[: len(index)] = index
        mapped = (ours.affine @ np.append(full, 1.0))[: ras.size]
        if not np.allclose(mapped, ras, atol=1e-2):
            return f"voxel {index}: {mapped} mm != SimpleITK {ras} mm"
    return None


def test_real_corpora_convert_report_and_agree_with_simpleitk(tmp_path):
    pytest.importorskip("SimpleITK")
    checked = 0
    for n, root in enumerate(_corpus_folders()):
        out = tmp_path / f"out{n}"
        report = convert_tree(root, out, progress=False)  # must not raise
        rows = read_report(out / "convert_report.csv")
        names = [r.input for r in rows]
        assert len(names) == len(set(names)) and set(names) == _files(root), root
        for row in rows:
            assert row.reason, row  # every status comes with its reason
            if row.status == "converted":
                assert all((out / o).is_file() for o in row.output.split("; ")), row
        assert len(report.outcomes) >= 1
        mismatches = []
        for nifti in sorted(out.rglob("*.nii.gz")):
            sidecar = json.loads(nifti.with_name(nifti.name[: -len(".nii.gz")] + ".json").read_text())
            if sidecar.get("Modality") not in ("CT", "MR", "PT"):
                continue
            problem = _compare_with_sitk(nifti, sidecar)
            checked += 1
            if problem:
                mismatches.append(f"{nifti.relative_to(out)}: {problem}")
        assert not mismatches, "\n".join(mismatches)
    assert checked >= 5
