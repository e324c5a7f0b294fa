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
Without ``--ckpt`` the forward process alone is used (the random-field baseline). A case that cannot be read or
deformed is reported with its path and the reason and the others go on; exit status: :mod:`medfusion.exit_codes`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE, batch_exit_code

LABEL_MODES = ("nearest", "onehot")
OUTPUT_DIRS = ("images", "labels", "fields", "fields_itk")


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
    parser.epilog = EXIT_CODES_HELP
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
    """The recovery network of a DRDM model (exported folder, ``.ckpt`` or a bare ``.safetensors``), or None."""
    if ckpt is None:
        return None
    from medfusion.models.export import load_model
    from medfusion.transforms.drdm import load_recovery_net

    path = Path(ckpt)
    if path.suffix == ".safetensors" and path.is_file():
        return load_recovery_net(path).to(device)
    net = getattr(load_model(path, map_location="cpu"), "recovery_net", None)
    if net is None:
        raise ValueError(f"{ckpt} is not a DRDM model (no recovery_net)")
    return net.to(device).eval()


def _pad8(x, value):
    """Pad the trailing spatial axes of (C, *spatial) to multiples of 8 (the net's requirement)."""
    import torch.nn.functional as F

    pads = []
    for s in reversed(x.shape[1:]):
        pads += [0, (-s) % 8]
    return F.pad(x[None], pads, value=float(value))[0]


def _entries(args: argparse.Namespace) -> list[dict]:
    """The manifest entries to augment; ``ValueError`` for bad arguments (nothing is written)."""
    from medfusion.data.manifest import load_manifest

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    out = Path(args.output)
    if (out / "manifest.json").resolve() == Path(args.input).resolve() and not args.overwrite:
        raise ValueError(
            f"the output manifest {out / 'manifest.json'} is the input manifest; choose another --output "
            "(or pass --overwrite to replace it)"
        )
    entries = load_manifest(args.input, allow_outside=True).split(args.split)
    if not entries:
        raise ValueError(f"split {args.split!r} of {args.input} is empty")
    return entries


def _read_case(entry: dict, net: Any, device: str) -> tuple[Any, dict[str, Any], tuple[int, ...], bool]:
    """``(image volume, padded {"image", "label"} tensors, spatial shape, has label)`` of one manifest entry."""
    import numpy as np
    import torch

    from medfusion.io.nifti import read_nifti

    vol = read_nifti(entry["image"])
    lab = read_nifti(entry["label"]) if "label" in entry else None
    image = np.asarray(vol.array, dtype=np.float32)
    if net is not None:
        nd = net.spatial_dims
        if image.ndim > nd:
            image = image.reshape([s for s in image.shape if s != 1] or image.shape)
        if image.ndim != nd:
            raise ValueError(f"{image.ndim}D image for a {nd}D model")
    shape = image.shape
    data = {"image": _pad8(torch.from_numpy(image)[None].to(device), image.min())}
    if lab is not None:
        label = torch.from_numpy(np.asarray(lab.array).reshape(shape).astype(np.int64))
        data["label"] = _pad8(label[None].to(device), 0)
    return vol, data, shape, lab is not None


def _augment_case(
    args: argparse.Namespace, transform: Any, net: Any, entry: dict, i: int, case: str, counts: dict
) -> list[dict]:
    """Write the ``--n`` triplets of manifest entry ``i`` (skipping finished ones); returns their manifest records."""
    import numpy as np

    from medfusion.io.displacement import write_displacement_field
    from medfusion.io.nifti import write_nifti

    out = Path(args.output)
    vol, data, shape, has_label = _read_case(entry, net, args.device)
    crop = (slice(None), *[slice(0, s) for s in shape])
    needed = ["images", "fields", "fields_itk"] + (["labels"] if has_label else [])
    records = []
    for k in range(args.n):
        name = f"{case}_aug{k:03d}.nii.gz"
        paths = {sub: out / sub / name for sub in OUTPUT_DIRS}
        record = {"image": f"images/{name}", "ddf": f"fields/{name}", "ddf_itk": f"fields_itk/{name}",
                  "source_image": str(entry["image"]), "sample": k}  # fmt: skip
        if has_label:
            record["label"] = f"labels/{name}"
        records.append(record)
        counts["count"] += 1
        if not args.overwrite and all(paths[s].exists() for s in needed):
            counts["kept"] += 1
            continue
        transform.set_random_state(seed=(args.seed * 1_000_003 + i * 1009 + k) % (2**32))
        res = transform(dict(data))
        record |= {"t_start": transform.rand._t_start, "folding": res["ddf_folding"]}
        write_nifti(paths["images"], res["image"][crop][0].cpu().numpy(), vol.affine, overwrite=True)
        if has_label:
            label = res["label"][crop][0].cpu().numpy().astype(np.int16)
            write_nifti(paths["labels"], label, vol.affine, overwrite=True)
        ddf = res["ddf"][crop].cpu().numpy().astype(np.float32)
        write_nifti(paths["fields"], np.moveaxis(ddf, 0, -1), vol.affine, overwrite=True)
        write_displacement_field(paths["fields_itk"], ddf, vol.affine, overwrite=True)
        print(
            f"[{counts['count']}/{counts['total']}] {name} T'={record['t_start']} "
            f"folding={100 * record['folding']:.3f}%",
            file=sys.stderr,
        )
    return records


def run(args: argparse.Namespace) -> int:
    from medfusion.io.atomic import write_text_atomic
    from medfusion.transforms.drdm import RandDRDMDeformd

    try:
        entries = _entries(args)
        net = _load_net(args.ckpt, args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"medfusion augment: error: {err}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    out = Path(args.output)
    for sub in OUTPUT_DIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    transform = RandDRDMDeformd(
        ["image", "label"], mode=("bilinear", args.label_mode), t_range=tuple(args.t_range), recovery_net=net,
        recovery_steps=args.steps, ddf_key="ddf", allow_missing_keys=True,
    )  # fmt: skip
    records: list[dict] = []
    counts = {"count": 0, "kept": 0, "total": len(entries) * args.n}
    failed = 0
    for i, (entry, case) in enumerate(zip(entries, case_names(entries))):
        try:
            records += _augment_case(args, transform, net, entry, i, case, counts)
        except Exception as err:  # noqa: BLE001 - report the case and go on with the others
            print(f"[failed] {entry['image']}: {type(err).__name__}: {err}", file=sys.stderr)
            failed += 1
    doc = {"name": "drdm-augmented", "task": "segment", "training": records}
    write_text_atomic(out / "manifest.json", json.dumps(doc, indent=1), overwrite=True)
    print(
        f"wrote {len(records) - counts['kept']} new, kept {counts['kept']}, {failed} case(s) failed; "
        f"manifest {out / 'manifest.json'}",
        file=sys.stderr,
    )
    return batch_exit_code(len(entries) - failed, failed)
