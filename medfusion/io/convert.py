"""Batch conversion of a DICOM tree: one NIfTI (``.nii.gz``) + JSON sidecar per series.

What users of dcm2niix / heudiconv expect of a batch job and no library bundles: every series is discovered and
reported (never silently one of several), a bad series fails alone with its reason while the rest converts,
files are written atomically (temporary name, then rename; the sidecar is written last and marks an output as
complete), a rerun skips complete outputs, and nothing is ever written inside INPUT. ``OUTPUT/convert_report.csv``
(:class:`ReportWriter`, :mod:`medfusion.io.run_report`) records every input file once: converted, skipped,
failed or already done, with the reason, series UID, output and seconds; it is rewritten atomically after each
series. Each series is converted under a claim (:mod:`medfusion.io.claim`), so two ``convert`` processes on one
OUTPUT never write the same series, and a killed run's temporaries are removed when the series is taken up again.
:attr:`ConvertReport.exit_code` follows :mod:`medfusion.exit_codes`: 0 all done, 1 some series failed, 2 nothing
converted, 3 every series done but a 4D series had its partial last volume dropped (dcm2niix reports such
series the same way). Failures take precedence over incomplete volumes, so a wrapper that tolerates 3 never
hides a failure.

4D series (the same slice positions repeated over time) become one 4D NIfTI ``[i, j, k, t]`` with the 3D
affine, as dcm2niix writes them; the sidecar says which field ordered the time points (``time_key``,
``time_values``) and ``incomplete`` records a dropped partial last volume (a rerun that skips the series
still returns 3).

Output layout: ``OUTPUT/<PatientID>/<StudyDate_StudyDescription>/<SeriesNumber>_<SeriesDescription>.nii.gz``
(sanitised; a short hash of the UID is appended where two series or studies would get the same name).
The command line is :mod:`medfusion.apps.convert`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medfusion.exit_codes import EXIT_NOTHING_DONE, batch_exit_code
from medfusion.io.atomic import write_text_atomic
from medfusion.io.claim import claim, claim_path, locked_folder
from medfusion.io.dicom import SIDECAR_KEYS, DicomSeries, discover_series, read_series
from medfusion.io.dicom.header import quiet_reading
from medfusion.io.nifti import sidecar_path, write_nifti
from medfusion.io.run_report import ReportRow, RunReport, report_path
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
    seconds: float = 0.0  # time spent on the series in this run

    @property
    def already_done(self) -> bool:
        """Skipped because a complete output exists (a resumed run)."""
        return self.status == "skipped" and self.output is not None


@dataclass
class ConvertReport:
    """Return of :func:`convert_tree`; ``exit_code`` follows :mod:`medfusion.exit_codes`: 0 all done,
    1 some series failed, 2 nothing converted (every series failed, or no DICOM series at all), 3 nothing
    failed but a 4D series had its partial last volume dropped."""

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
        if not (done or self.failed or any(o.series_uid for o in self.outcomes)):
            return EXIT_NOTHING_DONE  # nothing but non-DICOM files: no series at all
        return batch_exit_code(len(done), len(self.failed), incomplete=bool(self.incomplete))


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


def _storage_dtype(array: np.ndarray, integer_valued: bool = False) -> np.dtype | None:
    """int16 for float data holding int16-range integers (CT HU), as dcm2niix stores it; int32 (or float64)
    for 64-bit integers, which NIfTI readers rarely accept; else unchanged. ``integer_valued`` (known from the
    header: integer pixels, slopes and intercepts) skips the voxel-by-voxel integer check."""
    if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        fits = not array.size or (array.min() >= info.min and array.max() <= info.max)
        return np.dtype(np.int32) if fits else np.dtype(np.float64)
    if np.issubdtype(array.dtype, np.floating) and array.size:
        in_range = array.min() >= -32768 and array.max() <= 32767
        if in_range and (integer_valued or np.array_equal(array, np.rint(array))):
            return np.dtype(np.int16)
    return None


def is_complete(nifti: Path) -> bool:
    """An output is complete when its sidecar exists (written last, atomically) next to the image."""
    return nifti.is_file() and sidecar_path(nifti).is_file()


def convert_series(
    series: DicomSeries, nifti: Path, overwrite: bool = False, claim_dir: Path | None = None
) -> SeriesOutcome:
    """Read one series and write ``nifti`` + its sidecar (atomic). Never raises for bad input data.

    The work is done under a claim on ``nifti`` (:mod:`medfusion.io.claim`, claim file in ``claim_dir``, default
    ``nifti``'s folder): a series that another process is converting at the same moment (two ``convert`` jobs
    on one OUTPUT) is skipped with that reason.
    """
    start = time.perf_counter()
    if is_complete(nifti) and not overwrite and not claim_path(nifti, claim_dir).exists():
        return _convert_claimed(series, nifti, overwrite)  # final state, no claim to clear: nothing touched
    try:
        with claim(nifti, claim_dir) as held:
            if held:
                if nifti.parent.is_dir():
                    remove_stale_temporaries(nifti)
                outcome = _convert_claimed(series, nifti, overwrite)
            else:
                outcome = SeriesOutcome(
                    "skipped",
                    f"being converted by another process (it holds {nifti.name}'s claim); rerun to check",
                    series_uid=series.series_uid,
                    description=series.description,
                    sources=tuple(series.files),
                )
    except OSError as exc:  # the claim file cannot be made: OUTPUT not writable
        outcome = SeriesOutcome(
            "failed",
            f"cannot write {nifti.parent}: {exc}",
            series_uid=series.series_uid,
            description=series.description,
            sources=tuple(series.files),
        )
    outcome.seconds = time.perf_counter() - start
    return outcome


def remove_stale_temporaries(output: Path) -> None:
    """Remove the temporaries a killed writer left for ``output`` and its sidecar (``.<name>.*.part*``); call
    only while holding ``output``'s claim, so that no live writer owns them."""
    for name in (output.name, sidecar_path(output).name):
        for stale in output.parent.glob(f".{glob.escape(name)}.*.part*"):
            stale.unlink(missing_ok=True)


