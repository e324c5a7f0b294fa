"""Pairwise registration of the built-in 2D phantoms (different patients) with VoxelMorph through MONAI.

    OMP_NUM_THREADS=1 .venv/bin/python bench/registration.py --out /tmp/reg --results bench/results/registration.md

Arms (same network, steps, batch, seed): ``unsupervised`` (LNCC + smoothness, VoxelMorph eq. 2-4) and
``anatomy`` (plus the warped-label Dice term, eq. 5, training labels used). Test: on the test split's pairs, Dice of
the nearest-warped moving label against the fixed label (mean over labels present; ``before`` = no registration),
folding % (det J <= 0) and SDlogJ of the field (``Registration`` test loop).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ARMS = {"unsupervised": {"dice_weight": 0.0}, "anatomy": {"dice_weight": 1.0}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--results", default=None)
    p.add_argument("--patients", type=int, default=60)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--smooth", type=float, default=1.0, help="smoothness weight (VoxelMorph lambda)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lightning as L

    from medfusion.data.builtin import FORMAT_VERSION, make_dataset
    from medfusion.data.datamodule import ManifestDataModule
    from medfusion.data.manifest import load_manifest
    from medfusion.models.registration import Registration

    t_start = time.perf_counter()
    data = args.out / f"data_v{FORMAT_VERSION}_{args.size}_{args.patients}"
    manifests = make_dataset(data, n_patients=args.patients, dim=2, size=args.size, seed=0, progress=False)
    man = load_manifest(manifests["register"])
    n_pairs = {s: len(man.split(s)) for s in ("training", "validation", "test")}
    results: dict[str, list[dict]] = {}
    minutes: dict[str, float] = {}
    for arm in args.arms:
        for seed in args.seeds:
            L.seed_everything(seed, verbose=False)
            dm = ManifestDataModule(
                str(manifests["register"]), task="register", spatial_dims=2, roi_size=[args.size, args.size],
                crop_foreground=False, batch_size=args.batch, cache="memory", seed=seed,
            )  # fmt: skip
            model = Registration(spatial_dims=2, lr=args.lr, smooth_weight=args.smooth, **ARMS[arm])
            trainer = L.Trainer(
                max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                default_root_dir=str(args.out),
            )  # fmt: skip
            t0 = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            minutes[arm] = minutes.get(arm, 0.0) + (time.perf_counter() - t0) / 60
            res = {
                k.removeprefix("test/"): float(v)
                for k, v in trainer.test(model, datamodule=dm, verbose=False)[0].items()
            }
            results.setdefault(arm, []).append(res)
            print(f"{arm} seed {seed}: {res}", flush=True)

    def agg(arm: str, key: str, fmt: str = ".3f") -> str:
        v = [r.get(key, float("nan")) for r in results[arm]]
        return f"{np.mean(v):{fmt}} ± {np.std(v):{fmt}}" if len(v) > 1 else f"{v[0]:{fmt}}"

    total = (time.perf_counter() - t_start) / 60
    lines = [
        "# Pairwise registration of the built-in 2D phantoms (VoxelMorph through MONAI)",
        "",
        f"Command: `python {shlex.join(['bench/registration.py', *sys.argv[1:]])}`",
        f"Device: cpu ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}); total "
        f"wall time {total:.1f} min. Data: built-in format {FORMAT_VERSION}, {args.size}² standard-protocol slices of "
        f"{args.patients} patients; pairs of different patients within a split (register manifest): "
        f"{n_pairs['training']} training, {n_pairs['test']} test.",
        f"Training per run: Registration (VoxelMorphUNet (16, 32, 32, 32, 32, 32), 7 scaling-and-squaring steps, LNCC "
        f"window 9, smoothness {args.smooth:g}), Adam {args.lr:g}, {args.steps} steps, batch {args.batch}, seeds "
        f"{args.seeds} (mean ± SD over seeds).",
        "",
        "| arm | Dice before | Dice after | folding % | SDlogJ | train min / run |",
        "|---|---|---|---|---|---|",
    ]
    for arm in args.arms:
        lines.append(
            f"| {arm} | {agg(arm, 'dice_before')} | {agg(arm, 'dice')} | {agg(arm, 'folding_pct', '.4f')} | "
            f"{agg(arm, 'sdlogj')} | {minutes[arm] / len(args.seeds):.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "results.json").write_text(json.dumps({"results": results, "minutes": minutes}, indent=1))
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
