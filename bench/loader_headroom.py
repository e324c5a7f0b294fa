"""Data-loader headroom: samples/s of DiffusionCT's training loader on this CPU against the H200's step rate.

    OMP_NUM_THREADS=1 .venv/bin/python bench/loader_headroom.py --data /tmp/demo/data --results bench/results/loader_headroom.md

The loader is the one the demo's CUDA budget uses (``configs/demo/cuda.yaml``: the built-in ``standardize`` manifest,
2D 128² slices, foreground crop, random 96² crops, batch 32) built by
:class:`~medfusion.data.datamodule.ManifestDataModule`, with each cache mode and 0 / 2 worker processes. The demand
is stage 2's measured step rate on one H200 (``bench/results/gpu_h200.md`` section f: 5.5 steps/s at batch 32 =
176 samples/s); headroom = loader samples/s / demand. Each row: the first epoch (cache filling) and the steady rate
over ``--batches`` batches after it. Rows ``tracked`` run the random half after the cache with MONAI's metadata
tracking on (a plain ``Compose``: the loader before ``UntrackedRandomCompose``); the other rows are the DataModule as
shipped, whose random half runs on plain tensors. Both in the same run, so their ratio is the change's speed-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

H200_STEPS_PER_S = 5.5  # bench/results/gpu_h200.md, section f (stage 2, batch 32)
BATCH = 32


def rate(
    manifest: Path, cache: str, workers: int, batches: int, tracked: bool = False
) -> tuple[float, float]:
    """``(first-epoch seconds, steady samples/s)``; ``tracked``: a plain ``Compose`` (metadata tracked throughout)."""
    import medfusion.data.datamodule as dmod

    shipped = dmod.UntrackedRandomCompose
    if tracked:
        from monai.transforms import Compose

        dmod.UntrackedRandomCompose = Compose
    try:
        return _rate(manifest, cache, workers, batches)
    finally:
        dmod.UntrackedRandomCompose = shipped


def _rate(manifest: Path, cache: str, workers: int, batches: int) -> tuple[float, float]:
    from medfusion.data.datamodule import ManifestDataModule

    dm = ManifestDataModule(str(manifest), task="standardize", spatial_dims=2, roi_size=[96, 96], batch_size=BATCH,
                            crop_foreground=True, num_workers=workers, cache=cache, seed=0,
                            cache_dir=str(manifest.parent.parent / f".cache_{workers}") if cache == "disk" else None)  # fmt: skip
    t0 = time.perf_counter()
    dm.setup("fit")
    for _ in dm.train_dataloader():
        pass
    first = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while n < batches:
        for _ in dm.train_dataloader():
            n += 1
            if n >= batches:
                break
    return first, batches * BATCH / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", required=True, type=Path, help="a built-in dataset (medfusion make-data --size 128)"
    )
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--results", default=None)
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts (default 0 2)"
    )
    args = p.parse_args()
    manifest = args.data / "manifests" / "standardize.json"
    demand = H200_STEPS_PER_S * BATCH
    lines = [
        "# Data-loader headroom against the H200's stage-2 step rate", "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/loader_headroom.py --data {args.data} --batches "
        f"{args.batches} --workers {' '.join(map(str, args.workers))}`", "",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the start. Demand: {H200_STEPS_PER_S} steps/s x batch {BATCH} = {demand:.0f} "
        "samples/s (stage 2 on one H200). Loader: 2D 128² slices, foreground crop, random 96² crops.", "",
        "| cache | workers | first epoch s | steady samples/s | headroom (x demand) |", "|---|---|---|---|---|",
    ]  # fmt: skip
    rows = [(c, w, False) for c in ("none", "memory") for w in args.workers]
    rows += [("memory", w, True) for w in args.workers]
    for cache, workers, tracked in rows:
        first, sps = rate(manifest, cache, workers, args.batches, tracked=tracked)
        name = f"{cache}, tracked" if tracked else cache
        lines.append(f"| {name} | {workers} | {first:.1f} | {sps:.0f} | {sps / demand:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
