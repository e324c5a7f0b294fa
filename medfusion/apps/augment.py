"""``medfusion augment``: write DRDM-deformed image / label / field triplets, or registration pairs, and a manifest.

For every entry of the input manifest (one split, default ``training``) and ``k = 0..n-1``, a DRDM
deformation (Zheng et al., arXiv 2407.07295, Algorithm 2; ``medfusion.transforms.drdm``) is generated
from the image, and the image (bilinear) and its label (nearest, or one-hot + argmax) are warped with
the same field. Outputs under ``--output`` (``<case>``: the entry's ``case_id``, else its file stem, made unique:
:func:`case_names`)::

    images/<case>_aug<k>.nii.gz   labels/<case>_aug<k>.nii.gz   fields/<case>_aug<k>.nii.gz   manifest.json
    fields_itk/<case>_aug<k>.nii.gz   (the same field in mm, LPS: an ITK/ANTs/SimpleITK displacement field)

With ``--pairs`` the same deformations are written as registration pairs (the DRDM paper's use for registration
training: an image and its deformation, the field known)::

    moving/<case>.nii.gz   moving_labels/<case>.nii.gz                  (the input image and label, float32 / int16)
    fixed/<case>_aug<k>.nii.gz   fixed_labels/<case>_aug<k>.nii.gz      (its deformations)
    fields/<case>_aug<k>.nii.gz   fields_itk/<case>_aug<k>.nii.gz       manifest.json (task ``register``)

Every file shares the input image's grid (affine). Fields (:mod:`medfusion.io.displacement`): ``fields/`` in
**voxels**, component ``d`` along array axis ``d``, pull (``fixed(x) = moving(x + u(x))``), a NIfTI vector image
``(X, Y, Z, 1, 3)`` / ``(X, Y, 1, 1, 2)``, which is the ``ddf`` a ``register`` manifest gives
:class:`medfusion.models.registration.Registration` (its supervised term); ``fields_itk/`` the same field in mm,
LPS, which SimpleITK reads as a ``DisplacementFieldTransform`` with ``Resample(moving, fixed, transform)`` = fixed.
The manifest (paths relative to it) lists every sample under ``training``: task ``segment`` with ``image``,
``label``, ``ddf``; with ``--pairs`` task ``register`` with ``moving``, ``fixed``, ``moving_label``, ``fixed_label``,
``ddf``; both with ``ddf_itk``, the source image, the sample index and (for this run's samples) the level
``t_start`` and the folding fraction.
Resumable: every file is written atomically, finished samples are skipped, and sample ``k`` of case ``i``
is seeded from ``(seed, i, k)``, so a resumed run writes what an uninterrupted one would.
Without ``--ckpt`` the forward process alone is used (the random-field baseline). A case that cannot be read or
deformed (NaN values, not 2D/3D, a label of another shape, a model of other dimensionality) is reported with its
path and the reason, nothing of it is written, and the others go on; ``augment_report.csv`` in ``--output`` has
one row per manifest case (:mod:`medfusion.io.run_report`); exit status: :mod:`medfusion.exit_codes`.
``--devices N [--num-nodes M]`` shares the cases among ranks (:mod:`medfusion.apps.predict`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

from medfusion.apps.volume_args import add_launch_arguments, launch_options, report
from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE

LABEL_MODES = ("nearest", "onehot")
#: manifest key -> sub-folder of one deformed sample, for the segment layout and the ``--pairs`` layout
SAMPLE_DIRS = {"image": "images", "label": "labels", "ddf": "fields", "ddf_itk": "fields_itk"}
PAIR_DIRS = {"fixed": "fixed", "fixed_label": "fixed_labels", "ddf": "fields", "ddf_itk": "fields_itk"}
#: manifest key -> sub-folder of the input image and label of a case (``--pairs``)
MOVING_DIRS = {"moving": "moving", "moving_label": "moving_labels"}
LABEL_OUTPUTS = ("label", "fixed_label", "moving_label")


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
    parser.add_argument(
        "--pairs",
        action="store_true",
        help="write registration pairs (moving = the input, fixed = its deformation, the field, labels) and a "
        "'register' manifest",
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute and replace existing outputs")
    add_launch_arguments(parser)


def _load_net(ckpt: str | None, device: str):
    """The recovery network of a DRDM model (exported folder, ``.ckpt`` or a bare ``.safetensors``), or None."""
    if ckpt is None:
        return None
    from medfusion.models.export import load_model
    from medfusion.transforms.drdm import load_recovery_net

    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"{ckpt}: no model at this path")
    if path.suffix == ".safetensors" and path.is_file():
        return load_recovery_net(path).to(device)
    try:
        model = load_model(path, map_location="cpu")
    except (OSError, RuntimeError, KeyError, TypeError) as err:
        raise ValueError(f"{ckpt}: cannot load a model ({type(err).__name__}: {err})") from err
    net = getattr(model, "recovery_net", None)
    if net is None:
        raise ValueError(f"{ckpt}: a {type(model).__name__} model, not DRDM (augment needs its recovery_net)")
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
    imageless = [i for i, e in enumerate(entries) if "image" not in e]
    if imageless:
        raise ValueError(
            f"{args.input}: {args.split}[{imageless[0]}] has no 'image' (augment reads a segment or image "
            f"manifest); its keys: {sorted(entries[imageless[0]])}"
        )
    return entries


def check_case(
    image: Any, label: Any, net: Any, names: tuple[str, str] = ("image", "label")
) -> tuple[Any, Any]:
    """The image (float32) and label (int64) arrays of one case, reshaped to the spatial shape augment deforms
    (singleton axes dropped where a model needs fewer); ``ValueError`` naming the file (``names``) when the image
    has NaN/Inf values, is not 2D/3D or does not fit the model's dimensionality, or the label does not match it."""
    import numpy as np

    image = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{names[0]}: the image has NaN or infinite values")
    if net is not None and image.ndim > net.spatial_dims:
        image = image.reshape([s for s in image.shape if s != 1] or image.shape)
    if image.ndim not in (2, 3):
        raise ValueError(
            f"{names[0]}: a {image.ndim}D image of shape {image.shape}; augment deforms 2D or 3D images"
        )
    if net is not None and image.ndim != net.spatial_dims:
        raise ValueError(f"{names[0]}: a {image.ndim}D image for a {net.spatial_dims}D model")
    if label is None:
        return image, None
    label = np.asarray(label)
    if [s for s in label.shape if s != 1] != [s for s in image.shape if s != 1]:
        raise ValueError(f"{names[1]}: label of shape {label.shape} for an image of shape {image.shape}")
    if not np.all(np.isfinite(label)):
        raise ValueError(f"{names[1]}: the label has NaN or infinite values")
    return image, label.reshape(image.shape).astype(np.int64)


