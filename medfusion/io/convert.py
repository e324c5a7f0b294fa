"""``medfusion convert INPUT OUTPUT``: a DICOM tree -> one NIfTI (``.nii.gz``) + JSON sidecar per series.

The batch-job behaviour users of dcm2niix / heudiconv ask for (user_asks.md §0.1, §0.6) and no library
bundles: every series is discovered and reported (never silently one of several), bad series fail alone
with a reason while the rest converts, files are written atomically (temporary name, then rename; the
sidecar is written last and marks an output as complete), a rerun skips complete outputs, nothing is ever
written inside INPUT, and the exit status tells "all ok" (0) from "some failed" (1), "all failed" (2) and
"incomplete volumes" (10, as dcm2niix: a 4D series whose partial last volume was dropped, user_asks §0.3).
Failures take precedence over incomplete volumes: 2 or 1 whenever a series failed, 10 only when every
series converted (or was skipped) and at least one dropped a partial volume — a wrapper that treats any
non-zero status as "look at the report" sees both, and one that only tolerates 10 never hides a failure.

4D series (the same slice positions repeated over time) become one 4D NIfTI ``[i, j, k, t]`` with the 3D
affine, as dcm2niix writes them; the sidecar says which field ordered the time points (``time_key``,
``time_values``) and ``incomplete`` records a dropped partial last volume (a rerun that skips the series
still returns 10).

Output layout: ``OUTPUT/<PatientID>/<StudyDate_StudyDescription>/<SeriesNumber>_<SeriesDescription>.nii.gz``
(sanitised; a short hash of the UID is appended where two series or studies would get the same name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medfusion.io.atomic import write_text_atomic
from medfusion.io.dicom import SIDECAR_KEYS, DicomSeries, discover_series, read_series
from medfusion.io.nifti import sidecar_path, write_nifti
from medfusion.io.volume import voxel_spacing

Status = Literal["converted", "skipped", "failed"]
SIDECAR_EXTRA_KEYS = (
    "StudyDate",
    "StudyDescription",
    "SplitReason",
    "warnings",
    "shape",
    "spacing",
    "time_key",
    "time_values",
    "incomplete",
)
EXIT_OK, EXIT_SOME_FAILED, EXIT_ALL_FAILED, EXIT_INCOMPLETE = 0, 1, 2, 10


@dataclass
class SeriesOutcome:
    """What happened to one series (or one group of skipped files)."""

    status: Status
    reason: str
    output: Path | None = None
    series_uid: str | None = None
    description: str | None = None
    sources: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = ()
    incomplete: str | None = None  # "incomplete: dropped last volume with k of n slices"


@dataclass
class ConvertReport:
    """Return of :func:`convert_tree`; ``exit_code`` is 0 (all ok), 1 (some failed), 2 (all failed) or 10
    (nothing failed, but a 4D series had its partial last volume dropped)."""

    input_dir: Path
    output_dir: Path
    outcomes: list[SeriesOutcome] = field(default_factory=list)

    def _with(self, status: Status) -> list[SeriesOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def converted(self) -> list[SeriesOutcome]:
        return self._with("converted")

    @property
    def skipped(self) -> list[SeriesOutcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[SeriesOutcome]:
        return self._with("failed")

    @property
    def incomplete(self) -> list[SeriesOutcome]:
        return [o for o in self.outcomes if o.incomplete and o.status != "failed"]

    @property
    def exit_code(self) -> int:
        done = [o for o in self.outcomes if o.output is not None and o.status != "failed"]
        if not self.failed:
            # nothing but non-DICOM files (no series at all) counts as "all failed"
            if not (done or any(o.series_uid for o in self.outcomes)):
                return EXIT_ALL_FAILED
            return EXIT_INCOMPLETE if self.incomplete else EXIT_OK
        return EXIT_SOME_FAILED if done else EXIT_ALL_FAILED


# ------------------------------------------------------------------------------------------ naming


def sanitize(text: object, fallback: str) -> str:
    """File-system-safe name component: ``[A-Za-z0-9._-]`` only, at most 64 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text or "")).strip("._-")[:64]
    return cleaned or fallback


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def output_names(series: list[DicomSeries]) -> list[str]:
    """Relative output stems (no suffix), unique within the list and stable across reruns."""
    meta = [s.meta for s in series]
    patients = [sanitize(m.get("PatientID"), "anonymous") for m in meta]
    studies = [
        sanitize(
            "_".join(str(m[k]) for k in ("StudyDate", "StudyDescription") if m.get(k)) or m.get("StudyID"),
            "study",
        )
        for m in meta
    ]
    # different studies that would share a folder get the hash of their StudyInstanceUID appended
    folders: dict[tuple[str, str], set[str]] = {}
    for patient, study, m in zip(patients, studies, meta):
        folders.setdefault((patient, study), set()).add(str(m.get("StudyInstanceUID")))
    names = []
    for patient, study, s in zip(patients, studies, series):
        if len(folders[(patient, study)]) > 1:
            study = f"{study}_{_short_hash(str(s.meta.get('StudyInstanceUID')))}"
        number = s.meta.get("SeriesNumber")
        number = f"{int(number):03d}" if isinstance(number, (int, float)) else "000"
        stem = f"{number}_{sanitize(s.meta.get('SeriesDescription'), 'series')}"
        if s.part is not None:
            stem += f"_part{s.part}"
        names.append(f"{patient}/{study}/{stem}")
    counts = Counter(names)
    return [
        f"{name}_{_short_hash(s.series_uid + str(s.part))}" if counts[name] > 1 else name
        for name, s in zip(names, series)
    ]


