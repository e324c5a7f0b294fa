"""PSNR of an exported RDDM on validation slices, sampled with its EMA weights and with its raw weights.

    .venv/bin/python bench/ema_weights_check.py restore31/rddm/model FRESH31/manifests/restore.json

The check that found the EMA without warm-up (session 12): the figures quoted (EMA 30.4 dB, raw 41.6 dB, raw input
37.6 dB on the first 6 validation slices) come from the RDDM that `SEED=31 bash bench/fresh_cohort/restore.sh` trained
with the code before the fix (commit 8843336: `git worktree add /tmp/before 8843336` and run the script from there);
a model trained after the fix gives EMA and raw weights within a fraction of a dB of each other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    import nibabel as nib

    from medfusion.models.export import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("manifest", type=Path)
    p.add_argument("--cases", type=int, default=6)
    args = p.parse_args()
    model = load_model(args.model).eval()
    entries = json.loads(args.manifest.read_text())["validation"][: args.cases]

    def load(key: str) -> torch.Tensor:
        arrays = [nib.load(args.manifest.parent / e[key]).get_fdata().astype(np.float32) for e in entries]
        return torch.from_numpy(np.clip(np.stack(arrays), -1000, 1000) / 1000)[:, None]

    x, y = load("source"), load("target")

    def psnr(a: torch.Tensor) -> float:  # [-1, 1] range: peak-to-peak 2
        return float(10 * torch.log10(4 / ((a - y) ** 2).mean()))

    print(f"raw input {psnr(x):.2f} dB")
    for ema in (True, False):
        with torch.no_grad():
            out = model.sample(x, num_steps=2, generator=torch.Generator().manual_seed(0), use_ema=ema)
        print(f"{'EMA' if ema else 'raw'} weights {psnr(out.clamp(-1, 1)):.2f} dB")


if __name__ == "__main__":
    main()
