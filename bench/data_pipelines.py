"""Training-loader time per cache mode (none / memory / disk), 2D and 3D: the table of
bench/results/data_pipelines.md.

    .venv/bin/python bench/data_pipelines.py [DATA_DIR]

DATA_DIR (default: a folder under the system temp dir) gets a built-in 3D dataset (8 patients, 64^2 x 32) the first
time; the disk cache lives beside it and is emptied at the start. Prints one table row per (dims, cache).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from medfusion.data.builtin import make_dataset
from medfusion.data.datamodule import ManifestDataModule


def main() -> None:
    torch.set_num_threads(2)
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir()) / "medfusion_bench" / "ds3d"
    if not (root / "manifests").exists():
        make_dataset(root, n_patients=8, dim=3, size=64, depth=32, progress=False)
    manifest = str(root / "manifests" / "standardize.json")
    cache_dir = root.parent / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    for spatial_dims, roi in ((2, [64, 64]), (3, [32, 32, 16])):
        for cache in ("none", "memory", "disk"):
            dm = ManifestDataModule(manifest, task="standardize", spatial_dims=spatial_dims, roi_size=roi,
                                    batch_size=4, num_samples=2, cache=cache, cache_dir=str(cache_dir),
                                    allow_outside=True)  # fmt: skip
            t = time.perf_counter()
            dm.setup("fit")
            t_setup = time.perf_counter() - t
            loader, times, n = dm.train_dataloader(), [], 0
            for _ in range(3):
                t = time.perf_counter()
                for b in loader:
                    n += b["source"].shape[0]
                times.append(time.perf_counter() - t)
            print(f"| {spatial_dims}D | {cache} | {len(dm._datasets['training'])} | {t_setup:.2f} | {times[0]:.2f} | "
                  f"{sum(times[1:]) / 2:.2f} | {n / sum(times):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