def case_tensors(image: Any, label: Any, net: Any, device: str) -> tuple[dict[str, Any], tuple[int, ...]]:
    """``({"image", "label"} padded to multiples of 8 on ``device``, spatial shape)`` of one image (and label) array
    checked by :func:`check_case` (``ValueError`` for bad input)."""
    import torch

    image, label = check_case(image, label, net)
    shape = image.shape
    data = {"image": _pad8(torch.from_numpy(image)[None].to(device), image.min())}
    if label is not None:
        data["label"] = _pad8(torch.from_numpy(label)[None].to(device), 0)
    return data, shape


def sample_seed(seed: int, case: int, k: int) -> int:
    """Seed of sample ``k`` of case ``case`` (its index in the manifest)."""
    return (seed * 1_000_003 + case * 1009 + k) % (2**32)


def deform(transform: Any, data: dict[str, Any], shape: tuple[int, ...], seed: int) -> dict[str, Any]:
    """One seeded DRDM sample of ``data`` (:func:`case_tensors`), cropped back to ``shape``: numpy ``image``,
    ``label`` (if given), ``ddf`` ``(D, *spatial)`` in voxels, and the level ``t_start`` and ``folding`` fraction."""
    crop = (slice(None), *[slice(0, s) for s in shape])
    transform.set_random_state(seed=seed)
    res = transform(dict(data))
    out = {"image": res["image"][crop][0].cpu().numpy(), "ddf": res["ddf"][crop].cpu().numpy(),
           "t_start": transform.rand._t_start, "folding": res["ddf_folding"]}  # fmt: skip
    if "label" in data:
        out["label"] = res["label"][crop][0].cpu().numpy()
    return out


