"""Cases per hour of ``medfusion restore`` with 1 and with 2 CPU processes, in one run, on the same cases.

A tiny RDDM (2D, a few sampling steps) is exported and ``--cases`` synthetic CT volumes are written; then

1. one process: ``medfusion restore ... --device cpu``;
2. two processes: ``torchrun --standalone --nproc-per-node 2 -m medfusion.cli restore ... --devices 2
   --accelerator cpu`` (gloo; the recipe of docs/cluster.md).

Each run is timed end to end as a user sees it (process start, imports, model load, discovery, every case, the
report), each process with ``OMP_NUM_THREADS=--threads``. The outputs of both runs are checked to be identical
(seed per case), and the report to have one row per case. The table goes to stdout and, with ``--out``, to a
Markdown file.

    OMP_NUM_THREADS=1 .venv/bin/python bench/throughput.py --cases 8 --size 128 --slices 8 --steps 4 \\
        --out bench/results/throughput.md

On a machine with fewer free cores than processes the 2-process figure measures contention, not scaling: the
table records ``os.cpu_count()`` and the load average at the start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_cases(folder: Path, n: int, size: int, slices: int) -> None:
    from medfusion.io.nifti import write_nifti

    i, j = np.mgrid[:size, :size] / size - 0.5
    body = (i / 0.42) ** 2 + (j / 0.33) ** 2 < 1
    for k in range(n):
        rng = np.random.default_rng(k)
        hu = np.where(body, 40.0, -1000.0)[:, :, None] + rng.normal(0, 20, (size, size, slices))
        write_nifti(folder / f"case{k:03d}.nii.gz", hu.astype(np.float32), np.diag([0.7, 0.7, 2.0, 1.0]))


def make_model(path: Path, steps: int) -> None:
    import torch

    from medfusion.models.export import export_model
    from medfusion.models.rddm import RDDM

    torch.manual_seed(0)
    model = RDDM(
        spatial_dims=2, ema_decay=None, num_sampling_steps=steps,
        unet={"channels": (16, 32), "attention_levels": (False, False), "num_head_channels": 8, "norm_num_groups": 8},
    )  # fmt: skip
    export_model(model, path)


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="in-plane size (voxels)")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="RDDM sampling steps")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--out", default=None, help="Markdown file for the table")
    args = parser.parse_args(argv)

    from medfusion.io.nifti import read_nifti
    from medfusion.io.run_report import read_report, report_path

    load = os.getloadavg()[0]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_cases(root / "in", args.cases, args.size, args.slices)
        make_model(root / "model", args.steps)
        common = ["restore", "--ckpt", str(root / "model"), "--input", str(root / "in"), "--eta", "1", "--quiet"]
        one = timed([sys.executable, "-m", "medfusion.cli", *common, "--output", str(root / "one"),
                     "--device", "cpu"], args.threads)  # fmt: skip
        two = timed([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "medfusion.cli", *common,
                     "--output", str(root / "two"), "--devices", "2", "--accelerator", "cpu"], args.threads)  # fmt: skip
        names = sorted(p.name for p in (root / "one").glob("*.nii.gz"))
        same = names == sorted(p.name for p in (root / "two").glob("*.nii.gz")) and all(
            np.array_equal(read_nifti(root / "one" / n).array, read_nifti(root / "two" / n).array) for n in names
        )
        rows = len(read_report(report_path(root / "two", "restore")))
    lines = [
        f"cases {args.cases} x ({args.size}x{args.size}x{args.slices}), tiny 2D RDDM ({args.steps} steps, eta 1), "
        f"{args.threads} thread(s) per process; cpu_count {os.cpu_count()}, load average {load:.1f} at start",
        "",
        "| processes | wall s | cases / hour | speed-up |",
        "|---:|---:|---:|---:|",
        f"| 1 | {one:.1f} | {3600 * args.cases / one:.0f} | 1.00 |",
        f"| 2 (torchrun, gloo) | {two:.1f} | {3600 * args.cases / two:.0f} | {one / two:.2f} |",
        "",
        f"outputs identical between 1 and 2 processes: {same}; report rows: {rows} for {args.cases} cases",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(
            "# Throughput of `medfusion restore`: 1 against 2 CPU processes\n\n"
            f"`{' '.join(['.venv/bin/python', 'bench/throughput.py', *(argv or sys.argv[1:])])}`\n\n{text}\n"
        )
    return 0 if same and rows == args.cases else 1


if __name__ == "__main__":
    raise SystemExit(main())
