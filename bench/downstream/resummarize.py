"""Re-summarize a `medfusion evaluate --task segment` output with the current summary rules, without retraining.

    .venv/bin/python bench/downstream/resummarize.py WORK/test_seg --output WORK/test_seg_summary

The few-shot segmentation yardstick of this session (`test_seg.sh`) ran before two reporting fixes: a class of the
reference missing from the prediction now counts as the image diagonal in HD95 (it used to be left out, which
flattered weak models), and every arm reports the size and folding of its augmenting fields. Both are recovered
exactly from what the run left: the per-class Dice and HD95 columns of ``cases.csv`` (a class is missed where its
Dice is finite and its HD95 is not), and the augmentation pools, which are seeded (the same labelled subset and the
same deformed copies are drawn again from the run's options). Dice and every trained model are unchanged; the test
split is not looked at again for any choice. Writes ``summary.json`` and ``report.md`` to ``--output``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np


def main() -> None:
    from medfusion import keys as K
    from medfusion.apps.downstream import few_shot_subset, json_safe, load_cases
    from medfusion.apps.evaluate_segment import augmentation_pool, segment_report, summarize
    from medfusion.data.manifest import load_manifest
    from medfusion.io.atomic import write_text_atomic

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the output folder of the evaluation")
    p.add_argument("--output", required=True, type=Path)
    args = p.parse_args()
    old = json.loads((args.run / "summary.json").read_text())
    header, options = old["run"], old["run"]["options"]
    with open(args.run / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    ncls, dims = int(options["num_classes"]), int(options["spatial_dims"])
    man = load_manifest(header["manifest"], task="segment")
    train = load_cases(man.split("training"), [K.IMAGE], [K.LABEL], tuple(options["hu_window"]), dims)
    first = load_cases(
        man.split(header["split"])[:1], [K.IMAGE], [K.LABEL], tuple(options["hu_window"]), dims
    )[0]
    shape = np.asarray(first.arrays[K.IMAGE].shape[1:], dtype=np.float64)
    diagonal = float(np.linalg.norm(shape * np.asarray(first.spacing)))
    out_rows = []
    for r in rows:
        row = {k: (v if k in ("augmentation", "case_id") else float(v)) for k, v in r.items()}
        dice = [row[f"dice_{c}"] for c in range(1, ncls)]
        hd = [row[f"hd95_{c}"] for c in range(1, ncls)]
        present = [math.isfinite(d) for d in dice]
        missed = [p and not math.isfinite(h) for p, h in zip(present, hd)]
        h = [diagonal if m else v for v, m, p in zip(hd, missed, present) if p]
        row["hd95"] = float(np.mean(h)) if h else float("nan")
        row["missed_classes"] = float(sum(missed))
        row["seed"], row["n_labelled"] = int(row["seed"]), int(row["n_labelled"])
        out_rows.append(row)
    runs = old["runs"]
    for key, facts in runs.items():
        fraction, seed, aug = key.split("|")
        subset = [train[i] for i in few_shot_subset(len(train), float(fraction), int(seed))]
        _, folding, size = augmentation_pool(
            subset, aug, int(options["copies"]), int(seed), dims, options["deformer"]
        )
        facts.update(folding_pct=folding, displacement_vox=size)
    summary = summarize(out_rows, runs, seed=0, n_boot=int(old["n_boot"]), num_classes=ncls)
    summary["runs"] = runs
    header = {**header, "resummarized_by": "bench/downstream/resummarize.py"}
    args.output.mkdir(parents=True, exist_ok=True)
    figures = [
        str(Path("..") / args.run.name / f) for f in ("figures/dice_vs_fraction.png", "figures/overlays.png")
    ]
    write_text_atomic(args.output / "summary.json", json.dumps(json_safe({"run": header, **summary}), indent=1),
                      overwrite=True)  # fmt: skip
    write_text_atomic(args.output / "report.md", segment_report(summary, header, figures), overwrite=True)
    print((args.output / "report.md").read_text())


if __name__ == "__main__":
    main()
