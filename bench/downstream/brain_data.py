"""The brain registration set (issue 19): MNI152 "patients" as a second registration yardstick.

    .venv/bin/python bench/downstream/brain_data.py --output brain2d --patients 60 --seed 5

Each patient is :func:`medfusion.data.brain.brain_mr_phantom` (nilearn's ICBM152 2009 T1 template warped by a seeded
smooth field, bias field, Rician noise; labels CSF / grey matter / white matter from the template's tissue maps),
its central axial slice resampled to 96 x 112 (about 2 mm). Written as NIfTI (image ``t1``, ``label``) with a
``register`` manifest of pairs of different patients within a split (patient i -> patient i + 1, as the built-in CT
data pair them) and a ``segment`` manifest. Intensities are ~[0, 1]: evaluate with ``--hu-window 0 1``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    from medfusion import keys as K
    from medfusion.data.brain import brain_mr_phantom
    from medfusion.data.builtin import split_cases
    from medfusion.data.manifest import write_manifest
    from medfusion.io.nifti import write_nifti

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--patients", type=int, default=60)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--split", type=float, nargs=3, default=[0.5, 0.2, 0.3])
    p.add_argument("--shape", type=int, nargs=2, default=[96, 112])
    args = p.parse_args()
    cases = [f"brain_{i:03d}" for i in range(args.patients)]
    for i, case in enumerate(cases):
        folder = args.output / case
        if (folder / "label.nii.gz").exists():
            continue
        ph = brain_mr_phantom(tuple(args.shape), seed=args.seed * 100_003 + i)
        affine = np.diag([*ph.spacing, 1.0, 1.0]) if len(ph.spacing) == 2 else np.diag([*ph.spacing, 1.0])
        folder.mkdir(parents=True, exist_ok=True)
        write_nifti(folder / "t1.nii.gz", ph.hu, affine, overwrite=True)
        write_nifti(folder / "label.nii.gz", ph.labels, affine, overwrite=True, dtype=np.uint8)
    splits = split_cases(cases, args.split, seed=args.seed)

    def f(case: str, name: str) -> str:
        return str(args.output / case / f"{name}.nii.gz")

    register, segment = {}, {}
    for split, ids in splits.items():
        register[split] = [
            {K.MOVING: f(a, "t1"), K.FIXED: f(b, "t1"), K.MOVING_LABEL: f(a, "label"), K.FIXED_LABEL: f(b, "label"),
             K.CASE_ID: f"{a}_to_{b}"}
            for a, b in zip(ids, ids[1:] + ids[:1])
        ]  # fmt: skip
        segment[split] = [{K.IMAGE: f(c, "t1"), K.LABEL: f(c, "label"), K.CASE_ID: c} for c in ids]
    folder = args.output / "manifests"
    folder.mkdir(exist_ok=True)
    for task, entries in (("register", register), ("segment", segment)):
        path = write_manifest(folder / f"{task}.json", entries, task=task, data_root="..", overwrite=True,
                              description=f"MNI152 brain phantoms (nilearn), {args.patients} patients, seed {args.seed}")  # fmt: skip
        print(task, path)


if __name__ == "__main__":
    main()
