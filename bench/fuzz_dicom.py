"""Fuzzed DICOM headers through ``convert``: a seeded mutator over real files (pydicom's test files, packaged).

Each case takes one real object (a 4-slice CT series built from CT_small.dcm, CT_small, MR_small in native, RLE
and JPEG 2000 encodings, the old-style multi-frame MR emri_small, the RT dose grid) and breaks one header field
or the pixel data of one file: drop or corrupt ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
Rows / Columns, BitsAllocated / BitsStored, RescaleSlope, TransferSyntaxUID; truncate the pixel data; duplicate
or shuffle frames. It then runs :func:`medfusion.io.convert.convert_tree` on the case in a worker process with a
per-case time limit and classifies the outcome:

* ``converted`` / ``failed`` / ``skipped``: what ``convert_report.csv`` says of the mutated file;
* ``crash``: an exception escaped ``convert_tree`` (a bug); ``hang``: the case ran past the time limit.

For every failed or skipped case it checks that the reason names the file and the field (or the pixel data /
its size for the pixel mutations). The counts go to ``bench/results/fuzz_dicom.md``.

    python bench/fuzz_dicom.py --cases 1000 --seed 0 --workers 2 --out bench/results/fuzz_dicom.md
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

BASES = ("ct_series", "ct_small", "mr_small", "mr_rle", "mr_j2k", "emri", "rtdose")
# mutation -> words of which one must appear in the reason of a failure (case-insensitive)
MUTATIONS: dict[str, tuple[str, ...]] = {
    "drop_ipp": ("ImagePositionPatient",),
    "corrupt_ipp": ("ImagePositionPatient", "position"),
    "drop_iop": ("ImageOrientationPatient",),
    "corrupt_iop": ("ImageOrientationPatient", "orientation"),
    "drop_spacing": ("PixelSpacing",),
    "corrupt_spacing": ("PixelSpacing", "spacing"),
    "rows_columns": ("Rows", "Columns"),
    "bits": ("BitsAllocated", "BitsStored"),
    "rescale_slope": ("RescaleSlope",),
    "transfer_syntax": ("TransferSyntaxUID", "transfer syntax"),
    "truncate_pixels": ("PixelData", "pixel data"),
    "duplicate_frame": ("duplicate", "NumberOfFrames", "PixelData", "pixel data"),
    "shuffle_frames": ("position", "order"),
}


def _base_files(name: str, folder: Path) -> list[Path]:
    """Write the base object ``name`` into ``folder``; return its files."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    single = {
        "ct_small": "CT_small.dcm",
        "mr_small": "MR_small.dcm",
        "mr_rle": "MR_small_RLE.dcm",
        "mr_j2k": "MR_small_jp2klossless.dcm",
        "emri": "emri_small.dcm",
        "rtdose": "rtdose.dcm",
    }
    if name in single:
        source = get_testdata_file(single[name], download=False)
        if source is None:
            raise FileNotFoundError(f"{single[name]} not installed")
        target = folder / single[name]
        shutil.copy(source, target)
        return [target]
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    uid, files = generate_uid(), []
    x, y, z = (float(v) for v in base.ImagePositionPatient)
    for k in range(4):
        ds = base.copy()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        ds.InstanceNumber = k + 1
        files.append(folder / f"slice{k}.dcm")
        ds.save_as(files[-1])
    return files


def _bad_value(rng: np.random.Generator, n: int) -> object:
    """A corrupt value for a multi-valued decimal field of ``n`` numbers."""
    choice = int(rng.integers(6))
    if choice == 0:
        return [1.0] * max(1, n - 1)  # too few values
    if choice == 1:
        return [float("nan")] * n
    if choice == 2:
        return [0.0] * n
    if choice == 3:
        return [1e30] * n
    if choice == 4:
        return [-1.0] * n
    return "abc"


