"""The built-in dataset: phantom patients scanned under several CT protocols (``medfusion make-data``).

For every patient (:mod:`medfusion.data.phantoms`), :func:`make_dataset` writes under ``DIR/<case_id>/``:

* ``phantom.nii.gz``: ground-truth HU (float32); ``label.nii.gz``: label map (uint8,
  :data:`~medfusion.data.phantoms.LABELS`);
* ``<protocol>.nii.gz``: the same anatomy scanned with each protocol (:data:`~medfusion.data.ctsim.PROTOCOLS`);
* ``standard_repeat.nii.gz``: a second standard scan with another noise seed (test-retest reference for CCC);

with a RAS+ affine from the spacing (2D data as 2D NIfTI), optionally ``DIR/dicom/<case_id>/<protocol>/`` DICOM
series with protocol headers, and one Decathlon-style manifest per task in ``DIR/manifests/`` (paths relative to
the manifest, e.g. ``../case_000/standard.nii.gz``, as MONAI's ``load_decathlon_datalist`` reads them;
``"data_root": ".."`` keeps them inside ``DIR``):
``standardize`` (each non-standard scan -> standard), ``restore`` (low dose -> standard), ``segment``
(standard scan + labels), ``register`` (pairs of patients within a split) and ``image`` (standard scans only).
Splits are by patient.

2D slices are scanned from a thin slab of the phantom so that each protocol's slice thickness averages the
anatomy along z (a thick slice blurs what the thin ground truth keeps sharp). All protocols of one patient come
from one raw acquisition, as paired kernel data do: kernels filter the same projections, thick slices combine
thin rows and lower doses are noise insertions (Yu et al., Med Phys 39, 2012;
:func:`~medfusion.data.ctsim.scan_protocols`). The repeat scan is an independent acquisition. Every file is
written atomically; a rerun with the same parameters skips what exists (resume), other parameters need
``overwrite``. The command line is :mod:`medfusion.apps.make_data`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from medfusion import keys as K
from medfusion.io.atomic import write_text_atomic

TASKS: tuple[str, ...] = ("standardize", "restore", "segment", "register", "image")
REPEAT = "standard_repeat"
RESTORE_SOURCE = "low_dose"
FORMAT_VERSION = 2  # 2: the protocols of a patient share one raw acquisition
SLAB_SPACING_MM = 1.0


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def split_cases(case_ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Shuffle cases with ``seed`` and cut them into training / validation / test by ``fractions``.

    Every split with a positive fraction gets at least one case when there are enough cases.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"split must be three non-negative fractions (train, val, test), got {fractions!r}")
    fr = np.asarray(fractions, dtype=float) / float(sum(fractions))
    n = len(case_ids)
    counts = np.floor(fr * n).astype(int)
    for i in np.argsort(-(fr * n - counts))[: n - counts.sum()]:
        counts[i] += 1
    for i in range(3):  # borrow one case from the largest split for an empty split that should exist
        if fr[i] > 0 and counts[i] == 0 and counts.max() > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    order = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for name, c in zip(("training", "validation", "test"), counts):
        out[name] = [case_ids[j] for j in sorted(order[start : start + c])]
        start += c
    return out


def _config(n_patients, dim, size, depth, protocols, seed, split) -> dict:
    from medfusion.data.ctsim import PROTOCOLS
    from medfusion.data.phantoms import LABELS

    return {
        "format_version": FORMAT_VERSION,
        "n_patients": n_patients,
        "dim": dim,
        "size": size,
        "depth": depth,
        "seed": seed,
        "split": list(split),
        "protocols": {name: asdict(PROTOCOLS[name]) for name in protocols},
        "repeat": REPEAT,
        "labels": {str(k): v for k, v in LABELS.items()},
    }


def _scan_case(
    case_index: int, *, dim: int, size: int, depth: int | None, protocols: Sequence[str], seed: int
):
    """Phantom, labels, spacing and ``{acquisition name: HU image}`` for one patient."""
    from medfusion.data import ctsim
    from medfusion.data.phantoms import default_spacing, draw_anatomy, render

    anat = draw_anatomy(_seed(seed, case_index, 0))
    acq_seed, repeat_seed = _seed(seed, case_index, 1), _seed(seed, case_index, 2)
    standard = ctsim.PROTOCOLS[ctsim.STANDARD]
    if dim == 2:
        spacing = default_spacing((size, size))
        pixel = spacing[0]
        t_max = max(
            [standard.slice_thickness_mm] + [ctsim.PROTOCOLS[n].slice_thickness_mm for n in protocols]
        )
        n_half = max(0, math.ceil(t_max / (2 * SLAB_SPACING_MM) - 0.5))
        rows = render(
            anat, (size, size, 2 * n_half + 1), (pixel, pixel, SLAB_SPACING_MM), z_center_mm=anat.slice_z_mm
        )
        hu, labels = rows.hu[..., n_half], rows.labels[..., n_half]
        scan_kw = dict(pixel_size_mm=pixel, row_mm=SLAB_SPACING_MM, slices=[n_half])
        rows_hu = rows.hu
    else:
        d = size if depth is None else depth
        spacing = default_spacing((size, size, d))
        ph = render(anat, (size, size, d), spacing)
        hu, labels = ph.hu, ph.labels
        scan_kw = dict(pixel_size_mm=spacing[0], row_mm=spacing[2])
        rows_hu = hu
    # one raw acquisition for every protocol (kernels, thickness, noise insertion for lower doses), another for
    # the repeat scan (ctsim module docstring)
    scans = ctsim.scan_protocols(rows_hu, list(protocols), seed=acq_seed, **scan_kw)
    scans[REPEAT] = ctsim.scan_protocols(rows_hu, [standard], seed=repeat_seed, **scan_kw)[ctsim.STANDARD]
    if dim == 2:
        scans = {k: v[..., 0] for k, v in scans.items()}
    return hu, labels, tuple(spacing), scans


def _write_dicom(
    out_dir: Path,
    image: np.ndarray,
    aff: np.ndarray,
    *,
    case_id: str,
    name: str,
    number: int,
    seed: int,
    overwrite: bool,
) -> None:
    """One DICOM series in the usual axial display order (rows anterior -> posterior, columns right -> left)."""
    from pydicom.uid import generate_uid

    from medfusion.data import ctsim
    from medfusion.io.dicom import write_dicom_series

    protocol = ctsim.PROTOCOLS[ctsim.STANDARD if name == REPEAT else name]
    vol = image[:, :, None] if image.ndim == 2 else image
    # Volume order for DICOM is (column, row, slice): swap the in-plane axes and the affine columns together
    vol = np.ascontiguousarray(np.swapaxes(vol, 0, 1))
    aff_dicom = aff[:, [1, 0, 2, 3]]
    meta = dict(ctsim.dicom_meta(protocol))
    meta.pop("SeriesDescription")
    description = f"{name} {protocol.kernel} {protocol.dose:g}x {protocol.slice_thickness_mm:g}mm"[:64]
    meta.update(
        PatientID=case_id,
        PatientName=case_id,
        StudyInstanceUID=generate_uid(entropy_srcs=[f"medfusion-study-{seed}-{case_id}"]),
        FrameOfReferenceUID=generate_uid(entropy_srcs=[f"medfusion-for-{seed}-{case_id}"]),
        SeriesNumber=number,
        StudyDescription="medfusion built-in phantom",
    )
    meta["ProtocolName"] = name
    write_dicom_series(
        vol,
        out_dir,
        affine=aff_dicom,
        meta=meta,
        series_description=description,
        derivation_description="medfusion make-data: procedural phantom, simulated parallel-beam CT (FBP)",
        overwrite=overwrite,
    )


def _manifests(
    root: Path, splits: dict[str, list[str]], protocols: Sequence[str], overwrite: bool
) -> dict[str, Path]:
    from medfusion.data.ctsim import STANDARD
    from medfusion.data.manifest import PATH_KEYS, load_manifest

    def f(case: str, name: str) -> str:
        return str(root / case / f"{name}.nii.gz")

    entries: dict[str, dict[str, list[dict]]] = {t: {} for t in TASKS}
    for split, cases in splits.items():
        if not cases:
            continue
        if any(p != STANDARD for p in protocols):  # a standard-only dataset has no standardize pairs
            entries["standardize"][split] = [
                {K.SOURCE: f(c, p), K.TARGET: f(c, STANDARD), K.LABEL: f(c, "label"), K.PROTOCOL: p, K.CASE_ID: c}
                for c in cases
                for p in protocols
                if p != STANDARD
            ]
        if RESTORE_SOURCE in protocols:
            entries["restore"][split] = [
                {
                    K.SOURCE: f(c, RESTORE_SOURCE),
                    K.TARGET: f(c, STANDARD),
                    K.LABEL: f(c, "label"),
                    K.PROTOCOL: RESTORE_SOURCE,
                    K.CASE_ID: c,
                }
                for c in cases
            ]
        entries["segment"][split] = [
            {K.IMAGE: f(c, STANDARD), K.LABEL: f(c, "label"), K.PROTOCOL: STANDARD, K.CASE_ID: c}
            for c in cases
        ]
        entries["image"][split] = [
            {K.IMAGE: f(c, STANDARD), K.PROTOCOL: STANDARD, K.CASE_ID: c} for c in cases
        ]
        if len(cases) >= 2:
            pairs = [
                (cases[i], cases[(i + 1) % len(cases)]) for i in range(len(cases) if len(cases) > 2 else 1)
            ]
            entries["register"][split] = [
                {
                    K.MOVING: f(a, STANDARD),
                    K.FIXED: f(b, STANDARD),
                    K.MOVING_LABEL: f(a, "label"),
                    K.FIXED_LABEL: f(b, "label"),
                    K.CASE_ID: f"{a}_to_{b}",
                }
                for a, b in pairs
            ]
    descriptions = {
        "standardize": "non-standard CT protocol (source) -> standard protocol (target), same patient",
        "restore": f"{RESTORE_SOURCE} scan (source) -> standard-dose scan (target), same patient",
        "segment": "standard-protocol CT (image) and the phantom label map (label)",
        "register": "pairs of different patients within a split: moving -> fixed, with label maps",
        "image": "standard-protocol CT only (image): unpaired training, e.g. DiffusionCT's translate mode",
    }
    out: dict[str, Path] = {}
    folder = root / "manifests"
    for task in TASKS:
        if not entries[task]:
            continue
        path = folder / f"{task}.json"
        doc: dict = {
            "name": f"medfusion-builtin-{task}",
            "task": task,
            "description": descriptions[task],
            "data_root": "..",  # paths are relative to this file (as MONAI reads them) and stay inside DIR
        }
        doc.update({f"num{s.capitalize()}": len(v) for s, v in entries[task].items()})
        for split, items in entries[task].items():
            doc[split] = [
                {
                    k: (Path(os.path.relpath(v, folder)).as_posix() if k in PATH_KEYS else v)
                    for k, v in e.items()
                }
                for e in items
            ]
        # derived from the files and the split, so always rewritten
        write_text_atomic(path, json.dumps(doc, indent=2) + "\n", overwrite=True)
        load_manifest(path, task=task)  # validate: files exist, keys, no leakage
        out[task] = path
    return out


def _check_options(
    *, n_patients: int, dim: int, size: int, depth: int | None, protocols: Sequence[str] | None
) -> list[str]:
    """Validate the dataset options; return the protocol names (default all, duplicates dropped)."""
    from medfusion.data import ctsim

    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if depth is not None and (dim != 3 or depth < 1):
        raise ValueError(f"depth applies to dim=3 only and must be >= 1, got depth={depth}, dim={dim}")
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    names = list(ctsim.PROTOCOLS) if protocols is None else list(dict.fromkeys(protocols))
    unknown = [p for p in names if p not in ctsim.PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; valid: {', '.join(ctsim.PROTOCOLS)}")
    if ctsim.STANDARD not in names:
        raise ValueError(f"protocols must include the standard protocol {ctsim.STANDARD!r}")
    return names


def _write_config(root: Path, config: dict, overwrite: bool) -> None:
    """Record the parameters in ``root/dataset.json``; a folder made with other parameters needs ``overwrite``."""
    config_path = root / "dataset.json"
    if config_path.exists() and not overwrite:
        old = json.loads(config_path.read_text())
        if old != config:
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(
                f"{root} holds a dataset made with other parameters ({', '.join(changed)}); "
                "use another folder or overwrite=True (--overwrite)"
            )
    write_text_atomic(config_path, json.dumps(config, indent=2) + "\n", overwrite=True)


def _progress_bar(enabled: bool):
    """A rich progress bar over patients (disabled: a no-op with the same interface)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("make-data"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        disable=not enabled,
        transient=False,
    )


