"""Batch commands across ranks (:mod:`medfusion.apps.predict`): every case on exactly one rank, outputs identical to
a one-process run for a fixed seed, one merged report row per input, resume across ranks; torchrun end to end."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import medfusion.apps.predict as predict
from medfusion.apps.predict import ShardSampler, check_launch, merge_parts, part_path
from medfusion.apps.volume_job import restore_scans
from medfusion.io.nifti import read_nifti, write_nifti
from medfusion.io.run_report import ReportRow, RunReport, read_report, report_path
from medfusion.models.export import export_model

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 7])
def test_shards_cover_every_case_exactly_once_without_padding(monkeypatch, world, n):
    seen = []
    for rank in range(world):
        monkeypatch.setattr(predict, "_rank_world", lambda rank=rank: (rank, world))
        shard = list(ShardSampler(n))
        assert len(shard) == len(ShardSampler(n))
        seen += shard
    assert sorted(seen) == list(range(n))  # each once: no DistributedSampler-style duplicates


def test_part_reports_of_a_killed_run_are_merged_once(tmp_path):
    main = report_path(tmp_path, "restore")
    RunReport(main).add(ReportRow("a.nii.gz", "written", output="o/a.nii.gz", seconds=2.0))
    RunReport(part_path(main, 1)).add(
        ReportRow("b.nii.gz", "failed", reason="bad header")
    )  # left by a killed rank
    part0 = RunReport(part_path(main, 0))
    part0.add(ReportRow("a.nii.gz", "already done", output="o/a.nii.gz"))
    part0.add(ReportRow("c.nii.gz", "written", output="o/c.nii.gz"))
    merged = merge_parts(main, [ReportRow("x.dcm", "skipped", "localizer")])
    rows = {r.input: r for r in read_report(main)}
    assert sorted(rows) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "x.dcm"]
    assert rows["a.nii.gz"].status == "already done" and rows["a.nii.gz"].seconds == 2.0
    assert merged.counts()["failed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [
        "restore_report.csv"
    ]  # parts removed, nothing temporary left


def test_bad_launch_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="cpu, gpu, auto"):
        check_launch(2, accelerator="tpu")
    with pytest.raises(ValueError, match="ddp, ddp_spawn, auto"):
        check_launch(2, strategy="fsdp")
    with pytest.raises(ValueError, match="--devices must be >= 1"):
        check_launch(0)
    with pytest.raises(ValueError, match="--num-nodes needs --devices"):
        check_launch(None, num_nodes=2)


def _tiny_rddm():
    from medfusion.models.rddm import RDDM

    torch.manual_seed(0)
    return RDDM(
        spatial_dims=2, ema_decay=None, num_sampling_steps=2,
        unet={"channels": (8, 8), "attention_levels": (False, False), "num_head_channels": 8, "norm_num_groups": 4},
    ).eval()  # fmt: skip


def _inputs(folder: Path, n: int = 3) -> Path:
    for k in range(n):
        rng = np.random.default_rng(k)
        write_nifti(
            folder / f"s{k}.nii.gz", (-900 + 1800 * rng.random((20, 18, 2))).astype(np.float32), AFFINE
        )
    (folder / "broken.nii.gz").write_bytes(b"not a nifti")
    return folder


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_nifti(p).array for p in sorted(folder.glob("*.nii.gz"))}


@pytest.mark.slow
def test_two_cpu_ranks_write_what_one_process_writes(tmp_path):
    """ddp_spawn on 2 CPU ranks (gloo) against one process: identical outputs for a stochastic sampler (eta > 0, seed
    per case), one report row per input (the failing one included), and a resumed 2-rank run redoes nothing."""
    inputs = _inputs(tmp_path / "in")
    job = {"options": {"eta": 1.0}, "seed": 5}
    one = restore_scans(_tiny_rddm(), inputs, tmp_path / "one", **job)
    launch = {"devices": 2, "accelerator": "cpu", "strategy": "ddp_spawn"}
    two = restore_scans(_tiny_rddm(), inputs, tmp_path / "two", launch=launch, **job)
    assert two is not None and sorted(r.status for r in two) == sorted(r.status for r in one)
    a, b = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert sorted(a) == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"] and sorted(b) == sorted(a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    rows = read_report(report_path(tmp_path / "two", "restore"))
    assert sorted(Path(r.input).name for r in rows) == [
        "broken.nii.gz",
        "s0.nii.gz",
        "s1.nii.gz",
        "s2.nii.gz",
    ]
    assert [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".")] == []  # parts merged
    assert all(r.cpu_peak_mb is not None and r.cpu_peak_mb >= 0 for r in rows)  # measured on every rank
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("*.nii.gz")}
    again = restore_scans(_tiny_rddm(), inputs, tmp_path / "two", launch=launch, resume=True, **job)
    assert again is not None and sorted(r.status for r in again) == ["already done"] * 3 + ["failed"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("*.nii.gz")} == stamps


@pytest.mark.slow
def test_torchrun_two_cpu_processes_from_the_command_line(tmp_path):
    """The docs/cluster.md recipe: ``torchrun --nproc-per-node 2 -m medfusion.cli restore ... --devices 2``."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    export_model(_tiny_rddm(), tmp_path / "rddm")
    inputs = _inputs(tmp_path / "in")
    common = ["restore", "--ckpt", str(tmp_path / "rddm"), "--input", str(inputs), "--eta", "1", "--seed", "3",
              "--quiet"]  # fmt: skip
    from medfusion.cli import main

    assert main([*common, "--output", str(tmp_path / "one"), "--device", "cpu"]) == 1  # one input fails
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "medfusion.cli", *common,
           "--output", str(tmp_path / "two"), "--devices", "2", "--accelerator", "cpu"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode != 0  # torchrun: a rank exited 1 (one input failed)
    assert "3/4 scans restored (1 failed)" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    a, b = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert sorted(b) == sorted(a) == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert len(read_report(report_path(tmp_path / "two", "restore"))) == 4


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