def _mutate(ds, mutation: str, rng: np.random.Generator) -> None:  # noqa: C901 - one branch per mutation
    """Apply ``mutation`` to dataset ``ds`` in place."""
    from pydicom.uid import UID

    def drop(keyword: str) -> None:
        if keyword in ds:
            delattr(ds, keyword)

    def put(keyword: str, value: object) -> None:
        """Set a value; text (``"abc"``, ``"NaN"``) goes in raw, as a broken writer would have stored it."""
        from pydicom.datadict import dictionary_VR, tag_for_keyword
        from pydicom.dataelem import RawDataElement

        if isinstance(value, list) and any(v != v for v in value):
            value = "\\".join("NaN" for _ in value)
        if isinstance(value, str):
            tag = tag_for_keyword(keyword)
            raw = value.encode() + (b" " if len(value) % 2 else b"")
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
            return
        setattr(ds, keyword, value)

    if mutation == "drop_ipp":
        drop("ImagePositionPatient")
    elif mutation == "corrupt_ipp":
        put("ImagePositionPatient", _bad_value(rng, 3))
    elif mutation == "drop_iop":
        drop("ImageOrientationPatient")
    elif mutation == "corrupt_iop":
        put("ImageOrientationPatient", _bad_value(rng, 6))
    elif mutation == "drop_spacing":
        drop("PixelSpacing")
    elif mutation == "corrupt_spacing":
        put("PixelSpacing", _bad_value(rng, 2))
    elif mutation == "rows_columns":
        keyword = "Rows" if rng.integers(2) else "Columns"
        setattr(ds, keyword, int(rng.choice([0, 1, int(getattr(ds, keyword)) + 1, 65535])))
    elif mutation == "bits":
        if rng.integers(2):
            ds.BitsAllocated = int(rng.choice([1, 7, 12, 32, 64]))
        else:
            ds.BitsStored = int(rng.choice([0, 17, 33, int(ds.get("BitsAllocated", 16)) + 1]))
    elif mutation == "rescale_slope":
        value = rng.choice(["0", "NaN", "abc", "-1e40", ""])
        put("RescaleSlope", str(value))
    elif mutation == "transfer_syntax":
        choices = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.3.4", ""]
        value = str(rng.choice(choices))
        if value:
            ds.file_meta.TransferSyntaxUID = UID(value)
        else:
            del ds.file_meta.TransferSyntaxUID
    elif mutation == "truncate_pixels":
        data = bytes(ds.PixelData)
        ds.PixelData = data[: int(len(data) * rng.uniform(0.0, 0.95)) & ~1]
    elif mutation == "duplicate_frame":
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        ds.NumberOfFrames = frames + 1
    elif mutation == "shuffle_frames":
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 and "GridFrameOffsetVector" in ds:
            offsets = list(ds.GridFrameOffsetVector)
            rng.shuffle(offsets)
            ds.GridFrameOffsetVector = offsets
        elif "ImagePositionPatient" in ds:
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ipp[2] += float(
                rng.choice([0.0, 2.5, 7.0])
            )  # onto another slice, between two, or out of the grid
            ds.ImagePositionPatient = ipp


def _save(ds, path: Path) -> None:
    try:
        ds.save_as(path, enforce_file_format=False)
    except TypeError:  # pydicom < 3
        ds.save_as(path, write_like_original=True)


