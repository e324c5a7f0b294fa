"""Apply an image-to-image model to every scan of an input (DICOM folder, NIfTI file or folder, manifest).

The one volume job behind ``medfusion standardize`` and ``medfusion restore``: :func:`restore_scans` runs any model
that implements :class:`medfusion.models.base.Restorer` (``model.restore(x, generator=..., roi_size=..., **options)``)
over ``(B, 1, *spatial)`` tensors in [-1, 1] (the HU window of training), and this module does everything around it:

* input discovery (:func:`discover_inputs`): a NIfTI file; a folder of NIfTI files; a folder holding DICOM series
  (``medfusion.io.dicom.discover_series``); a manifest JSON (Decathlon-style, ``source``/``image`` entries);
* HU -> [-1, 1] with the training window, and back; voxels outside the window cannot be represented by the model
  and keep their input value (documented pass-through, e.g. cortical bone above +1000 HU);
* every 3D volume is reoriented to RAS (``nibabel.orientations``; the training pipelines' ``Orientationd``
  default) before the model sees it and back to its own voxel order after, so a scan stored sagittally, or in
  LPS order, gets the axial slices in the orientation the model was trained on; outputs keep the input's affine;
* a 2D model gets the axial slices of a volume in batches (the RAS array's last axis, the pipelines'
  ``slice_axis=2``); a 3D model gets the whole volume, and runs its own sliding windows when given ``roi_size``
  (the model knows how its windows must share noise or sampling steps); sizes are padded to multiples of
  ``divisible_by`` with air (-1);
* output as NIfTI (same affine) or as a DICOM series derived from the input series; every output path is checked
  *before* any work (never overwrite without ``overwrite=True``) and written atomically;
* one row per scan in the run report ``<command>_report.csv`` (:mod:`medfusion.io.run_report`): a failing scan
  (unreadable file, wrong shape, any error while processing it) is reported with its path and the reason and does
  not stop the others; DICOM objects left out by discovery (localizers, derived images, non-image objects,
  unreadable files) are listed as ``skipped``;
* every scan is checked before the model sees it (:func:`medfusion.io.checks.check_scan`: 2D / 3D, finite, values
  in HU that the model's window can read), and ``--hu-window`` must be the model's own window where it has one;
* resumable batches: with ``resume=True`` a scan whose output exists is ``already done``; outputs are written
  atomically, so an existing output is complete, and a killed run leaves no partial file under a final name. Each
  output is written under a claim (:mod:`medfusion.io.claim`), which also removes the temporaries a killed
  writer left for it, and a run removes those of its run report;
* reproducible sampling: the generator handed to the model is seeded with ``seed`` for every scan, so a scan's
  output depends on the seed and the scan only, not on its place in the batch nor on the rank that runs it;
* one process, or many devices and nodes: the scans form a :class:`RestoreJob` that
  :mod:`medfusion.apps.predict` runs in this process or through Lightning's ``Trainer.predict``.

:func:`restore_array` is the per-volume core, shared with the Python API (:mod:`medfusion.api`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from medfusion.io.atomic import check_not_overwriting, remove_temporaries
from medfusion.io.claim import claim
from medfusion.models.base import Restorer

FORMATS = ("nifti", "dicom")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MANIFEST_SUFFIXES = (".json", ".csv")

BatchFn = Callable[[Tensor], Tensor]


class JobItem(NamedTuple):
    """One input scan: ``kind`` is ``nifti`` or ``dicom``; ``series`` is the discovered DICOM series object."""

    name: str
    kind: str
    path: Path
    series: Any = None


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"invalid device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def _nifti_stem(path: Path) -> str:
    for s in NIFTI_SUFFIXES:
        if path.name.endswith(s):
            return path.name[: -len(s)]
    return path.stem


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def _unique(items: list[JobItem]) -> list[JobItem]:
    seen: dict[str, int] = {}
    out = []
    for it in items:
        n = seen.get(it.name, 0)
        seen[it.name] = n + 1
        out.append(it if n == 0 else it._replace(name=f"{it.name}_{n + 1}"))
    return out


def _manifest_items(
    path: Path, key: str, split: str | None, skipped: list[tuple[str, str]], include_derived: bool
) -> list[JobItem]:
    from medfusion.data.manifest import load_manifest

    man = load_manifest(path, task=None, check_files=False, allow_outside=True)
    if split is not None:
        entries_by_split = {split: man.split(split)}
        if not entries_by_split[split]:
            raise ValueError(f"{path}: no split {split!r}; present: {', '.join(man.splits) or '(none)'}")
    else:
        entries_by_split = man.splits
    items: list[JobItem] = []
    seen: set[Path] = set()
    for entries in entries_by_split.values():
        for e in entries:
            if key not in e:
                continue
            p = Path(e[key])
            if p in seen:
                continue
            seen.add(p)
            name = "_".join(str(e[k]) for k in ("case_id", "protocol") if k in e) or _nifti_stem(p)
            if _is_nifti(p):
                items.append(JobItem(name, "nifti", p))
            elif p.is_dir():
                items.extend(_dicom_items(p, skipped, include_derived, prefix=name))
            else:
                raise ValueError(f"{path}: entry {p} is neither a NIfTI file nor a DICOM folder")
    if not items:
        raise ValueError(f"{path}: no entries with key {key!r}" + (f" in split {split!r}" if split else ""))
    return items


def _dicom_items(
    folder: Path, skipped: list[tuple[str, str]], include_derived: bool, prefix: str | None = None
) -> list[JobItem]:
    from medfusion.io.dicom import discover_series

    found = discover_series(folder, include_derived=include_derived)
    for sk in found.skipped:
        if sk.reason == "not DICOM":  # other files in the folder (sidecars, notes) are no news
            continue
        where = str(sk.paths[0]) + (f" (+{len(sk.paths) - 1} files)" if len(sk.paths) > 1 else "")
        what = f"series {sk.description!r}: " if sk.description else ""
        skipped.append((where, f"{what}{sk.reason}"))
    series = list(found.series)
    items = []
    for i, s in enumerate(series):
        desc = getattr(s, "description", None) or ""
        num = (getattr(s, "meta", None) or {}).get("SeriesNumber")
        base = prefix or folder.name
        label = "_".join(str(p) for p in (num, desc) if p not in (None, "")) or str(i + 1)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        name = base if len(series) == 1 else f"{base}_{safe}"
        items.append(JobItem(name, "dicom", folder, s))
    return items


def discover_inputs(
    path: str | Path,
    *,
    manifest_key: str = "source",
    split: str | None = None,
    include_derived: bool = False,
    skipped: list[tuple[str, str]] | None = None,
) -> list[JobItem]:
    """Scans named by ``path`` (see the module docstring). Raises ``FileNotFoundError`` / ``ValueError`` clearly.

    DICOM objects that discovery leaves out (localizers; derived images unless ``include_derived``; non-image
    objects; unreadable files) are appended to ``skipped`` as ``(path, reason)`` when a list is given.
    """
    path = Path(path)
    notes: list[tuple[str, str]] = [] if skipped is None else skipped
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        if _is_nifti(path):
            return [JobItem(_nifti_stem(path), "nifti", path)]
        if path.suffix in MANIFEST_SUFFIXES:
            return _unique(_manifest_items(path, manifest_key, split, notes, include_derived))
        raise ValueError(
            f"{path}: unsupported input file; give a NIfTI file (.nii, .nii.gz), a manifest (.json, .csv), "
            "a folder of NIfTI files or a DICOM folder"
        )
    niftis = sorted(p for p in path.rglob("*") if p.is_file() and _is_nifti(p))
    if niftis:
        return _unique([JobItem(_nifti_stem(p), "nifti", p) for p in niftis])
    n_before = len(notes)
    items = _dicom_items(path, notes, include_derived)
    if not items:
        left_out = notes[n_before:]
        detail = ""
        if left_out:
            detail = f"; left out: {'; '.join(f'{w}: {r}' for w, r in left_out[:3])}"
            detail += " ..." if len(left_out) > 3 else ""
            if any("derived" in r.lower() for _, r in left_out) and not include_derived:
                detail += " (derived series, e.g. medfusion's own DICOM output, need --include-derived)"
        raise ValueError(f"{path}: no NIfTI files and no usable DICOM series found in this folder{detail}")
    return _unique(items)


def plan_outputs(items: Sequence[JobItem], output: str | Path, fmt: str) -> list[Path]:
    """Output path per item: ``output`` itself for one scan (a ``.nii[.gz]`` file or a DICOM folder), else
    ``output/<name>.nii.gz`` or ``output/<name>/``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    output = Path(output)
    if fmt == "dicom":
        bad = [str(it.path) for it in items if it.kind != "dicom"]
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(
                f"{', '.join(bad[:3])}{more}: not DICOM; --format dicom needs DICOM input (the output series is "
                "derived from the input series)"
            )
        if len(items) == 1:
            return [output]
        return [output / it.name for it in items]
    if len(items) == 1 and _is_nifti(output):
        return [output]
    if _is_nifti(output):
        raise ValueError(
            f"{len(items)} input scans: --output must be a folder, not the file name {output.name}"
        )
    return [output / f"{it.name}.nii.gz" for it in items]