# -------------------------------------------------------------------------------------- one series


def _storage_dtype(array: np.ndarray) -> np.dtype | None:
    """int16 for float data holding int16-range integers (CT HU), as dcm2niix stores it; else unchanged."""
    if np.issubdtype(array.dtype, np.floating) and array.size:
        if array.min() >= -32768 and array.max() <= 32767 and np.array_equal(array, np.rint(array)):
            return np.dtype(np.int16)
    return None


def is_complete(nifti: Path) -> bool:
    """An output is complete when its sidecar exists (written last, atomically) next to the image."""
    return nifti.is_file() and sidecar_path(nifti).is_file()


def convert_series(series: DicomSeries, nifti: Path, overwrite: bool = False) -> SeriesOutcome:
    """Read one series and write ``nifti`` + its sidecar (atomic). Never raises for bad input data."""
    common = {
        "series_uid": series.series_uid,
        "description": series.description,
        "sources": tuple(series.files),
    }
    if is_complete(nifti) and not overwrite:
        try:
            incomplete = json.loads(sidecar_path(nifti).read_text()).get("incomplete")
        except (OSError, ValueError, AttributeError):
            incomplete = None
        reason = "already converted" + (f"; warning: {incomplete}" if incomplete else "")
        return SeriesOutcome("skipped", reason, output=nifti, incomplete=incomplete, **common)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = read_series(series)
        step = volume.meta.get("time_step") if volume.array.ndim == 4 else None
        write_nifti(
            nifti,
            volume.array,
            volume.affine,
            overwrite=True,
            dtype=_storage_dtype(volume.array),
            time_step=step,
        )
        sidecar = {key: volume.meta.get(key) for key in SIDECAR_KEYS}
        sidecar.update(
            StudyDate=volume.meta.get("StudyDate"),
            StudyDescription=volume.meta.get("StudyDescription"),
            SplitReason=series.split_reason,
            warnings=volume.meta.get("warnings", []),
            shape=list(volume.array.shape),
            spacing=list(voxel_spacing(volume.affine, min(volume.array.ndim, 3))),
            time_key=volume.meta.get("time_key"),
            time_step=volume.meta.get("time_step"),
            time_values=volume.meta.get("time_values"),
            incomplete=volume.meta.get("incomplete"),
        )
        write_text_atomic(sidecar_path(nifti), json.dumps(sidecar, indent=2) + "\n", overwrite=True)
    except Exception as exc:  # noqa: BLE001 - one bad series must not stop the batch (user_asks §0.6)
        return SeriesOutcome("failed", f"{type(exc).__name__}: {exc}", **common)
    notes = tuple(volume.meta.get("warnings", []))
    reason = "ok" + (f" ({series.split_reason})" if series.split_reason else "")
    return SeriesOutcome(
        "converted",
        reason + ("; warning: " + "; ".join(notes) if notes else ""),
        nifti,
        warnings=notes,
        incomplete=volume.meta.get("incomplete"),
        **common,
    )


# ------------------------------------------------------------------------------------------- batch


def check_output_location(input_dir: Path, output_dir: Path) -> None:
    """Refuse an OUTPUT that is INPUT or lies inside it (``ValueError``)."""
    inp, out = input_dir.resolve(), output_dir.resolve()
    if out == inp or inp in out.parents:
        raise ValueError(
            f"OUTPUT {output_dir} lies inside INPUT {input_dir}; medfusion never writes inside INPUT"
        )