def _case(seed: int, index: int, limit: float) -> dict:
    """Build, run and classify case ``index`` (in a worker process)."""
    import pydicom

    rng = np.random.default_rng([seed, index])
    base = str(rng.choice(BASES))
    mutation = str(rng.choice(list(MUTATIONS)))
    record = {"index": index, "base": base, "mutation": mutation, "outcome": "", "reason": "", "named": True}
    work = Path(tempfile.mkdtemp(prefix="fuzz_dicom_"))
    try:
        files = _base_files(base, work / "in")
        target = files[int(rng.integers(len(files)))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(target)
            if mutation == "duplicate_frame" and len(files) > 1:
                shutil.copy(target, target.with_name("copy_" + target.name))  # same object twice
                ds.SOPInstanceUID = pydicom.uid.generate_uid()
                target = target.with_name("copy_" + target.name)
            _mutate(ds, mutation, rng)
            _save(ds, target)
        record.update(_run(work, target, mutation, limit))
    except Exception as exc:  # noqa: BLE001 - the mutation itself could not be written: not a case
        record.update(outcome="not built", reason=f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


class _Timeout(BaseException):  # not an Exception: convert's per-series handler must not catch it
    pass


def _alarm(*_: object) -> None:
    raise _Timeout


def _run(work: Path, target: Path, mutation: str, limit: float) -> dict:
    from medfusion.io.convert import convert_tree
    from medfusion.io.run_report import read_report

    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_tree(work / "in", work / "out", progress=False, include_derived=True)
    except _Timeout:
        return {"outcome": "hang", "reason": f"> {limit} s"}
    except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
        return {"outcome": "crash", "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    seconds = time.perf_counter() - start
    rows = {r.input: r for r in read_report(work / "out" / "convert_report.csv")}
    row = rows.get(str(target.relative_to(work / "in")))
    if row is None:
        return {"outcome": "crash", "reason": "mutated file missing from the report", "seconds": seconds}
    out = {"outcome": row.status, "reason": row.reason, "seconds": seconds}
    if row.status in ("failed", "skipped"):
        text = row.reason.lower().replace(" ", "")
        # a skipped row is one file's own row; a failed series must name the file in its reason
        names_file = row.status == "skipped" or target.name.lower() in text
        names_field = any(word.lower().replace(" ", "") in text for word in MUTATIONS[mutation])
        out["named"] = names_file and names_field
        out["names_file"], out["names_field"] = names_file, names_field
    return out


def _write_results(path: Path, records: list[dict], args: argparse.Namespace, seconds: float) -> str:
    counts = Counter(r["outcome"] for r in records)
    per = Counter((r["mutation"], r["outcome"]) for r in records)
    refused = [r for r in records if r["outcome"] in ("failed", "skipped")]
    unnamed = [r for r in refused if not r.get("named", True)]
    lines = [
        "# Fuzzed DICOM headers through `convert`",
        "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/fuzz_dicom.py --cases {args.cases} --seed {args.seed} "
        f"--workers {args.workers} --limit {args.limit} --out bench/results/fuzz_dicom.md` ({seconds:.0f} s on this "
        "machine, 2 shared vCPUs).",
        "",
        f"Cases: {len(records)}; " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        "",
        f"Uncaught exceptions: {counts.get('crash', 0)}; hangs (> {args.limit} s): {counts.get('hang', 0)}; "
        f"refusals (failed or skipped) naming the file and the field: {len(refused) - len(unnamed)} of "
        f"{len(refused)}.",
        "",
        "| mutation | converted | failed | skipped | crash | hang | not built |",
        "|---|---|---|---|---|---|---|",
    ]
    for mutation in MUTATIONS:
        cells = [
            str(per.get((mutation, o), 0))
            for o in ("converted", "failed", "skipped", "crash", "hang", "not built")
        ]
        lines.append(f"| {mutation} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Converted cases are mutations the reader tolerates (e.g. a dropped PixelSpacing: 1 mm assumed,",
        "with a warning in the sidecar; a dropped TransferSyntaxUID that pydicom infers).",
        "",
    ]
    for title, items in (
        ("Crashes and hangs", [r for r in records if r["outcome"] in ("crash", "hang")]),
        ("Refusals that do not name the file or the field", unnamed),
    ):
        lines.append(f"## {title}: {len(items)}")
        lines.append("")
        seen = set()
        for r in items:
            key = (r["mutation"], r["reason"][:80])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- case {r['index']} ({r['base']}, {r['mutation']}): {r['reason'][:300]}")
        lines.append("")
    text = "\n".join(lines)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=float, default=20.0, help="seconds per case")
    parser.add_argument("--out", type=Path, default=None, help="Markdown results file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with context.Pool(args.workers, maxtasksperchild=50) as pool:
        jobs = [pool.apply_async(_case, (args.seed, i, args.limit)) for i in range(args.cases)]
        records = []
        for i, job in enumerate(jobs):
            try:
                records.append(job.get(timeout=args.limit * 3 + 60))
            except multiprocessing.TimeoutError:
                records.append(
                    {"index": i, "base": "?", "mutation": "?", "outcome": "hang", "reason": "worker stuck"}
                )
    text = _write_results(args.out, records, args, time.perf_counter() - start)
    print(text)
    bad = sum(r["outcome"] in ("crash", "hang") for r in records)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