def drdm_transform(
    net: Any, *, t_range: Any = (40, 48), steps: int | None = None, label_mode: str = "nearest"
) -> Any:
    """The DRDM transform of ``augment`` (image bilinear, label ``label_mode``, field under ``ddf``)."""
    from medfusion.transforms.drdm import RandDRDMDeformd

    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {', '.join(LABEL_MODES)}; got {label_mode!r}")
    return RandDRDMDeformd(
        ["image", "label"], mode=("bilinear", label_mode), t_range=tuple(t_range), recovery_net=net,
        recovery_steps=steps, ddf_key="ddf", allow_missing_keys=True,
    )  # fmt: skip


class CaseSamples(NamedTuple):
    """What :meth:`AugmentJob.compute` hands to :meth:`AugmentJob.write`: the checked input arrays of one case
    (:func:`check_case`), its affine, and the missing samples ``[(k, deform(...))]``."""

    image: Any
    label: Any
    affine: Any
    samples: list[tuple[int, dict[str, Any]]]


class AugmentJob:
    """The cases of one ``augment`` run as a :class:`medfusion.apps.predict.CaseJob`: case ``i`` is manifest entry
    ``i``; its ``n`` samples are seeded from ``(seed, i, k)``, so any rank, and a resumed run, writes what an
    uninterrupted one-process run would. ``settings["pairs"]`` chooses the registration-pair layout."""

    def __init__(self, entries: list[dict], net: Any, settings: dict[str, Any]) -> None:
        self.entries, self.model, self.settings = entries, net, settings
        self.names = case_names(entries)
        images = [str(e["image"]) for e in entries]
        self.inputs = [im if images.count(im) == 1 else f"{im}#{n}" for im, n in zip(images, self.names)]
        self.preamble: list[Any] = []
        self._transform: Any = None

    def _paths(self, i: int, k: int) -> dict[str, Path]:
        """Manifest key -> output file of sample ``k`` of case ``i`` (with ``--pairs`` also the case's moving
        image and label); label files only where the entry has a label."""
        out = Path(self.settings["output"])
        name = f"{self.names[i]}_aug{k:03d}.nii.gz"
        dirs = PAIR_DIRS if self.settings["pairs"] else SAMPLE_DIRS
        paths = {key: out / sub / name for key, sub in dirs.items()}
        if self.settings["pairs"]:
            paths |= {key: out / sub / f"{self.names[i]}.nii.gz" for key, sub in MOVING_DIRS.items()}
        if "label" not in self.entries[i]:
            paths = {key: p for key, p in paths.items() if key not in LABEL_OUTPUTS}
        return paths

    def _finished(self, i: int, k: int) -> bool:
        return not self.settings["overwrite"] and all(p.exists() for p in self._paths(i, k).values())

    def _records(self, i: int) -> list[dict]:
        records = []
        for k in range(self.settings["n"]):
            record: dict[str, Any] = {
                key: path.relative_to(self.settings["output"]).as_posix()
                for key, path in self._paths(i, k).items()
            }
            record |= {"source_image": str(self.entries[i]["image"]), "sample": k}
            if self.settings["pairs"]:
                record["case_id"] = self.names[i]
            records.append(record)
        return records

    def output_of(self, i: int) -> str:
        sub = "fixed" if self.settings["pairs"] else "images"
        return str(Path(self.settings["output"]) / sub / f"{self.names[i]}_aug*.nii.gz")

    def done_row(self, i: int) -> Any:
        from medfusion.io.run_report import ReportRow

        if all(self._finished(i, k) for k in range(self.settings["n"])):
            return ReportRow(self.inputs[i], "already done", "outputs exist", output=self.output_of(i))
        return None

    def _transform_on(self, device: Any) -> Any:
        if self._transform is None:
            s = self.settings
            self._transform = drdm_transform(
                self.model, t_range=s["t_range"], steps=s["steps"], label_mode=s["label_mode"]
            )
        return self._transform

    def compute(self, i: int, device: Any) -> CaseSamples:
        """The missing samples of case ``i``; ``ValueError`` naming the file for bad input (nothing is written)."""
        from medfusion.io.nifti import read_nifti

        transform = self._transform_on(device)
        entry = self.entries[i]
        vol = read_nifti(entry["image"])
        label = read_nifti(entry["label"]).array if "label" in entry else None
        image, label = check_case(
            vol.array, label, self.model, (str(entry["image"]), str(entry.get("label")))
        )
        data, shape = case_tensors(image, label, self.model, str(device))
        samples = []
        for k in range(self.settings["n"]):
            if not self._finished(i, k):
                samples.append((k, deform(transform, data, shape, sample_seed(self.settings["seed"], i, k))))
        return CaseSamples(image, label, vol.affine, samples)

    def write(self, i: int, result: CaseSamples) -> tuple[Any, tuple[int, dict]]:
        import numpy as np

        from medfusion.io.displacement import write_displacement_field, write_voxel_field
        from medfusion.io.nifti import write_nifti
        from medfusion.io.run_report import ReportRow

        pairs, affine = self.settings["pairs"], result.affine
        image_key, label_key = ("fixed", "fixed_label") if pairs else ("image", "label")
        if pairs and result.samples:  # the moving image and label: the input as augment read it, same grid
            paths = self._paths(i, result.samples[0][0])
            write_nifti(paths["moving"], result.image, affine, overwrite=True)
            if "moving_label" in paths:
                write_nifti(paths["moving_label"], result.label.astype(np.int16), affine, overwrite=True)
        extra: dict[int, dict] = {}
        for k, out in result.samples:
            paths = self._paths(i, k)
            write_nifti(paths[image_key], out["image"], affine, overwrite=True)
            if label_key in paths:
                write_nifti(paths[label_key], out["label"].astype(np.int16), affine, overwrite=True)
            ddf = out["ddf"].astype(np.float32)
            write_voxel_field(paths["ddf"], ddf, affine, overwrite=True)
            write_displacement_field(paths["ddf_itk"], ddf, affine, overwrite=True)
            extra[k] = {"t_start": out["t_start"], "folding": out["folding"]}
        return ReportRow(self.inputs[i], "written", output=self.output_of(i)), (i, extra)

    def finish(self, extras: list[Any]) -> None:
        """Write ``manifest.json``: every sample on disk (this run's with its level ``t_start`` and ``folding``);
        none when no case has its samples (an empty split is no manifest)."""
        from medfusion.io.atomic import write_text_atomic

        computed = dict(extras)
        records = []
        for i in range(len(self.entries)):
            if i not in computed and not all(self._finished(i, k) for k in range(self.settings["n"])):
                continue  # failed in this run
            for k, record in enumerate(self._records(i)):
                records.append(record | computed.get(i, {}).get(k, {}))
        if not records:
            return
        name, task = ("drdm-pairs", "register") if self.settings["pairs"] else ("drdm-augmented", "segment")
        doc = {"name": name, "task": task, "training": records}
        write_text_atomic(
            Path(self.settings["output"]) / "manifest.json", json.dumps(doc, indent=1), overwrite=True
        )


def run(args: argparse.Namespace) -> int:
    from medfusion.apps.predict import run_cases
    from medfusion.io.run_report import report_path

    try:
        entries = _entries(args)
        launch = launch_options(args)
        net = _load_net(args.ckpt, "cpu" if launch else args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"medfusion augment: error: {err}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)  # the sub-folders come with their first file
    settings = {
        "output": str(out), "n": args.n, "t_range": tuple(args.t_range), "steps": args.steps,
        "label_mode": args.label_mode, "seed": args.seed, "overwrite": args.overwrite, "pairs": args.pairs,
    }  # fmt: skip
    job = AugmentJob(entries, net, settings)
    try:
        rows = run_cases(job, report_path(out, "augment"), device=args.device, show_progress=False, **launch)
    except ValueError as err:
        print(f"medfusion augment: error: {err}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    if rows is None:  # a rank other than 0: rank 0 reports for every rank
        return 0
    if (out / "manifest.json").is_file():
        print(f"manifest {out / 'manifest.json'}", file=sys.stderr)
    return report(rows, "augmented", unit="cases")