def convert_tree(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    include_derived: bool = False,
    include_localizers: bool = False,
    merge_acquisitions: bool = False,
) -> ConvertReport:
    """Convert every DICOM series under ``input_dir`` to ``output_dir/<name>.nii.gz`` + ``<name>.json``.

    Args:
        input_dir: DICOM tree (any names, nested folders; non-DICOM files are skipped and reported).
        output_dir: destination, created if needed; must not lie inside ``input_dir``.
        workers: processes converting series in parallel (1: in this process).
        overwrite: reconvert series whose outputs are already complete (default: skip them).
        progress: show a rich progress bar on stderr.
        include_derived, include_localizers: convert ImageType DERIVED / LOCALIZER series too.
        merge_acquisitions: keep repeated acquisitions (same positions, different AcquisitionNumber) in one
            4D volume ordered by AcquisitionNumber instead of one volume each (contrast phases).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"INPUT {input_dir} is not a folder")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    check_output_location(input_dir, output_dir)
    found = discover_series(
        input_dir,
        include_derived=include_derived,
        include_localizers=include_localizers,
        merge_acquisitions=merge_acquisitions,
    )
    report = ConvertReport(input_dir, output_dir)
    for item in found.skipped:
        report.outcomes.append(
            SeriesOutcome(
                "skipped",
                item.reason,
                series_uid=item.series_uid,
                description=item.description,
                sources=item.paths,
            )
        )
    names = output_names(found.series)
    targets = [output_dir / f"{name}.nii.gz" for name in names]
    bar = _progress_bar(progress)
    with bar:
        task = bar.add_task("converting", total=len(targets))
        if workers == 1 or len(targets) <= 1:
            for series, target in zip(found.series, targets):
                report.outcomes.append(convert_series(series, target, overwrite))
                bar.advance(task)
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {
                    pool.submit(convert_series, s, t, overwrite): s for s, t in zip(found.series, targets)
                }
                try:
                    for future in as_completed(futures):
                        try:
                            report.outcomes.append(future.result())
                        except Exception as exc:  # noqa: BLE001 - e.g. a worker killed by the OOM killer
                            series = futures[future]
                            report.outcomes.append(
                                SeriesOutcome(
                                    "failed",
                                    f"worker error {type(exc).__name__}: {exc}",
                                    series_uid=series.series_uid,
                                    description=series.description,
                                    sources=tuple(series.files),
                                )
                            )
                        bar.advance(task)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    return report


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def advance(self, task: int) -> None:
        return None


def _progress_bar(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def print_summary(report: ConvertReport, file=None) -> None:
    """Counts, then one row per failed / skipped / converted series (skipped files grouped by reason)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=160)
    table = Table(title=f"medfusion convert {report.input_dir} -> {report.output_dir}")
    for column in ("status", "series / files", "output", "reason"):
        table.add_column(column, overflow="fold")
    for outcome in report.failed + report.converted:
        table.add_row(
            outcome.status,
            f"{outcome.description or ''} [{outcome.series_uid}] ({len(outcome.sources)} files)",
            str(outcome.output.relative_to(report.output_dir)) if outcome.output else "-",
            outcome.reason,
        )
    grouped: dict[str, list[SeriesOutcome]] = {}
    for outcome in report.skipped:
        grouped.setdefault(outcome.reason if outcome.output is None else "already converted", []).append(
            outcome
        )
    for reason, items in grouped.items():
        files = sum(len(o.sources) for o in items)
        first = items[0].sources[0] if items[0].sources else ""
        table.add_row("skipped", f"{len(items)} item(s), {files} files, e.g. {first}", "-", reason)
    console.print(table)
    for outcome in report.failed:  # full reasons, unwrapped, for logs and grep
        print(
            f"FAILED {outcome.description or ''} [{outcome.series_uid}]: {outcome.reason}", file=console.file
        )
    for outcome in report.incomplete:
        print(
            f"INCOMPLETE {outcome.description or ''} [{outcome.series_uid}]: {outcome.incomplete}",
            file=console.file,
        )
    console.print(
        f"converted {len(report.converted)}, skipped {len(report.skipped)}, failed {len(report.failed)}, "
        f"incomplete {len(report.incomplete)}; exit status {report.exit_code}"
    )


# --------------------------------------------------------------------------------------------- CLI


EXIT_STATUS_HELP = (
    "exit status: 0 all ok; 1 some series failed; 2 all failed (or bad arguments); 10 nothing failed but "
    "incomplete volumes (a 4D series' partial last volume was dropped). Failures take precedence over 10."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.epilog is None:
        parser.epilog = EXIT_STATUS_HELP
    parser.add_argument("input", type=Path, help="DICOM folder tree (read only)")
    parser.add_argument("output", type=Path, help="output folder (must not be inside INPUT)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="reconvert series whose outputs exist")
    parser.add_argument(
        "--include-derived", action="store_true", help="also convert ImageType DERIVED series"
    )
    parser.add_argument("--include-localizers", action="store_true", help="also convert localizer series")
    parser.add_argument(
        "--merge-acquisitions",
        action="store_true",
        help="keep repeated acquisitions (same positions, different AcquisitionNumber) as one 4D volume",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 all ok, 1 some series failed, 2 all failed (or bad arguments), 10 incomplete volumes
    (nothing failed, a partial last 4D volume was dropped); 1 / 2 take precedence over 10."""
    try:
        report = convert_tree(
            args.input,
            args.output,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not getattr(args, "no_progress", False),
            include_derived=getattr(args, "include_derived", False),
            include_localizers=getattr(args, "include_localizers", False),
            merge_acquisitions=getattr(args, "merge_acquisitions", False),
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"medfusion convert: {exc}", file=sys.stderr)
        return 2
    print_summary(report)
    if not report.outcomes:
        print(f"medfusion convert: no DICOM files found under {args.input}", file=sys.stderr)
    return report.exit_code
