"""Segmentation evaluations side by side: one markdown row per (run, augmentation) from each run's summary.json.

python bench/downstream/val_table.py val_elastic val_none_random val_long1200_t40 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(run: Path) -> list[str]:
    s = json.loads((run / "summary.json").read_text())
    d = s["run"]["options"]["deformer"]
    out = []
    for e in s["results"]:
        aug = e["augmentation"]
        drdm = aug.startswith("drdm")
        t_range = "{}-{}".format(*d["drdm_t_range"]) if drdm else "-"
        steps = str(d["drdm_steps"]) if aug.startswith("drdm:") else "-"
        dice = e["dice"]
        out.append(
            f"| {run.name} | {aug} | {t_range} | {steps} | {dice['mean']:.3f} [{dice['ci'][0]:.3f}, {dice['ci'][1]:.3f}] "
            f"| {e['dice_seed_sd']:.3f} | {e.get('displacement_vox') or 0:.2f} | {e.get('folding_pct') or 0:.3f} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="output folders of medfusion evaluate --task segment")
    args = ap.parse_args()
    print(
        "| run | augmentation | T' | recovery steps | Dice [95% CI] | seed SD | field mean displacement, vox | folding % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        print("\n".join(rows(run)))


if __name__ == "__main__":
    main()
