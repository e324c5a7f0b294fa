"""A fresh brain-MR cohort for 4x super-resolution, written as NIfTI volumes with a Decathlon-style manifest.

    .venv/bin/python bench/fresh_cohort/sr_data.py --output FRESH_SR45 --patients 72 --seed 45

Each patient is :func:`medfusion.data.brain.brain_mr_phantom` (nilearn's MNI152 T1 with a seeded smooth deformation
and bias field; patient ``i`` uses phantom seed ``seed * 1000 + i``, so a new ``--seed`` is a new cohort). Nine axial
slices (every 5th, 10 mm apart) of the 96 x 112 brain field of view make one volume per patient:

* ``target``: the slices, intensities clipped to [0, 1] (the high-resolution scan);
* ``source``: each slice averaged over 4 x 4 blocks (a 4x coarser acquisition), plus Gaussian noise of SD
  ``2 * noise``, upsampled back with bilinear interpolation (the input a user would hand to a restorer);
* ``label``: 0 background, 1 CSF, 2 grey matter, 3 white matter.

The same degradation as the MR row of ``bench/restoration.py``; here as files, so that ``medfusion fit`` trains on
them (2D models sample slices of the volumes) and ``medfusion evaluate --task restore --window 0,1 --soft-window
0,1 --roi-label 3`` scores them per patient. Splits are by patient.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def degrade(hr: np.ndarray, factor: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Block-average ``hr`` (H, W) by ``factor``, add noise, upsample bilinearly (half-pixel centres) to (H, W)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(hr, dtype=np.float32))[None, None]
    lr = F.avg_pool2d(t, factor)
    lr = lr + torch.from_numpy(rng.normal(0.0, 2 * noise, lr.shape).astype(np.float32))
    return F.interpolate(lr, size=hr.shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--patients", type=int, default=72)
    ap.add_argument("--seed", type=int, required=True, help="cohort seed (phantom seeds seed * 1000 + i)")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--split", default="0.34,0.33,0.33", help="training,validation,test fractions by patient")
    args = ap.parse_args(argv)

    from nilearn import datasets

    from medfusion.data.brain import brain_mr_phantom
    from medfusion.data.builtin import split_cases
    from medfusion.data.manifest import write_manifest
    from medfusion.io.nifti import write_nifti

    out = Path(args.output)
    affine = np.array(datasets.load_mni152_template(resolution=2).affine, dtype=np.float64)
    affine[:3, 3] = affine[:3, :3] @ np.array([1.0, 2.0, 30.0]) + affine[:3, 3]  # crop origin
    affine[:3, 2] *= 5  # every 5th axial slice
    rng = np.random.default_rng(args.seed)
    cases = [f"brain_{i:03d}" for i in range(args.patients)]
    entries = {}
    for i, cid in enumerate(cases):
        ph = brain_mr_phantom(seed=args.seed * 1000 + i, noise=0.0)
        ks = range(30, 71, 5)
        hr = np.stack([np.clip(ph.hu[1:97, 2:114, k], 0.0, 1.0) for k in ks], axis=-1)
        src = np.stack([degrade(hr[..., n], args.factor, args.noise, rng) for n in range(hr.shape[-1])], axis=-1)
        lab = np.stack([ph.labels[1:97, 2:114, k] for k in ks], axis=-1).astype(np.uint8)
        d = out / cid
        d.mkdir(parents=True, exist_ok=True)
        files = {"source": d / "mr_4x.nii.gz", "target": d / "hr.nii.gz", "label": d / "label.nii.gz"}
        for key, arr in (("source", src), ("target", hr), ("label", lab)):
            if not files[key].exists():
                write_nifti(files[key], arr, affine, dtype=np.uint8 if key == "label" else np.float32)
        entries[cid] = {**{k: str(v) for k, v in files.items()}, "protocol": f"mr_{args.factor}x", "case_id": cid}
    fractions = tuple(float(f) for f in args.split.split(","))
    splits = split_cases(cases, fractions, args.seed)
    write_manifest(
        out / "manifests" / "restore.json",
        {s: [entries[c] for c in ids] for s, ids in splits.items()},
        task="restore", name="medfusion-brain-sr", data_root="..", overwrite=True,
        description=f"brain MR {args.factor}x coarser, bilinear-upsampled (source) -> high resolution (target)",
        extra={"patient_seed": args.seed, "factor": args.factor, "noise": args.noise},
    )  # fmt: skip
    print(f"wrote {out} ({args.patients} patients: {', '.join(f'{s} {len(v)}' for s, v in splits.items())})")


if __name__ == "__main__":
    main()
