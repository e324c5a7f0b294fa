"""Run reports: one machine-readable record per batch command, one row per input, in the output root.

``convert``, ``standardize``, ``restore`` and ``augment`` write ``<command>_report.csv`` next to their outputs: every
input file (or series, or manifest case) appears exactly once with its status, the reason, the DICOM series UID where
there is one, the output path, the seconds it took and, for the commands that run a model (``standardize``,
``restore``, ``augment``), the peak memory of the case: ``cpu_peak_mb`` (growth of the process's peak resident set
during the case) and ``gpu_peak_mb`` (``torch.cuda.max_memory_allocated`` after a reset at the case's start; empty
off CUDA), measured by :class:`medfusion.apps.predict.CaseMemory`. The file is rewritten atomically after each input (so a killed
run leaves a report of what it finished), and a resumed run reads the old report first and brings it up to date:
inputs it skips because their output exists keep their earlier row with status ``already done``.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from medfusion.io.atomic import write_text_atomic

Status = Literal["written", "converted", "skipped", "failed", "already done"]
STATUSES: tuple[str, ...] = ("written", "converted", "skipped", "failed", "already done")


@dataclass
class ReportRow:
    """One input of a batch command."""

    input: str
    status: Status
    reason: str = ""
    series_uid: str = ""
    output: str = ""
    seconds: float = 0.0
    time: str = ""  # when the row was written (UTC, ISO 8601)
    cpu_peak_mb: float | None = None  # peak resident set growth of the process during the case (MiB)
    gpu_peak_mb: float | None = None  # torch.cuda.max_memory_allocated during the case (MiB); None off CUDA

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}; got {self.status!r}")


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ReportRow))
MEMORY_COLUMNS: tuple[str, ...] = ("cpu_peak_mb", "gpu_peak_mb")
# reports written before the memory columns existed are still read (their rows have no memory figures)
_OLD_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in MEMORY_COLUMNS)


_DONE = ("written", "converted", "already done")


def report_path(output_root: str | Path, command: str) -> Path:
    """``<output_root>/<command>_report.csv``."""
    return Path(output_root) / f"{command}_report.csv"


class RunReport:
    """The rows of one command's report, keyed by input (a later row of the same input replaces the earlier one,
    except that a ``skipped`` row does not replace one whose output was written: two runs on one OUTPUT race, and
    the one that found the input claimed by the other reports it skipped, possibly after the other's success).

    Args:
        path: the CSV file (:func:`report_path`); an existing one is read first (a resumed run).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: dict[str, ReportRow] = {}
        if self.path.is_file():
            self.rows = {row.input: row for row in read_report(self.path)}

    def add(self, row: ReportRow, *, write: bool = True) -> ReportRow:
        """Record ``row`` (stamped with the current time if it has none) and rewrite the file atomically."""
        if not row.time:
            row.time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        previous = self.rows.get(row.input)
        if row.status == "already done" and previous is not None and previous.status in ("written", "converted"):
            row = ReportRow(**{**asdict(previous), "status": "already done", "time": row.time})
        if row.status == "skipped" and previous is not None and previous.status in _DONE:
            return previous
        self.rows[row.input] = row
        if write:
            self.write()
        return row

    def extend(self, rows: Iterable[ReportRow]) -> None:
        for row in rows:
            self.add(row, write=False)
        self.write()

    def counts(self) -> dict[str, int]:
        """Number of inputs per status."""
        out = {s: 0 for s in STATUSES}
        for row in self.rows.values():
            out[row.status] += 1
        return out

    def write(self) -> Path:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for key in sorted(self.rows):
            writer.writerow(asdict(self.rows[key]))
        return write_text_atomic(self.path, buf.getvalue(), overwrite=True)


def read_report(path: str | Path) -> list[ReportRow]:
    """Rows of a report CSV; ``ValueError`` naming the file when it is not one."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) not in (COLUMNS, _OLD_COLUMNS):
            raise ValueError(f"{path}: not a medfusion run report (columns {reader.fieldnames}, expected {COLUMNS})")
        rows = []
        for line in reader:
            try:
                numbers = {key: float(line[key]) if line.get(key) else None for key in MEMORY_COLUMNS}
                rows.append(ReportRow(**{**line, **numbers, "seconds": float(line["seconds"] or 0.0)}))
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err
    return rows