def _pad_to(x: Tensor, multiple: int, value: float) -> tuple[Tensor, list[int]]:
    sizes = list(x.shape[2:])
    pad: list[int] = []
    for s in reversed(sizes):
        extra = (-s) % multiple
        pad += [extra // 2, extra - extra // 2]
    return (torch.nn.functional.pad(x, pad, value=value) if any(pad) else x), pad


def _crop(x: Tensor, pad: list[int]) -> Tensor:
    if not any(pad):
        return x
    idx = [slice(None), slice(None)]
    n = x.ndim - 2
    for d in range(n):
        lo, hi = pad[2 * (n - 1 - d)], pad[2 * (n - 1 - d) + 1]
        idx.append(slice(lo, x.shape[2 + d] - hi))
    return x[tuple(idx)]


def apply_to_array(
    array_hu: np.ndarray,
    fn: BatchFn,
    *,
    spatial_dims: Literal[2, 3] = 2,
    hu_window: tuple[float, float] = (-1000.0, 1000.0),
    batch_size: int = 8,
    divisible_by: int = 1,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Run ``fn`` over one array in HU, ``(I, J)`` or ``(I, J, K)``; returns float32 HU of the same shape.

    2D: ``fn`` gets batches of ``batch_size`` axial slices ``(b, 1, I, J)``; 3D: the whole volume ``(1, 1, I, J, K)``.
    Sizes are padded with air (-1) to multiples of ``divisible_by`` and cropped back. ``progress(n)`` is called with
    the number of slices (2D) or volumes (3D) just finished.
    """
    from medfusion.data.pipelines import hu_to_unit, unit_to_hu

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    arr = np.asarray(array_hu, dtype=np.float32)
    if arr.ndim not in (2, 3) or (spatial_dims == 3 and arr.ndim != 3):
        raise ValueError(
            f"a {spatial_dims}D model needs a {'2D or ' if spatial_dims == 2 else ''}3D array, got shape {arr.shape}"
        )
    device = torch.device(device)
    unit = torch.from_numpy(np.asarray(hu_to_unit(arr, hu_window), dtype=np.float32))
    if spatial_dims == 2:
        slices = unit[None] if arr.ndim == 2 else unit.permute(2, 0, 1)  # (K, I, J)
        outs = []
        for start in range(0, slices.shape[0], batch_size):
            x, pad = _pad_to(slices[start : start + batch_size, None].to(device), divisible_by, -1.0)
            outs.append(_crop(fn(x), pad)[:, 0].float().cpu())
            if progress is not None:
                progress(x.shape[0])
        out = torch.cat(outs)
        out = out[0] if arr.ndim == 2 else out.permute(1, 2, 0)
    else:
        x, pad = _pad_to(unit[None, None].to(device), divisible_by, -1.0)
        out = _crop(fn(x), pad)[0, 0].float().cpu()
        if progress is not None:
            progress(1)
    hu = np.asarray(unit_to_hu(out.numpy(), hu_window), dtype=np.float32)
    outside = (arr < hu_window[0]) | (arr > hu_window[1])
    hu[outside] = arr[outside]  # the model cannot represent values outside its window: pass them through
    return hu


def to_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """``(array in RAS voxel order, function that puts an array of that order back in the input's order)``.

    Only axis permutations and flips (``nibabel.orientations.io_orientation``, as ``as_closest_canonical``): no
    resampling. 2D arrays are returned as they are.
    """
    if arr.ndim != 3:
        return arr, lambda a: a
    import nibabel.orientations as nio

    to = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    back = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(nio.aff2axcodes(affine)))
    return np.ascontiguousarray(nio.apply_orientation(arr, to)), lambda a: np.ascontiguousarray(
        nio.apply_orientation(a, back)
    )


def _read(item: JobItem) -> Any:
    if item.kind == "nifti":
        from medfusion.io.nifti import read_nifti

        return read_nifti(item.path)
    from medfusion.io.dicom import read_series

    return read_series(item.series)


def _write(
    item: JobItem, out: Path, hu: np.ndarray, affine: np.ndarray, fmt: str, job: dict[str, Any]
) -> None:
    if fmt == "nifti":
        from medfusion.io.nifti import write_nifti

        write_nifti(out, hu, affine, overwrite=job["overwrite"])
        return
    from medfusion.io.dicom import write_dicom_series

    write_dicom_series(
        hu, out, reference=item.series, series_description=job["series_description"],
        derivation_description=job["derivation_description"], overwrite=job["overwrite"],
    )  # fmt: skip


def report_inputs(items: Sequence[JobItem]) -> list[str]:
    """The run-report key of every scan, unique: a NIfTI file's path; a DICOM series' folder (the common folder of
    its files), followed by ``#<name>`` where one folder holds several series."""
    import os

    base = [
        str(it.path) if it.kind == "nifti" else os.path.commonpath([str(f) for f in it.series.files])
        for it in items
    ]
    return [b if base.count(b) == 1 else f"{b}#{it.name}" for b, it in zip(base, items)]


def report_root(items: Sequence[JobItem], output: str | Path) -> Path:
    """Where ``<command>_report.csv`` goes: ``output`` when it is a folder of outputs, its parent for one scan
    (a ``.nii.gz`` file, or a DICOM series folder that is replaced as a whole)."""
    output = Path(output)
    return output.parent if len(items) == 1 else output


# ----------------------------------------------------------------------------------------------- Restorer models
def load_restorer(path: str | Path, device: torch.device | str = "cpu") -> Restorer:
    """Load a model (exported folder or Lightning ``.ckpt``) that implements the :class:`Restorer` contract, in eval
    mode on ``device``; ``ValueError`` naming the file and what it holds for any other model."""
    from medfusion.models.export import load_model

    model = load_model(path)
    if not isinstance(model, Restorer):
        raise ValueError(
            f"{path} holds a {type(model).__name__}, which does not restore images (no Restorer contract: "
            "restore / check_options / describe); give a DiffusionCT (stage 2), RDDM or DiffIRStage2 model"
        )
    return model.to(device).eval()  # type: ignore[attr-defined,no-any-return]


def check_hu_window(model: Restorer, hu_window: Sequence[float] | None) -> None:
    """``ValueError`` unless the window the scans are read through is the model's: a model maps its training
    window to [-1, 1], so another window feeds it intensities on a scale it never saw. ``hu_window`` (``--hu-window``)
    is needed only by a model without a window of its own, and must equal the model's otherwise."""
    from medfusion.io.checks import check_window

    own = model.hu_window
    if hu_window is None:
        if own is None:
            raise ValueError(
                f"{type(model).__name__} has no HU window of its own; give one (--hu-window LOW HIGH)"
            )
        return
    given = check_window(tuple(hu_window), "--hu-window")  # type: ignore[arg-type]
    if own is not None and given != tuple(float(v) for v in own):
        raise ValueError(
            f"--hu-window {given[0]:g} {given[1]:g} differs from the window {type(model).__name__} was trained "
            f"with ({float(own[0]):g} {float(own[1]):g}); leave --hu-window out to use the model's"
        )


def check_roi_size(
    roi_size: Sequence[int] | None, spatial_dims: int, divisible_by: int
) -> tuple[int, ...] | None:
    """``roi_size`` (``--roi-size``) as a tuple, once it fits the model: 3D models only, three values, multiples of
    ``divisible_by`` (``ValueError`` otherwise)."""
    if roi_size is None:
        return None
    if spatial_dims != 3:
        raise ValueError("--roi-size applies to 3D models only (a 2D model runs slice by slice)")
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != 3 or any(r < 1 or r % divisible_by for r in roi):
        raise ValueError(f"--roi-size needs 3 values, positive multiples of {divisible_by}; got {list(roi)}")
    return roi


def restore_array(
    array_hu: np.ndarray,
    affine: np.ndarray,
    model: Restorer,
    *,
    options: dict[str, Any] | None = None,
    roi_size: tuple[int, ...] | None = None,
    seed: int = 0,
    hu_window: tuple[float, float] | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """``model.restore`` on one array in HU (``(I, J)`` or ``(I, J, K)`` in the voxel order of ``affine``): reoriented to
    RAS (:func:`to_ras`), run through :func:`apply_to_array` with a CPU generator seeded with ``seed``, put back in
    the input's voxel order. Returns float32 HU of the input's shape. ``model`` is on ``device`` in eval mode."""
    window = hu_window if hu_window is not None else model.hu_window
    if window is None:
        raise ValueError(
            f"{type(model).__name__} has no HU window of its own; give one (--hu-window LOW HIGH)"
        )
    arr, from_ras = to_ras(np.asarray(array_hu, dtype=np.float32), affine)
    generator = torch.Generator().manual_seed(int(seed))
    opts = dict(options or {})

    def fn(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model.restore(x, generator=generator, roi_size=roi_size, **opts)

    hu = apply_to_array(
        arr, fn, spatial_dims=model.spatial_dims,  # type: ignore[arg-type]
        hu_window=(float(window[0]), float(window[1])), batch_size=batch_size, divisible_by=model.divisible_by,
        device=device,
    )  # fmt: skip
    return from_ras(hu)


class RestoreJob:
    """The scans of one ``standardize`` / ``restore`` run as a :class:`medfusion.apps.predict.CaseJob`: case ``i`` is
    ``items[i]``, read, restored (:func:`restore_array`, seeded with ``seed`` for every scan, so a scan's output does
    not depend on its place in the batch or on the rank that runs it) and written to ``outputs[i]``."""

    def __init__(
        self, model: Restorer, items: list[JobItem], outputs: list[Path], *, settings: dict[str, Any],
        preamble: list[Any],
    ) -> None:  # fmt: skip
        self.model = model
        self.items, self.outputs, self.settings = items, outputs, settings
        self.inputs = report_inputs(items)
        self.preamble = preamble

    def output_of(self, i: int) -> str:
        return str(self.outputs[i])

    def done_row(self, i: int) -> Any:
        from medfusion.io.run_report import ReportRow

        if self.settings["resume"] and self.outputs[i].exists():
            with claim(self.outputs[i]) as held:
                if held:  # an earlier --overwrite run killed while replacing it may have left a temporary
                    remove_temporaries(self.outputs[i])
            return ReportRow(
                self.inputs[i], "already done", "output exists (resume)", output=self.output_of(i)
            )
        return None

    def compute(self, i: int, device: torch.device) -> tuple[Any, np.ndarray]:
        """Read case ``i``, check its voxels (:func:`medfusion.io.checks.check_scan`) and restore it."""
        from medfusion.io.checks import check_scan

        s = self.settings
        vol = _read(self.items[i])
        window = s["hu_window"] if s["hu_window"] is not None else self.model.hu_window
        check_scan(vol.array, spatial_dims=self.model.spatial_dims, hu_window=window)  # type: ignore[arg-type]
        hu = restore_array(
            np.asarray(vol.array), vol.affine, self.model, options=s["options"], roi_size=s["roi_size"],
            seed=s["seed"], hu_window=s["hu_window"], batch_size=s["batch_size"], device=device,
        )  # fmt: skip
        return vol, hu

    def write(self, i: int, result: tuple[Any, np.ndarray]) -> tuple[Any, None]:
        from medfusion.io.run_report import ReportRow

        vol, hu = result
        item, out = self.items[i], self.outputs[i]
        with claim(out) as held:  # one writer per output; a killed writer's temporaries are removed first
            if not held:
                raise RuntimeError(f"{out} is being written by another process (it holds {out.name}'s claim)")
            remove_temporaries(out)
            _write(item, out, hu, vol.affine, self.settings["fmt"], self.settings)
        uid = item.series.series_uid if item.series is not None else ""
        return ReportRow(self.inputs[i], "written", series_uid=uid, output=self.output_of(i)), None

    def finish(self, extras: list[Any]) -> None:
        return None


def plan_restore_job(
    model: Restorer,
    input_path: str | Path,
    output: str | Path,
    *,
    options: dict[str, Any] | None = None,
    roi_size: Sequence[int] | None = None,
    seed: int = 0,
    hu_window: tuple[float, float] | None = None,
    batch_size: int = 8,
    fmt: str = "nifti",
    overwrite: bool = False,
    resume: bool = False,
    include_derived: bool = False,
    manifest_key: str = "source",
    split: str | None = None,
    series_description: str = "restored (medfusion)",
) -> RestoreJob:
    """Check the options (``model.check_options``), discover the scans, plan and check the outputs: everything that
    can be refused is refused here, before any scan is read. ``FileNotFoundError`` / ``ValueError`` for bad input,
    ``FileExistsError`` if an output exists and neither ``overwrite`` nor ``resume`` is set."""
    from medfusion.io.run_report import ReportRow

    options = dict(options or {})
    model.check_options(**options)
    roi = check_roi_size(roi_size, model.spatial_dims, model.divisible_by)
    check_hu_window(model, hu_window)
    if overwrite and resume:
        raise ValueError(
            "overwrite and resume exclude each other: replace every output, or skip existing ones"
        )
    left_out: list[tuple[str, str]] = []
    items = discover_inputs(
        input_path, manifest_key=manifest_key, split=split, include_derived=include_derived, skipped=left_out
    )
    outputs = plan_outputs(items, output, fmt)
    if not resume:
        for out in outputs:
            check_not_overwriting(out, overwrite)
    settings = {
        "options": options, "roi_size": roi, "seed": seed, "hu_window": hu_window, "batch_size": batch_size,
        "fmt": fmt, "overwrite": overwrite, "resume": resume, "series_description": series_description,
        "derivation_description": model.describe(**options),
    }  # fmt: skip
    preamble = [ReportRow(w, "skipped", r) for w, r in left_out]
    return RestoreJob(model, items, outputs, settings=settings, preamble=preamble)


def restore_scans(
    model: Restorer,
    input_path: str | Path,
    output: str | Path,
    *,
    device: torch.device | str = "cpu",
    launch: dict[str, Any] | None = None,
    command: str = "restore",
    show_progress: bool = False,
    **job: Any,
) -> list[Any] | None:
    """Apply ``model.restore`` to every scan of ``input_path``, write the results under ``output`` and the run report
    ``<command>_report.csv`` in the output root (:func:`report_root`); returns this run's report rows
    (:class:`medfusion.io.run_report.ReportRow`: ``written``, ``already done``, ``skipped``, ``failed``), None on
    ranks other than 0.

    Args:
        model: a :class:`Restorer` in eval mode (:func:`load_restorer`).
        device: the device of a one-process run.
        launch: ``devices``, ``num_nodes``, ``accelerator``, ``strategy`` of
            :func:`medfusion.apps.predict.run_distributed` (None or no ``devices``: this process only).
        job: the options of :func:`plan_restore_job` (``options``, ``roi_size``, ``seed``, ``hu_window``,
            ``batch_size``, ``fmt``, ``overwrite``, ``resume``, ``include_derived``, ``manifest_key``, ``split``,
            ``series_description``).
    """
    from medfusion.apps.predict import run_cases
    from medfusion.io.run_report import report_path

    plan = plan_restore_job(model, input_path, output, **job)
    report_file = report_path(report_root(plan.items, output), command)
    remove_temporaries(report_file)  # left by a killed run while it rewrote the report
    return run_cases(plan, report_file, device=device, show_progress=show_progress, **(launch or {}))
