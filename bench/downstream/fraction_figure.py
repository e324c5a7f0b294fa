"""Dice against the labelled fraction, one line per augmentation, from several `medfusion evaluate --task segment`
runs (each run may hold one fraction; e.g. test_seg.sh at 5 % and test_seg_f20.sh at 20 %).

    .venv/bin/python bench/downstream/fraction_figure.py bench/results/downstream/seg_f05/summary.json \
        bench/results/downstream/seg_f20/summary.json --output bench/results/downstream/dice_vs_fraction.png

Reads only the runs' summaries (mean Dice and its 95% patient-bootstrap interval). A (fraction, augmentation) found
in two runs is refused unless both runs give it the same numbers (a run that reproduces another's arm bit for bit,
as test_seg_drdm.sh does test_seg.sh's none and elastic arms), since two different evaluations are not one point.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from medfusion.eval.figures import interval_curves

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summaries", nargs="+", type=Path)
    p.add_argument("--output", required=True, type=Path)
    args = p.parse_args()
    series: dict[str, dict[float, tuple]] = {}
    for path in args.summaries:
        for e in json.loads(path.read_text())["results"]:
            points = series.setdefault(e["augmentation"], {})
            point = (e["fraction"], e["dice"]["mean"], *e["dice"]["ci"])
            if points.get(e["fraction"], point) != point:
                raise ValueError(f"{path}: fraction {e['fraction']} of {e['augmentation']!r} differs between runs")
            points[e["fraction"]] = point
    out = interval_curves(args.output, {k: list(v.values()) for k, v in series.items()},
                          xlabel="labelled fraction of the 60 training patients", ylabel="mean Dice (95% CI)",
                          log_x=True, overwrite=True)  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