def _write_case(
    root: Path,
    case_index: int,
    *,
    dim: int,
    size: int,
    depth: int | None,
    protocols: Sequence[str],
    dicom: bool,
    seed: int,
    overwrite: bool,
) -> bool:
    """Write one patient's NIfTI files (and DICOM series) unless all exist; return whether anything was scanned."""
    from medfusion.data.phantoms import affine
    from medfusion.io.nifti import write_nifti

    case = f"case_{case_index:03d}"
    folder = root / case
    names = [*protocols, REPEAT]
    files = [folder / "phantom.nii.gz", folder / "label.nii.gz", *(folder / f"{n}.nii.gz" for n in names)]
    dicom_dirs = [root / "dicom" / case / n for n in names] if dicom else []
    if not overwrite and all(p.exists() for p in files + dicom_dirs):
        return False
    hu, labels, spacing, scans = _scan_case(
        case_index, dim=dim, size=size, depth=depth, protocols=protocols, seed=seed
    )
    aff = affine(spacing, hu.shape)
    outputs = {"phantom": (hu, np.float32), "label": (labels, np.uint8)}
    outputs.update({n: (scans[n], np.float32) for n in names})
    for name, (array, dtype) in outputs.items():
        path = folder / f"{name}.nii.gz"
        if overwrite or not path.exists():
            write_nifti(path, array.astype(dtype), aff, overwrite=overwrite)
    for i, (name, out_dir) in enumerate(zip(names, dicom_dirs)):
        if overwrite or not out_dir.exists():
            _write_dicom(
                out_dir,
                scans[name],
                aff,
                case_id=case,
                name=name,
                number=100 + 10 * i,
                seed=seed,
                overwrite=overwrite,
            )
    return True