def _convert_claimed(series: DicomSeries, nifti: Path, overwrite: bool) -> SeriesOutcome:
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
        with quiet_reading():
            volume = read_series(series, keep_int16=True)
        step = volume.meta.get("time_step") if volume.array.ndim == 4 else None
        write_nifti(
            nifti,
            volume.array,
            volume.affine,
            overwrite=True,
            dtype=_storage_dtype(volume.array, bool(volume.meta.get("integer_valued"))),
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
    except Exception as exc:  # noqa: BLE001 - one bad series must not stop the batch
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
    if not input_dir.exists():
        raise FileNotFoundError(f"INPUT {input_dir} not found")
    if not input_dir.is_dir():
        nifti = (
            " (a NIfTI file: it needs no conversion)" if input_dir.name.endswith((".nii", ".nii.gz")) else ""
        )
        raise ValueError(f"INPUT {input_dir} is a file, not a folder of DICOM files{nifti}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    check_output_location(input_dir, output_dir)
    check_writable(output_dir)
    with quiet_reading():  # every problem is reported per file or series
        found = discover_series(
            input_dir,
            include_derived=include_derived,
            include_localizers=include_localizers,
            merge_acquisitions=merge_acquisitions,
        )
    report = ConvertReport(input_dir, output_dir)
    log = ReportWriter(input_dir, output_dir)
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
    log.add(report.outcomes)
    names = output_names(found.series)
    targets = [output_dir / f"{name}.nii.gz" for name in names]
    bar = _progress_bar(progress)
    with bar:
        task = bar.add_task("converting", total=len(targets))
        if workers == 1 or len(targets) <= 1:
            for series, target in zip(found.series, targets):
                report.outcomes.append(convert_series(series, target, overwrite, output_dir))
                log.add(report.outcomes[-1:])
                bar.advance(task)
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {
                    pool.submit(convert_series, s, t, overwrite, output_dir): s
                    for s, t in zip(found.series, targets)
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
                        log.add(report.outcomes[-1:])
                        bar.advance(task)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    return report


def check_writable(output_dir: Path) -> None:
    """Create ``output_dir`` if needed; ``PermissionError`` naming it when files cannot be made in it."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"OUTPUT {output_dir} cannot be created: {exc.strerror}") from exc
    try:  # a real probe: permission bits say nothing about a read-only mount or a full quota
        fd, probe = tempfile.mkstemp(prefix=".medfusion-probe.", suffix=".part", dir=output_dir)
    except OSError as exc:
        raise PermissionError(f"OUTPUT {output_dir} is not writable: {exc.strerror}") from exc
    os.close(fd)
    os.unlink(probe)


_PRIORITY = {"failed": 3, "converted": 2, "already done": 1, "skipped": 0}


class ReportWriter:
    """``OUTPUT/convert_report.csv`` (:mod:`medfusion.io.run_report`): one row per input file, relative to INPUT.

    A file in several series parts gets one row (the worst status: failed, converted, already done, skipped;
    the outputs joined by ``;``). Rows are merged into the report on disk under a lock on OUTPUT after each
    series, so a killed run leaves a report of what it finished and two runs on one OUTPUT keep both's rows.
    """

    def __init__(self, input_dir: Path, output_dir: Path) -> None:
        self.input_dir, self.output_dir = input_dir, output_dir
        self.path = report_path(output_dir, "convert")
        self.rows: dict[str, ReportRow] = {}

    def _row(self, outcome: SeriesOutcome, source: Path) -> ReportRow:
        status = "already done" if outcome.already_done else outcome.status
        output = _relative(outcome.output, self.output_dir) if outcome.output is not None else ""
        if status == "failed":
            output = ""
        return ReportRow(
            input=_relative(Path(source), self.input_dir),
            status=status,
            reason=outcome.reason,
            series_uid=outcome.series_uid or "",
            output=output,
            seconds=round(outcome.seconds, 4),
        )

    def _merge(self, row: ReportRow) -> None:
        old = self.rows.get(row.input)
        if old is None:
            self.rows[row.input] = row
            return
        keep, other = (row, old) if _PRIORITY[row.status] > _PRIORITY[old.status] else (old, row)
        outputs = [o for o in dict.fromkeys((keep.output, other.output)) if o]
        reasons = list(dict.fromkeys((keep.reason, other.reason)))
        keep.output, keep.reason = "; ".join(outputs), "; ".join(r for r in reasons if r)
        keep.seconds = round(keep.seconds + other.seconds, 4)
        self.rows[row.input] = keep

    def add(self, outcomes: list[SeriesOutcome]) -> None:
        """Record the files of ``outcomes`` and bring the report on disk up to date."""
        touched = []
        for outcome in outcomes:
            for source in outcome.sources:
                row = self._row(outcome, source)
                self._merge(row)
                touched.append(row.input)
        if not touched:
            return
        with locked_folder(
            self.output_dir
        ):  # writers of the report take this lock: their leftovers are stale
            for stale in self.output_dir.glob(f".{self.path.name}.*.part*"):
                stale.unlink(missing_ok=True)
            on_disk = RunReport(self.path)
            on_disk.extend(ReportRow(**vars(self.rows[key])) for key in dict.fromkeys(touched))


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


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def source_folder(outcome: SeriesOutcome, input_dir: Path) -> str:
    """Where the outcome's files are, relative to INPUT: their common folder (or the one file)."""
    if not outcome.sources:
        return "-"
    if len(outcome.sources) == 1:
        return _relative(Path(outcome.sources[0]), input_dir)
    return _relative(Path(os.path.commonpath([str(p) for p in outcome.sources])), input_dir)


def summary_line(outcome: SeriesOutcome, report: ConvertReport) -> str:
    """One line for one series: status, output (or source folder), description, file count and reason."""
    source = source_folder(outcome, report.input_dir)
    what = f"{outcome.description}, " if outcome.description else ""
    what += f"{len(outcome.sources)} file{'s' if len(outcome.sources) != 1 else ''}"
    if outcome.output is not None:
        where = f"{_relative(outcome.output, report.output_dir)} <- {source}"
    else:
        where = source
    reason = "" if outcome.reason == "ok" else f": {outcome.reason}"
    return f"{outcome.status:<9} {where} ({what}){reason}"


def print_summary(report: ConvertReport, file=None) -> None:
    """One line per series (converted, already converted, failed), one per group of skipped files (grouped by
    reason), then the counts and the exit status. Lines are not wrapped: each can be grepped whole."""
    file = file or sys.stdout
    series = [o for o in report.outcomes if o.status != "skipped" or o.output is not None]
    order = {"converted": 0, "skipped": 1, "failed": 2}
    for outcome in sorted(series, key=lambda o: order[o.status]):
        print(summary_line(outcome, report), file=file)
    grouped: dict[str, list[SeriesOutcome]] = {}
    for outcome in report.skipped:
        if outcome.output is None:
            grouped.setdefault(outcome.reason, []).append(outcome)
    for reason, items in grouped.items():
        files = [p for o in items for p in o.sources]
        example = _relative(Path(files[0]), report.input_dir) if files else "-"
        count = f"{len(files)} file{'s' if len(files) != 1 else ''}"
        print(f"{'skipped':<9} {count} (e.g. {example}): {reason}", file=file)
    print(
        f"converted {len(report.converted)}, skipped {len(report.skipped)}, failed {len(report.failed)}, "
        f"incomplete {len(report.incomplete)}; exit status {report.exit_code}",
        file=file,
    )
