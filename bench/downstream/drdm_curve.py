"""The learning curve of DRDM training runs (train_drdm.sh) as a markdown table, from Lightning's metrics.csv.

Per validation point: the recovery loss on the validation slices and the fields generated from T' = val_t_start
(their mean displacement in % of the image against the forward-process field they start from, and their folding).

    python bench/downstream/drdm_curve.py drdm_long/lightning_logs/version_0/metrics.csv \
        drdm_lr4e4/lightning_logs/version_0/metrics.csv --names "lr 1e-4" "lr 4e-4"
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

COLUMNS = ("val/loss", "val/disp_mean_pct", "val/random_disp_mean_pct", "val/folding_pct")


def validation_points(path: Path) -> list[dict[str, float]]:
    """The rows of ``metrics.csv`` that hold validation metrics, as ``{"step": ..., column: value}``."""
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    return [{"step": int(r["step"]) + 1, **{c: float(r[c]) for c in COLUMNS if r.get(c)}} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", nargs="+", type=Path, help="metrics.csv of each run")
    ap.add_argument("--names", nargs="+", help="a name per run (default: the folder above lightning_logs)")
    args = ap.parse_args()
    names = args.names or [p.parents[2].name for p in args.metrics]
    if len(names) != len(args.metrics):
        raise SystemExit("--names needs one name per metrics.csv")
    print(
        "| run | step | val loss | generated field, mean displacement % | its forward-process start, % | folding % |"
    )
    print("|---|---|---|---|---|---|")
    for name, path in zip(names, args.metrics):
        for p in validation_points(path):
            print(
                f"| {name} | {p['step']} | {p['val/loss']:.3f} | {p.get('val/disp_mean_pct', float('nan')):.2f} | "
                f"{p.get('val/random_disp_mean_pct', float('nan')):.2f} | {p.get('val/folding_pct', float('nan')):.2f} |"
            )


if __name__ == "__main__":
    main()
