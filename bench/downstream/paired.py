"""Paired difference of one metric between two arms of a downstream evaluation, from its ``cases.csv``.

    .venv/bin/python bench/downstream/paired.py WORK/test_reg/cases.csv --column arm --a drdm-random --b bspline

Several ``cases.csv`` of one cohort and settings (arms run as separate jobs) are read as one table.

Also for `medfusion evaluate --task standardize|restore` (``--column method --metric psnr_body``). Rows of the two
arms are paired by seed and case (evaluations: case, protocol and sampling seed); the interval is the same 95% patient bootstrap as the tool's
(:func:`medfusion.eval.stats.cluster_mean`, 2000 replicates, seed 0).
"""

from __future__ import annotations

import argparse
import csv


def main() -> None:
    from medfusion.eval.stats import cluster_mean, resample_counts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="+")
    p.add_argument(
        "--column", default="augmentation",
        help="the arm column (segment: augmentation; register: arm; standardize / restore: method)",
    )  # fmt: skip
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    p.add_argument("--metric", default="dice")
    p.add_argument("--n-boot", type=int, default=2000)
    args = p.parse_args()
    rows = []
    for path in args.cases:
        with open(path) as f:
            rows += list(csv.DictReader(f))
    # downstream rows pair by (fraction, seed, case); `medfusion evaluate --task standardize|restore` rows by
    # (case, protocol, sampling seed)
    key = lambda r: (r.get("fraction"), r.get("seed"), r["case_id"], r.get("protocol"), r.get("sample"))  # noqa: E731
    b = {key(r): float(r[args.metric]) for r in rows if r[args.column] == args.b}
    pairs = [
        (r["case_id"], float(r[args.metric]) - b[key(r)])
        for r in rows
        if r[args.column] == args.a and key(r) in b
    ]
    patients = sorted({c for c, _ in pairs})
    idx = {c: i for i, c in enumerate(patients)}
    e = cluster_mean(
        [d for _, d in pairs], [idx[c] for c, _ in pairs], resample_counts(len(patients), args.n_boot, 0)
    )
    print(f"{args.metric} {args.a} - {args.b}: {e.mean:+.4f} [{e.low:+.4f}, {e.high:+.4f}] ({e.n} pairs of rows, "
          f"{e.n_patients} cases)")  # fmt: skip


if __name__ == "__main__":
    main()
