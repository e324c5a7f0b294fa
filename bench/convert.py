"""Benchmark ``medfusion convert`` against dcm2niix on the same synthetic CT series, in the same run.

For each case a CT series is written with medfusion's DICOM writer (int16 HU, realistic header), then
converted by ``medfusion.io.convert.convert_tree`` and by the ``dcm2niix`` binary (pip package). Checks:
voxel-identical data after both are reoriented to the closest canonical (RAS) frame with nibabel, and
the same affine (max abs difference, mm). Prints the wall-clock times (median of ``--repeats``) and the
throughput ratio medfusion / dcm2niix (> 1: medfusion faster).

    .venv/bin/python bench/convert.py --slices 100 --size 512 --repeats 3
    PATH=.venv/bin:$PATH .venv/bin/python bench/convert.py --real-header --slices 200 --size 512 --repeats 5

``--real-header`` converts a series written with pydicom from a real scanner's header (CT_small.dcm; air outside
the body, stored values with RescaleIntercept -1024) with dcm2niix, the ``medfusion convert`` command line (a fresh
process: imports included) and ``convert_tree`` in this process, in rounds of rotating order; ``--before DIR``
adds the command line of an older copy of the package in the same rounds:

    git archive HEAD medfusion | tar -x -C /tmp/before
    PATH=.venv/bin:$PATH .venv/bin/python bench/convert.py --real-header --slices 200 --size 512 --repeats 5 \
        --before /tmp/before/medfusion
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medfusion.io.convert import convert_tree
from medfusion.io.dicom import read_series, write_dicom_series
from medfusion.io.nifti import write_nifti


def make_series(folder: Path, slices: int, size: int, oblique: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # a body-like ellipse of soft tissue with noise, air outside, a bright "bone" disc: int16-valued HU
    i, j = np.mgrid[:size, :size] / size - 0.5
    body = (i / 0.42) ** 2 + (j / 0.33) ** 2 < 1
    bone = (i / 0.08) ** 2 + ((j + 0.15) / 0.08) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + np.where(bone, 900.0, 0.0)
    volume = np.repeat(hu[:, :, None], slices, axis=2) + rng.normal(0, 20, (size, size, slices))
    volume = np.rint(volume).astype(np.float32)
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])  # RAS+ of an axial LPS acquisition
    affine[:3, 3] = (180.0, 200.0, -300.0)
    if oblique:
        a = 0.25
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        affine[:3, :3] = rot @ affine[:3, :3]
    meta = {
        "Manufacturer": "SIEMENS",
        "ManufacturerModelName": "SOMATOM Definition AS",
        "ConvolutionKernel": "B30f",
        "KVP": 120,
        "Exposure": 200,
        "PatientID": "BENCH",
        "SeriesNumber": 2,
        "StudyDate": "20260101",
    }
    write_dicom_series(
        volume,
        folder,
        affine=affine,
        series_description="bench",
        derivation_description="synthetic",
        meta=meta,
    )


def make_series_real_header(folder: Path, slices: int, size: int, seed: int = 0) -> None:
    """A CT series as a scanner writes it, not by medfusion: pydicom's CT_small.dcm header (GE scanner fields),
    Rows = Columns = ``size``, 0.7 mm pixels, 1 mm slices, stored values HU + 1024 with RescaleIntercept -1024,
    a body ellipse with noise and air (-1000 HU) outside it, one file per slice."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    i, j = np.mgrid[:size, :size] / size - 0.5
    body = (i / 0.42) ** 2 + (j / 0.33) ** 2 < 1
    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    for k in range(slices):
        hu = np.where(body, 40.0 + rng.normal(0, 20, (size, size)), -1000.0)
        ds = base.copy()
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.ImagePositionPatient = [-180.0, -200.0, -300.0 + k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.rint(hu + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{k:05d}")


def rotated(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Times of every run in ``runs`` (name -> callable), ``repeats`` rounds, the order rotating from round to round,
    so that every tool sees the same load on average (the machine is shared)."""
    names, times = list(runs), {name: [] for name in runs}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired(first, second, repeats: int) -> tuple[list[float], list[float]]:
    """Times of ``first`` and ``second`` run in pairs (the order alternating), so that both see the same load."""
    times = rotated({"a": first, "b": second}, repeats)
    return times["a"], times["b"]


def run_real_header(slices: int, size: int, repeats: int, work: Path, before: Path | None = None) -> dict:
    """``medfusion convert`` (``.nii.gz``; the command line in a fresh process, imports included, and
    ``convert_tree`` in this process) against ``dcm2niix -z y`` on :func:`make_series_real_header`, rounds of
    rotating order. ``before``: a copy of an older medfusion package (e.g. ``git archive HEAD medfusion``) whose
    command line runs in the same rounds."""
    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    src = work / "real" / "dicom"
    make_series_real_header(src, slices, size)
    out_m, out_c, out_d, out_b = (work / "real" / name for name in ("medfusion", "cli", "dcm2niix", "before"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def medfusion_gz() -> None:
        shutil.rmtree(out_m, ignore_errors=True)
        if convert_tree(src, out_m, progress=False).exit_code:
            raise RuntimeError("medfusion failed")

    def cli(out: Path, pythonpath: Path | None) -> None:
        shutil.rmtree(out, ignore_errors=True)
        extra = {"PYTHONPATH": str(pythonpath)} if pythonpath else {}
        cmd = [sys.executable, "-m", "medfusion.cli", "convert", "--no-progress", str(src), str(out)]
        # run from ``work``: ``python -m`` puts the working folder first on sys.path
        subprocess.run(cmd, check=True, capture_output=True, env={**env, **extra}, cwd=work)

    def dcm2niix_gz() -> None:
        shutil.rmtree(out_d, ignore_errors=True)
        out_d.mkdir(parents=True)
        cmd = [dcm2niix, "-z", "y", "-b", "y", "-f", "%s", "-o", str(out_d), str(src)]
        subprocess.run(cmd, check=True, capture_output=True)

    runs = {"dcm2niix": dcm2niix_gz, "cli": lambda: cli(out_c, None), "in-process": medfusion_gz}
    if before is not None:
        runs["before"] = lambda: cli(out_b, before)
    load = os.getloadavg()[0]
    t = rotated(runs, repeats)
    load = (load, os.getloadavg()[0])
    a_theirs, aff_theirs = canonical(next(out_d.glob("*.nii.gz")))
    identical, affine_diff = True, 0.0
    for out in [out_m, out_c] + ([out_b] if before is not None else []):
        a_ours, aff_ours = canonical(next(out.rglob("*.nii.gz")))
        identical &= bool(a_ours.shape == a_theirs.shape and np.array_equal(a_ours, a_theirs))
        affine_diff = max(affine_diff, float(np.abs(aff_ours - aff_theirs).max()))

    def ratio(name: str) -> float:  # median over rounds of dcm2niix's time / this run's time (> 1: faster)
        return round(statistics.median(d / m for d, m in zip(t["dcm2niix"], t[name])), 2)

    row = {
        "shape": f"{size}x{size}x{slices}",
        "load avg (start, end)": f"{load[0]:.1f}, {load[1]:.1f}",
        "dcm2niix -z y s": round(statistics.median(t["dcm2niix"]), 2),
        "medfusion convert (CLI) s": round(statistics.median(t["cli"]), 2),
        "ratio CLI": ratio("cli"),
        "convert_tree in-process s": round(statistics.median(t["in-process"]), 2),
        "ratio in-process": ratio("in-process"),
    }
    if before is not None:
        row["before (CLI) s"] = round(statistics.median(t["before"]), 2)
        row["ratio before"] = ratio("before")
    sizes = (next(out_c.rglob("*.nii.gz")).stat().st_size, next(out_d.glob("*.nii.gz")).stat().st_size)
    row["MB medfusion / dcm2niix"] = f"{sizes[0] / 1e6:.1f} / {sizes[1] / 1e6:.1f}"
    row["voxel-identical (canonical)"] = identical
    row["max |affine diff| mm"] = affine_diff
    return row


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(path))
    return np.asanyarray(img.dataobj).astype(np.float64), img.affine


def run_case(name: str, slices: int, size: int, oblique: bool, repeats: int, work: Path) -> dict:
    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    src = work / name / "dicom"
    make_series(src, slices, size, oblique)
    out_m, out_d = work / name / "medfusion", work / name / "dcm2niix"

    def medfusion_gz() -> None:
        shutil.rmtree(out_m, ignore_errors=True)
        report = convert_tree(src, out_m, progress=False)
        if report.exit_code:
            raise RuntimeError(f"medfusion failed: {[o.reason for o in report.failed]}")

    def dcm2niix_run(compress: str) -> None:
        shutil.rmtree(out_d, ignore_errors=True)
        out_d.mkdir(parents=True)
        subprocess.run(
            [dcm2niix, "-z", compress, "-b", "y", "-f", "%s", "-o", str(out_d), str(src)],
            check=True,
            capture_output=True,
        )

    def medfusion_raw() -> None:
        shutil.rmtree(out_m, ignore_errors=True)
        volume = read_series(src)
        write_nifti(out_m / "raw.nii", volume.array, volume.affine, dtype="int16")

    t_m_raw, _ = timed(medfusion_raw, repeats)
    t_d_raw, _ = timed(lambda: dcm2niix_run("n"), repeats)
    t_d, _ = timed(lambda: dcm2niix_run("y"), repeats)
    t_m, _ = timed(medfusion_gz, repeats)  # leaves both .nii.gz outputs in place for the checks

    ours = next(out_m.rglob("*.nii.gz"))
    theirs = next(out_d.glob("*.nii.gz"))
    a_ours, aff_ours = canonical(ours)
    a_theirs, aff_theirs = canonical(theirs)
    identical = a_ours.shape == a_theirs.shape and np.array_equal(a_ours, a_theirs)
    mb = slices * size * size * 2 / 1e6
    return {
        "case": name,
        "shape": f"{size}x{size}x{slices}",
        "MB int16": round(mb, 1),
        "medfusion .nii.gz s": round(t_m, 3),
        "dcm2niix -z y s": round(t_d, 3),
        "ratio gz (dcm2niix time / medfusion time)": round(t_d / t_m, 2),
        "medfusion .nii s": round(t_m_raw, 3),
        "dcm2niix -z n s": round(t_d_raw, 3),
        "ratio raw": round(t_d_raw / t_m_raw, 2),
        "voxel-identical (canonical)": bool(identical),
        "max |affine diff| mm": float(np.abs(aff_ours - aff_theirs).max()),
        "size medfusion / dcm2niix MB": f"{ours.stat().st_size / 1e6:.1f} / {theirs.stat().st_size / 1e6:.1f}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--real-header",
        action="store_true",
        help="only the paired run on a series with a real scanner's header (not written by medfusion)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="with --real-header: a folder holding an older medfusion package (its parent goes on PYTHONPATH)",
    )
    args = parser.parse_args()
    if args.real_header:
        before = args.before.resolve().parent if args.before is not None else None
        with tempfile.TemporaryDirectory(prefix="medfusion_bench_convert_") as tmp:
            row = run_real_header(args.slices, args.size, args.repeats, Path(tmp), before)
        print("| " + " | ".join(row) + " |")
        print("|" + "---|" * len(row))
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
        return 0 if row["voxel-identical (canonical)"] and row["max |affine diff| mm"] < 1e-3 else 1
    with tempfile.TemporaryDirectory(prefix="medfusion_bench_convert_") as tmp:
        rows = [
            run_case("axial", args.slices, args.size, False, args.repeats, Path(tmp)),
            run_case("oblique", max(args.slices // 5, 4), args.size // 4, True, args.repeats, Path(tmp)),
        ]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    ok = all(r["voxel-identical (canonical)"] and r["max |affine diff| mm"] < 1e-3 for r in rows)
    print("agreement with dcm2niix:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