def make_dataset(
    output_dir: str | Path,
    *,
    n_patients: int = 24,
    dim: int = 2,
    size: int = 128,
    depth: int | None = None,
    protocols: Sequence[str] | None = None,
    dicom: bool = False,
    seed: int = 0,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the built-in dataset to ``output_dir`` and return ``{task: manifest path}``.

    Args:
        output_dir: dataset folder (created).
        n_patients: number of phantom patients (>= 3 for three splits).
        dim: 2 (one axial slice per patient, ``size x size``) or 3 (``size x size x depth`` volume).
        size: in-plane matrix (field of view 400 mm, so pixel = 400 / size mm).
        depth: slices of a 3D volume (default ``size``), covering 340 mm of torso.
        protocols: protocol names (default all of :data:`~medfusion.data.ctsim.PROTOCOLS`); must include the
            standard protocol.
        dicom: also write DICOM series under ``output_dir/dicom/<case_id>/<protocol>/``.
        seed: dataset seed (patients, noise, split).
        split: training / validation / test fractions, by patient.
        overwrite: regenerate everything; otherwise existing files are kept (resume) and the parameters must
            match those recorded in ``dataset.json``.
        progress: show a progress bar (rich).

    Raises:
        ValueError: bad options, or ``output_dir`` holds a dataset made with other parameters.
    """
    protocols = _check_options(n_patients=n_patients, dim=dim, size=size, depth=depth, protocols=protocols)
    root = Path(output_dir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    _write_config(root, _config(n_patients, dim, size, depth, protocols, seed, split), overwrite)
    case_ids = [f"case_{i:03d}" for i in range(n_patients)]
    splits = split_cases(case_ids, split, seed)
    bar = _progress_bar(progress)
    with bar:
        job = bar.add_task("", total=n_patients)
        for i, case in enumerate(case_ids):
            bar.update(job, description=case)
            _write_case(
                root,
                i,
                dim=dim,
                size=size,
                depth=depth,
                protocols=protocols,
                dicom=dicom,
                seed=seed,
                overwrite=overwrite,
            )
            bar.advance(job)
    return _manifests(root, splits, protocols, overwrite)
