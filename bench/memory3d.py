"""Peak CPU memory of 3D standardization with sliding windows, measured at small volumes and extrapolated to 512² x 300.

The model is the 3D DiffusionCT of ``configs/diffusion_ct/sim3d_stage1.yaml`` + ``sim3d_stage2.yaml``, untrained
(memory does not depend on the weights; ``residual_scale`` set to 1, as training's first batch would calibrate it).
Each volume size runs in a fresh process: it builds the model, creates one synthetic CT volume (counted) and
standardizes it with :func:`medfusion.api.standardize` (``roi_size`` windows, ``sw_batch_size``, ``overlap``; one
sampling step, since memory does not grow with steps), and reports the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` after the model is built) above the resident set before the volume was created. A
least-squares line ``peak = a + b * voxels`` over the sizes gives bytes per voxel (the full-volume buffers: HU array
and its copies, the blending accumulators) and the windows' fixed cost; the table extrapolates it to 512 x 512 x 300.

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory3d.py --sizes 64x64x64 128x128x64 192x192x96 --roi 64 \\
        --out bench/results/memory3d.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET = (512, 512, 300)


def _init_args(config: str) -> dict:
    import yaml

    return dict(yaml.safe_load(Path(config).read_text())["model"]["init_args"])


def _status_mib(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def one(size: tuple[int, int, int], roi: int, sw_batch_size: int, overlap: float) -> dict:
    """Build the model, standardize one volume of ``size``; the peak-RSS growth in MiB and the seconds."""
    import torch

    from medfusion import api
    from medfusion.models.diffusion_ct import DiffusionCT, DiffusionCTAutoencoder
    from medfusion.models.export import export_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(DiffusionCTAutoencoder(**_init_args("configs/diffusion_ct/sim3d_stage1.yaml")), Path(tmp) / "s1")
        args = _init_args("configs/diffusion_ct/sim3d_stage2.yaml") | {"autoencoder": str(Path(tmp) / "s1")}
        model = DiffusionCT(**args).eval()
    model.residual_scale.fill_(1.0)  # calibrated on the first training batch in real runs
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    before = _status_mib("VmRSS")
    rng = np.random.default_rng(0)
    vol = api.Volume((rng.normal(0, 50, size) - 200).astype(np.float32), np.diag([0.7, 0.7, 1.0, 1.0]))
    t0 = time.perf_counter()
    api.standardize(vol, model, roi_size=(roi,) * 3, num_steps=1, sw_batch_size=sw_batch_size, overlap=overlap)
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    return {"size": list(size), "voxels": int(np.prod(size)), "base_mib": before, "peak_mib": peak,
            "growth_mib": peak - before, "seconds": seconds}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["64x64x64", "128x128x64", "192x192x96"])
    parser.add_argument("--roi", type=int, default=64, help="sliding-window size (voxels per axis)")
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="Markdown file for the table")
    args = parser.parse_args(argv)

    def parse(text: str) -> tuple[int, int, int]:
        x, y, z = (int(v) for v in text.lower().split("x"))
        return x, y, z

    if args.one:
        print(json.dumps(one(parse(args.one), args.roi, args.sw_batch_size, args.overlap)))
        return 0
    rows = []
    for text in args.sizes:
        cmd = [sys.executable, __file__, "--one", text, "--roi", str(args.roi), "--sw-batch-size",
               str(args.sw_batch_size), "--overlap", str(args.overlap)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            raise SystemExit(f"{text}: failed\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    vox = np.array([r["voxels"] for r in rows], dtype=float)
    growth = np.array([r["growth_mib"] for r in rows])
    b, a = np.polyfit(vox, growth, 1)
    target = float(np.prod(TARGET))
    lines = [
        f"3D DiffusionCT (configs/diffusion_ct/sim3d_*.yaml, untrained), windows {args.roi}^3, sw_batch_size "
        f"{args.sw_batch_size}, overlap {args.overlap}, 1 sampling step, CPU fp32",
        "",
        "| volume | voxels | model + process MiB | peak growth MiB | seconds |",
        "|---|---:|---:|---:|---:|",
        *[f"| {'x'.join(map(str, r['size']))} | {r['voxels']} | {r['base_mib']:.0f} | {r['growth_mib']:.0f} | "
          f"{r['seconds']:.1f} |" for r in rows],  # fmt: skip
        "",
        f"fit: growth = {a:.0f} MiB + {b * 2**20:.1f} bytes/voxel x voxels",
        f"extrapolated to {'x'.join(map(str, TARGET))} ({target / 1e6:.1f} M voxels): "
        f"{a + b * target:.0f} MiB above the model ({(a + b * target) / 1024:.1f} GiB)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(
            "# Peak CPU memory of 3D standardization (sliding windows)\n\n"
            f"`{' '.join(['.venv/bin/python', 'bench/memory3d.py', *(argv or sys.argv[1:])])}`\n\n{text}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