class _AllocatingJob:
    """Case ``i`` holds ``sizes[i]`` MiB of fresh (touched) memory while it computes."""

    model = None
    preamble: list = []

    def __init__(self, sizes):
        self.sizes = sizes
        self.inputs = [f"case{i}" for i in range(len(sizes))]

    def done_row(self, i):
        return None

    def output_of(self, i):
        return ""

    def compute(self, i, device):
        block = np.ones(self.sizes[i] * 2**20 // 8)  # np.ones touches every page: resident
        return float(block[-1])

    def write(self, i, result):
        return ReportRow(self.inputs[i], "written"), None

    def finish(self, extras):
        return None


def test_report_rows_carry_each_cases_peak_memory(tmp_path):
    """cpu_peak_mb is the case's own peak: a 96 MiB case after a 160 MiB one still reports about 96 MiB (the peak is
    reset per case where Linux allows it), a 0 MiB case about 0; gpu_peak_mb is empty on CPU."""
    if not predict._reset_peak_rss():
        pytest.skip(
            "peak RSS cannot be reset here (/proc/self/clear_refs): ru_maxrss gives a lower bound only"
        )
    rows = predict.run_local(_AllocatingJob([160, 96, 0]), report_path(tmp_path, "restore"))
    peaks = [r.cpu_peak_mb for r in rows]
    assert 150 <= peaks[0] <= 200 and 88 <= peaks[1] <= 130 and peaks[2] < 16, peaks
    assert all(r.gpu_peak_mb is None for r in rows)
    on_disk = {r.input: r.cpu_peak_mb for r in read_report(report_path(tmp_path, "restore"))}
    assert on_disk == {r.input: r.cpu_peak_mb for r in rows}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_peak_is_the_cases_max_memory_allocated():
    row = ReportRow("a", "written")
    resident = torch.cuda.memory_allocated() / 2**20
    memory = predict.CaseMemory("cuda")
    block = torch.ones(64 * 2**20 // 4, device="cuda")  # 64 MiB
    del block
    memory.stop(row)
    assert 64 <= row.gpu_peak_mb - resident < 80
