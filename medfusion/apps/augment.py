"""``medfusion augment``: write DRDM-deformed image / label / field triplets and a manifest.

For every entry of the input manifest (one split, default ``training``) and ``k = 0..n-1``, a DRDM
deformation (Zheng et al., arXiv 2407.07295, Algorithm 2; ``medfusion.transforms.drdm``) is generated
from the image, and the image (bilinear) and its label (nearest, or one-hot + argmax) are warped with
the same field. Outputs under ``--output``::

    images/<case>_aug<k>.nii.gz   labels/<case>_aug<k>.nii.gz   fields/<case>_aug<k>.nii.gz   manifest.json

(``<case>``: the entry's ``case_id``, else its file stem, made unique: :func:`case_names`)
    fields_itk/<case>_aug<k>.nii.gz   (the same field in mm, LPS: an ITK/ANTs/SimpleITK displacement field)

Fields are stored as ``(*spatial, D)`` float32 NIfTI in **voxels**, component ``d`` along array axis ``d``,
pull convention (``warped(x) = original(x + u(x))``), with the image's affine. The manifest (task
``segment``, paths relative to it) lists every triplet under ``training`` with its source image and level.
Resumable: every file is written atomically, finished triplets are skipped, and sample ``k`` of case ``i``
is seeded from ``(seed, i, k)``, so a resumed run writes what an uninterrupted one would.
Without ``--ckpt`` the forward process alone is used (the random-field baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LABEL_MODES = ("nearest", "onehot")


def case_names(entries: list[dict]) -> list[str]:
    """One output name per manifest entry, unique: its ``case_id``, else the image's file stem; where stems repeat
    (the built-in data: ``case_*/standard.nii.gz``) the parent folder is prefixed, then an index if still needed.
    Names depend only on the manifest, so a resumed run finds its own files."""

    def stem(e: dict) -> str:
        return Path(e["image"]).name.split(".")[0]

    base = [str(e["case_id"]) if e.get("case_id") else stem(e) for e in entries]
    if len(set(base)) < len(base):
        base = [
            b if e.get("case_id") else f"{Path(e['image']).parent.name}_{b}" for b, e in zip(base, entries)
        ]
    seen: dict[str, int] = {}
    out = []
    for b in base:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in b)
        seen[safe] = seen.get(safe, 0) + 1
        out.append(safe if seen[safe] == 1 else f"{safe}_{seen[safe]}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt",
        default=None,
        help="exported model folder, Lightning .ckpt, or recovery-net .safetensors; omit for the forward-process baseline",
    )
    parser.add_argument("--input", required=True, help="manifest (.json/.csv) with image (and label) entries")
    parser.add_argument("--n", type=int, required=True, help="deformed samples per image")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--split", default="training", help="manifest split to augment (default: training)")
    parser.add_argument(
        "--t-range",
        type=int,
        nargs=2,
        default=(40, 48),
        metavar=("LOW", "HIGH"),
        help="levels T' drawn per sample (inclusive)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="recovery steps (default: T', the paper's Algorithm 2)"
    )
    parser.add_argument("--label-mode", choices=LABEL_MODES, default="nearest", help="label warping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--overwrite", action="store_true", help="recompute and replace existing outputs")


def _load_net(ckpt: str | None, device: str):
    if ckpt is None:
        return None
    from medfusion.transforms.drdm import load_recovery_net

    path = Path(ckpt)
    if path.suffix == ".safetensors" and path.is_file():
        return load_recovery_net(path).to(device)
    try:
        from medfusion.models.export import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        model = load_model(path, map_location="cpu")
        net = getattr(model, "recovery_net", None)
        if net is None:
            raise ValueError(f"{ckpt} is not a DRDM model (no recovery_net)")
        return net.to(device).eval()
    return load_recovery_net(path).to(device)


def _pad8(x, value):
    """Pad the trailing spatial axes of (C, *spatial) to multiples of 8 (the net's requirement)."""
    import torch.nn.functional as F

    pads = []
    for s in reversed(x.shape[1:]):
        pads += [0, (-s) % 8]
    return F.pad(x[None], pads, value=float(value))[0]


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from medfusion.data.manifest import load_manifest
    from medfusion.io.atomic import write_text_atomic
    from medfusion.io.displacement import write_displacement_field
    from medfusion.io.nifti import read_nifti, write_nifti
    from medfusion.transforms.drdm import RandDRDMDeformd

    if args.n < 1:
        print("medfusion augment: --n must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.output)
    if (out / "manifest.json").resolve() == Path(args.input).resolve() and not args.overwrite:
        print(
            f"medfusion augment: the output manifest {out / 'manifest.json'} is the input manifest; choose another "
            "--output (or pass --overwrite to replace it)",
            file=sys.stderr,
        )
        return 2
    manifest = load_manifest(args.input, allow_outside=True)
    entries = manifest.split(args.split)
    if not entries:
        print(f"medfusion augment: split {args.split!r} of {args.input} is empty", file=sys.stderr)
        return 2
    net = _load_net(args.ckpt, args.device)
    for sub in ("images", "labels", "fields", "fields_itk"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    keys = ["image", "label"]
    transform = RandDRDMDeformd(
        keys,
        mode=("bilinear", args.label_mode),
        t_range=tuple(args.t_range),
        recovery_net=net,
        recovery_steps=args.steps,
        ddf_key="ddf",
        allow_missing_keys=True,
    )
    records, total, done_before, failed = [], len(entries) * args.n, 0, 0
    count = 0
    names = case_names(entries)
    for i, entry in enumerate(entries):
        case = names[i]
        try:
            vol = read_nifti(entry["image"])
            lab = read_nifti(entry["label"]) if "label" in entry else None
        except Exception as err:  # noqa: BLE001 - report and continue with the other cases
            print(f"[skip] {entry['image']}: {err}", file=sys.stderr)
            failed += 1
            continue
        nd = net.spatial_dims if net is not None else None
        image = np.asarray(vol.array, dtype=np.float32)
        if nd is not None:
            image = (
                image.reshape([s for s in image.shape if s != 1] or image.shape) if image.ndim > nd else image
            )
            if image.ndim != nd:
                print(f"[skip] {entry['image']}: {image.ndim}D image for a {nd}D model", file=sys.stderr)
                failed += 1
                continue
        shape = image.shape
        img_t = _pad8(torch.from_numpy(image)[None].to(args.device), image.min())
        data = {"image": img_t}
        if lab is not None:
            data["label"] = _pad8(
                torch.from_numpy(np.asarray(lab.array).reshape(shape).astype(np.int64))[None].to(args.device),
                0,
            )
        crop = (slice(None), *[slice(0, s) for s in shape])
        for k in range(args.n):
            count += 1
            name = f"{case}_aug{k:03d}.nii.gz"
            paths = {sub: out / sub / name for sub in ("images", "labels", "fields", "fields_itk")}
            needed = ["images", "fields", "fields_itk"] + (["labels"] if lab is not None else [])
            record = {
                "image": f"images/{name}",
                "ddf": f"fields/{name}",
                "ddf_itk": f"fields_itk/{name}",
                "source_image": str(entry["image"]),
                "sample": k,
            }
            if lab is not None:
                record["label"] = f"labels/{name}"
            if not args.overwrite and all(paths[s].exists() for s in needed):
                done_before += 1
                records.append(record)
                continue
            transform.set_random_state(seed=(args.seed * 1_000_003 + i * 1009 + k) % (2**32))
            res = transform(dict(data))
            ddf = res["ddf"][crop]
            record |= {"t_start": transform.rand._t_start, "folding": res["ddf_folding"]}
            write_nifti(paths["images"], res["image"][crop][0].cpu().numpy(), vol.affine, overwrite=True)
            if lab is not None:
                write_nifti(
                    paths["labels"],
                    res["label"][crop][0].cpu().numpy().astype(np.int16),
                    vol.affine,
                    overwrite=True,
                )
            field = np.moveaxis(ddf.cpu().numpy().astype(np.float32), 0, -1)
            write_nifti(paths["fields"], field, vol.affine, overwrite=True)
            write_displacement_field(paths["fields_itk"], ddf.cpu().numpy(), vol.affine, overwrite=True)
            records.append(record)
            print(
                f"[{count}/{total}] {name} T'={record['t_start']} folding={100 * record['folding']:.3f}%",
                file=sys.stderr,
            )
    doc = {"name": "drdm-augmented", "task": "segment", "training": records}
    write_text_atomic(out / "manifest.json", json.dumps(doc, indent=1), overwrite=True)
    print(
        f"wrote {len(records) - done_before} new, kept {done_before}, {failed} case(s) failed; manifest {out / 'manifest.json'}",
        file=sys.stderr,
    )
    return 1 if failed and not records else (3 if failed else 0)
