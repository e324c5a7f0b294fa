"""Run a batch job case by case: in this process, or across devices and nodes with Lightning's ``Trainer.predict``.

The batch commands (``standardize``, ``restore``, ``augment``) describe their work as a :class:`CaseJob`: a list of
cases (one input each), ``compute(i, device)`` (the model's work on case ``i``) and ``write(i, result)`` (its outputs,
written atomically through :mod:`medfusion.io.atomic`). This module runs a job and records one row per case in the
run report (:mod:`medfusion.io.run_report`, ``<command>_report.csv`` in the output root):

* :func:`run_local`: every case in this process, on one device; the report is rewritten after each case.
* :func:`run_distributed`: ``Trainer.predict`` over ``devices x num_nodes`` ranks (DDP; Li et al., "PyTorch
  Distributed", VLDB 2020). :class:`ShardSampler` gives rank ``r`` of ``W`` the cases ``r, r + W, r + 2W, ...``:
  every case exactly once, with no padding (``torch.utils.data.DistributedSampler`` pads the last round with
  duplicates so that ranks take equal steps, which here would compute and write a case twice). Each rank computes in
  ``predict_step`` and writes its own outputs in :class:`CaseWriter` (a ``BasePredictionWriter``), keeping its rows in a
  part report ``.<command>_report.rank<r>.csv`` (rewritten after each case, so a killed rank leaves a record of what
  it finished). At the end rank 0 merges every part report, including those left by a killed earlier run, into the
  one report and removes them.

Both give the same outputs for the same job: a case's randomness is seeded from the job's seed and the case, never
from the rank (each job reseeds its generator per case). ``--resume`` works across ranks because a case whose output
exists is ``already done`` on whichever rank it falls. Multi-node runs need the output root on a filesystem shared by
the nodes (the part reports meet there).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader, Sampler

from medfusion.io.run_report import ReportRow, RunReport, read_report

Accelerator = Literal["cpu", "gpu", "auto"]
Strategy = Literal["ddp", "ddp_spawn", "auto"]
ACCELERATORS: tuple[str, ...] = ("cpu", "gpu", "auto")
STRATEGIES: tuple[str, ...] = ("ddp", "ddp_spawn", "auto")


class CaseJob(Protocol):
    """A batch of independent cases. Implementations must pickle (``ddp_spawn`` sends the job to its processes).

    ``model``: the module the cases run through (moved to each rank's device), or None. ``inputs``: the report key of
    every case (unique). ``preamble``: rows for inputs that are not cases (e.g. DICOM objects left out by discovery).
    """

    model: nn.Module | None
    inputs: list[str]
    preamble: list[ReportRow]

    def done_row(self, i: int) -> ReportRow | None:
        """The ``already done`` row of case ``i`` when resuming and its outputs exist, else None."""
        ...

    def output_of(self, i: int) -> str:
        """Output path (or pattern) of case ``i``, for the report."""
        ...

    def compute(self, i: int, device: torch.device) -> Any:
        """The model's work on case ``i`` (reads its input)."""
        ...

    def write(self, i: int, result: Any) -> tuple[ReportRow, Any]:
        """Write case ``i``'s outputs atomically; ``(report row, extra)`` (extra goes to :meth:`finish`)."""
        ...

    def finish(self, extras: list[Any]) -> None:
        """Called once, on rank 0, after every case, with the extras of every case of this run (any order)."""
        ...


def check_launch(
    devices: int | None, num_nodes: int = 1, accelerator: str = "cpu", strategy: str = "ddp"
) -> None:
    """``ValueError`` for launch options that cannot work (before any case is read)."""
    if devices is not None and devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    if num_nodes < 1:
        raise ValueError(f"--num-nodes must be >= 1, got {num_nodes}")
    if num_nodes > 1 and devices is None:
        raise ValueError("--num-nodes needs --devices (devices per node)")
    if accelerator not in ACCELERATORS:
        raise ValueError(f"--accelerator must be one of {', '.join(ACCELERATORS)}; got {accelerator!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError("--accelerator gpu requested but CUDA is not available")


class CaseMemory:
    """Peak memory of one case, for the run report's ``cpu_peak_mb`` / ``gpu_peak_mb`` (MiB).

    CPU: the growth of this process's peak resident set size during the case. On Linux the peak is reset at the
    start (``5`` written to ``/proc/self/clear_refs``, Linux >= 4.0, proc(5)) and read from ``VmHWM`` in
    ``/proc/self/status`` at the end, minus ``VmRSS`` at the start: the true peak growth, memory freed inside the
    case included. Where the reset is not allowed (other systems, restricted /proc) ``getrusage``'s ``ru_maxrss``
    is used, a lifetime high-water mark: its growth counts only what exceeds every earlier case, a lower bound
    (0 once a larger case ran). Resident memory of this process only (threads included, child processes not).
    GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start: tensors allocated by
    PyTorch on the case's device, the resident model included; the caching allocator's reserve and other
    libraries' memory are not counted (``nvidia-smi`` shows more). None off CUDA.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.reset = _reset_peak_rss()
        self.start_kib = _status_kib("VmRSS") if self.reset else _maxrss_kib()

    def stop(self, row: ReportRow) -> ReportRow:
        """Put the case's peaks into ``row`` (returned)."""
        peak = _status_kib("VmHWM") if self.reset else _maxrss_kib()
        if peak is not None and self.start_kib is not None:
            row.cpu_peak_mb = round(max(peak - self.start_kib, 0) / 1024, 1)
        if self.cuda:
            row.gpu_peak_mb = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return row


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _status_kib(key: str) -> int | None:
    """A ``kB`` value of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss_kib() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere


def _failed(job: CaseJob, i: int, err: BaseException) -> ReportRow:
    return ReportRow(job.inputs[i], "failed", reason=f"{type(err).__name__}: {err}", output=job.output_of(i))


def _timed(row: ReportRow, t0: float) -> ReportRow:
    row.seconds = round(time.perf_counter() - t0, 3)
    return row


def process_case(job: CaseJob, i: int, device: torch.device) -> tuple[ReportRow, Any]:
    """Case ``i`` start to end: ``already done``, or compute + write; any error becomes a ``failed`` row."""
    done = job.done_row(i)
    if done is not None:
        return done, None
    t0, memory = time.perf_counter(), CaseMemory(device)
    try:
        row, extra = job.write(i, job.compute(i, device))
    except Exception as err:  # noqa: BLE001 - one bad case (unreadable file, wrong shape) must not stop the batch
        return memory.stop(_timed(_failed(job, i, err), t0)), None
    return memory.stop(_timed(row, t0)), extra


def run_local(
    job: CaseJob, report_file: str | Path, device: torch.device | str = "cpu", *, show_progress: bool = False
) -> list[ReportRow]:
    """Every case of ``job`` in this process; the report is rewritten after each case. Returns this run's rows
    (preamble first, then the cases in order)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    device = torch.device(device)
    if job.model is not None:
        job.model.to(device)
    report = RunReport(report_file)
    report.extend(job.preamble)
    rows, extras = list(job.preamble), []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress) as bar:
        task = bar.add_task("cases", total=len(job.inputs))
        for i in range(len(job.inputs)):
            row, extra = process_case(job, i, device)
            rows.append(report.add(row))
            extras.append(extra)
            bar.advance(task)
    job.finish([e for e in extras if e is not None])
    return rows


# ------------------------------------------------------------------------------------------- distributed
def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``n`` cases: every case on exactly one rank, no padding duplicates.

    The rank and world size are read when iterating (the process group exists only inside the launched ranks).
    """

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def __iter__(self) -> Iterator[int]:
        rank, world = _rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = _rank_world()
        return len(range(rank, self.n, world))


def _single(batch: Sequence[int]) -> int:
    return int(batch[0])


def part_path(report_file: Path, rank: int) -> Path:
    """Rank ``rank``'s part report next to ``report_file``: ``.<name>.rank<r>.csv``."""
    return report_file.with_name(f".{report_file.stem}.rank{rank}.csv")


def merge_parts(report_file: Path, preamble: Sequence[ReportRow]) -> RunReport:
    """Fold every part report next to ``report_file`` (this run's and a killed run's) into it; remove the parts."""
    report = RunReport(report_file)
    parts = sorted(report_file.parent.glob(f".{report_file.stem}.rank*.csv"))
    for row in preamble:
        report.add(row, write=False)
    for part in parts:
        for row in read_report(part):
            report.add(row, write=False)
    report.write()
    for part in parts:
        part.unlink()
    return report


class CasePredictor(L.LightningModule):
    """``predict_step``: one case's computation on this rank's device (or the row that says why not)."""

    def __init__(self, job: CaseJob) -> None:
        super().__init__()
        self.job = job
        self.net = job.model  # a sub-module, so Lightning moves it to the rank's device

    def predict_step(self, batch: int, batch_idx: int) -> tuple[int, ReportRow | None, Any, tuple]:
        """``(case, row or None, result, (start time, CaseMemory))``: the writer finishes the case's figures."""
        i, t0 = int(batch), time.perf_counter()
        done = self.job.done_row(i)
        if done is not None:
            return i, done, None, (t0, None)
        memory = CaseMemory(self.device)
        try:
            return i, None, self.job.compute(i, self.device), (t0, memory)
        except Exception as err:  # noqa: BLE001 - reported per case (process_case)
            return i, memory.stop(_timed(_failed(self.job, i, err), t0)), None, (t0, None)


class CaseWriter(BasePredictionWriter):
    """Writes each case's outputs on its rank, records its row in the rank's part report; rank 0 merges."""

    def __init__(self, job: CaseJob, report_file: Path) -> None:
        super().__init__(write_interval="batch")
        self.job, self.report_file = job, report_file
        self.extras: list[Any] = []
        self.part: RunReport | None = None

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        i, row, result, (t0, memory) = prediction
        extra = None
        if row is None:
            try:
                row, extra = self.job.write(i, result)
                row = _timed(row, t0)
            except Exception as err:  # noqa: BLE001 - reported per case
                row = _timed(_failed(self.job, i, err), t0)
            row = memory.stop(row)
        if self.part is None:
            self.part = RunReport(part_path(self.report_file, trainer.global_rank))
        self.part.add(row)
        if extra is not None:
            self.extras.append(extra)

    def on_predict_end(self, trainer, pl_module) -> None:
        extras: list[Any] = [self.extras]
        if trainer.world_size > 1:
            extras = [None] * trainer.world_size
            torch.distributed.all_gather_object(extras, self.extras)
        trainer.strategy.barrier("medfusion-cases-written")
        if trainer.is_global_zero:
            merge_parts(self.report_file, self.job.preamble)
            self.job.finish([e for rank_extras in extras for e in rank_extras])
        trainer.strategy.barrier("medfusion-report-merged")


def run_distributed(
    job: CaseJob,
    report_file: str | Path,
    *,
    devices: int,
    num_nodes: int = 1,
    accelerator: Accelerator = "cpu",
    strategy: Strategy = "ddp",
    show_progress: bool = False,
) -> list[ReportRow] | None:
    """Every case of ``job`` through ``Trainer.predict`` on ``devices`` per node x ``num_nodes`` (module docstring).

    Under ``torchrun`` or SLURM (one task per device) Lightning reads the ranks from the environment; otherwise
    ``strategy="ddp"`` starts the other ranks by running the same command again, ``"ddp_spawn"`` by spawning.
    Returns the rows of this job's inputs from the merged report in the process that launched rank 0 (or is it),
    None in the other ranks.
    """
    check_launch(devices, num_nodes, accelerator, strategy)
    report_file = Path(report_file)
    if not show_progress:  # --quiet: Lightning's start-up notes (devices found, tips) too
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if devices * num_nodes == 1:
        strategy = "auto"
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=show_progress,
        use_distributed_sampler=False, callbacks=[CaseWriter(job, report_file)],
    )  # fmt: skip
    loader = DataLoader(list(range(len(job.inputs))), batch_size=1, sampler=ShardSampler(len(job.inputs)),
                        collate_fn=_single)  # fmt: skip
    trainer.predict(CasePredictor(job), dataloaders=loader, return_predictions=False)
    if trainer.global_rank != 0:
        return None
    rows = {row.input: row for row in read_report(report_file)}
    keys = [r.input for r in job.preamble] + list(job.inputs)
    return [rows[k] for k in keys if k in rows]


def run_cases(
    job: CaseJob,
    report_file: str | Path,
    *,
    device: torch.device | str = "cpu",
    devices: int | None = None,
    num_nodes: int = 1,
    accelerator: Accelerator = "cpu",
    strategy: Strategy = "ddp",
    show_progress: bool = False,
) -> list[ReportRow] | None:
    """:func:`run_local` on ``device`` when ``devices`` is None, else :func:`run_distributed`."""
    if devices is None:
        check_launch(None, num_nodes, accelerator, strategy)
        return run_local(job, report_file, device, show_progress=show_progress)
    return run_distributed(
        job, report_file, devices=devices, num_nodes=num_nodes, accelerator=accelerator, strategy=strategy,
        show_progress=show_progress,
    )  # fmt: skip
