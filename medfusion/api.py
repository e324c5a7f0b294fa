"""The Python API for research scripts: read scans, standardize / restore / augment them in memory, write them back.

Every function takes and returns :class:`~medfusion.io.volume.Volume` objects (voxel array, RAS+ affine in mm,
metadata), or a path that is read first (a NIfTI file, a DICOM folder holding one series, or a DICOM file). The
command-line tools (``medfusion standardize`` / ``restore`` / ``augment`` / ``convert``) run the same code over
batches: :func:`standardize` and :func:`restore` call :func:`medfusion.apps.volume_job.restore_array`, the
per-scan core of the batch job, so a scan gives the same result here and from the command line for the same seed.

* Geometry: a 3D volume is reoriented to RAS (axis permutations and flips only, no resampling) before the model
  sees it and put back after, so outputs keep the input's voxel order, affine and metadata.
* Intensities: CT in Hounsfield units; the model's HU window is mapped to [-1, 1]; voxels outside it cannot be
  represented by the model and keep their input value.
* Randomness: ``seed`` seeds the sampler for this volume; the same seed gives the same output.

Example (the doctests of this module run in the test suite; ``model_dir`` names an exported model)::

    >>> import numpy as np
    >>> from medfusion import api
    >>> ct = api.Volume(np.full((24, 24, 3), -1000.0, np.float32), np.diag([0.7, 0.7, 2.5, 1.0]))
    >>> ct.array[6:18, 6:18] = 40.0
    >>> model = api.load_model(model_dir)  # an exported folder or a Lightning .ckpt
    >>> out = api.restore(ct, model, seed=0)
    >>> out.array.shape, bool(np.array_equal(out.affine, ct.affine))
    ((24, 24, 3), True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medfusion.io.volume import Volume

__all__ = [
    "Augmented",
    "Volume",
    "augment",
    "convert",
    "evaluate",
    "load_model",
    "read_series",
    "read_volume",
    "restore",
    "standardize",
    "write_volume",
]

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------------ reading, writing
def read_volume(path: PathLike) -> Volume:
    """Read a NIfTI file (``.nii``, ``.nii.gz``; its JSON sidecar into ``meta``), a DICOM folder holding one
    series, or one DICOM file, to a :class:`Volume`.

    ``FileNotFoundError`` for a missing path; ``ValueError`` naming the file for anything else that cannot be read.

    >>> vol = api.read_volume(ct_path)
    >>> vol.array.shape, [round(s, 3) for s in vol.spacing]  # NIfTI stores the affine in float32
    ((24, 24, 3), [0.7, 0.7, 2.5])
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no scan at {path}")
    if path.is_file() and path.name.endswith((".nii", ".nii.gz")):
        from medfusion.io.nifti import read_nifti

        return read_nifti(path)
    return read_series(path)


def read_series(series_or_files: Any) -> Volume:
    """Read one DICOM series (a :class:`~medfusion.io.dicom.DicomSeries` from
    :func:`~medfusion.io.dicom.discover_series`, a folder holding one series, a file, or a list of files) to a
    :class:`Volume` in HU with a RAS+ affine; the header facts go to ``meta``.

    >>> series = api.read_series(dicom_dir)
    >>> series.array.shape, series.meta["Modality"]
    ((24, 24, 3), 'CT')
    """
    from medfusion.io.dicom import read_series as _read

    return _read(series_or_files)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_volume(path: PathLike, volume: Volume, *, overwrite: bool = False, sidecar: bool = True) -> Path:
    """Write ``volume`` as NIfTI (``.nii`` / ``.nii.gz``, atomically; ``FileExistsError`` unless ``overwrite``) with
    its affine, and its ``meta`` as the JSON sidecar next to it (``scan.nii.gz`` -> ``scan.json``) when ``sidecar``
    and there is metadata. :func:`read_volume` reads both back.

    >>> path = api.write_volume(tmp / "scan.nii.gz", api.Volume(ct.array, ct.affine, {"KVP": 120.0}))
    >>> back = api.read_volume(path)
    >>> bool(np.array_equal(back.array, ct.array)), back.meta["KVP"]
    (True, 120.0)
    """
    from medfusion.io.atomic import write_text_atomic
    from medfusion.io.nifti import sidecar_path, write_nifti

    path = Path(path)
    write_nifti(path, volume.array, volume.affine, overwrite=overwrite)
    meta = {k: v for k, v in (volume.meta or {}).items() if k != "spacing"}  # spacing is the affine's
    if sidecar and meta:
        text = json.dumps(meta, indent=1, default=_json_default)
        write_text_atomic(sidecar_path(path), text, overwrite=True)
    return path


def _as_volume(volume_or_path: Volume | PathLike) -> Volume:
    if isinstance(volume_or_path, Volume):
        return volume_or_path
    if isinstance(volume_or_path, (str, os.PathLike)):
        return read_volume(volume_or_path)
    raise TypeError(f"expected a Volume or a path, got {type(volume_or_path).__name__}")


# ------------------------------------------------------------------------------------------------ models
def load_model(path: PathLike, device: str = "cpu") -> Any:
    """Load a medfusion model (an exported folder, ``model.safetensors`` + ``config.yaml``, or a Lightning ``.ckpt``
    read without pickle) in eval mode on ``device``. ``FileNotFoundError`` / ``ValueError`` naming the file.

    >>> model = api.load_model(model_dir)
    >>> type(model).__name__, model.spatial_dims
    ('RDDM', 2)
    """
    from medfusion.models.export import load_model as _load

    return _load(path).to(device).eval()


def _restorer(model: Any, device: str) -> Any:
    from medfusion.apps.volume_job import load_restorer
    from medfusion.models.base import Restorer

    if isinstance(model, (str, os.PathLike)):
        return load_restorer(model, device)
    if not isinstance(model, Restorer):
        raise ValueError(
            f"a {type(model).__name__} does not restore images (no Restorer contract); give a DiffusionCT "
            "(stage 2), RDDM or DiffIRStage2 model"
        )
    return model.to(device).eval()


def _run_restorer(
    volume_or_path: Volume | PathLike,
    model: Any,
    *,
    seed: int,
    roi_size: tuple[int, ...] | None,
    batch_size: int,
    hu_window: tuple[float, float] | None,
    device: str,
    options: dict[str, Any],
) -> Volume:
    """What ``medfusion standardize`` / ``restore`` do for one scan, with the same refusals: the options, the ROI
    and the HU window against the model (:func:`~medfusion.apps.volume_job.check_hu_window`), then the voxels
    (:func:`~medfusion.io.checks.check_scan`: 2D / 3D, finite, values in HU); ``ValueError`` saying what is wrong
    (and naming the file when a path was given)."""
    from medfusion.apps.volume_job import check_hu_window, check_roi_size, restore_array
    from medfusion.io.checks import check_scan

    model = _restorer(model, device)
    model.check_options(**options)
    roi = check_roi_size(roi_size, model.spatial_dims, model.divisible_by)
    check_hu_window(model, hu_window)
    vol = _as_volume(volume_or_path)
    window = hu_window if hu_window is not None else model.hu_window
    try:
        check_scan(np.asarray(vol.array), spatial_dims=model.spatial_dims, hu_window=window)
    except ValueError as err:
        if isinstance(volume_or_path, Volume):
            raise
        raise ValueError(f"{volume_or_path}: {err}") from err
    hu = restore_array(
        np.asarray(vol.array), vol.affine, model, options=options, roi_size=roi, seed=seed, hu_window=hu_window,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    meta = dict(vol.meta or {})
    meta["DerivationDescription"] = model.describe(**options)
    return Volume(hu, np.array(vol.affine, dtype=float), meta)


def standardize(
    volume_or_path: Volume | PathLike,
    model: Any,
    *,
    seed: int = 0,
    roi_size: tuple[int, ...] | None = None,
    batch_size: int = 8,
    hu_window: tuple[float, float] | None = None,
    device: str = "cpu",
    **options: Any,
) -> Volume:
    """Map a CT scan to the standard protocol with a DiffusionCT model (Selim et al., "Latent diffusion model for
    CT image standardization", AMIA 2023); the API of ``medfusion standardize``.

    Args:
        volume_or_path: a :class:`Volume` in HU, or a path (:func:`read_volume`).
        model: a loaded model (:func:`load_model`) or its path.
        seed: sampler seed for this volume.
        roi_size: 3D models: sliding-window size in voxels (``sw_batch_size`` / ``overlap`` go in ``options``).
        batch_size: 2D models: axial slices per model call.
        hu_window: ``(low, high)`` HU mapped to [-1, 1]: the model's (the default); needed only by a model without
            a window of its own, and ``ValueError`` when it differs from the model's.
        device: ``cpu``, ``cuda``, ``cuda:N``.
        options: the method's options (``model.inference_options()`` names them, e.g. ``num_steps``, ``sampler``,
            ``strength``, ``decode``, ``mean_only``); options the model cannot take raise ``ValueError``.

    Returns:
        A :class:`Volume` of the input's shape, voxel order and affine, float32 HU; ``meta`` is the input's plus
        ``DerivationDescription`` (method, sampler, steps).

    Raises:
        ValueError: for the scans the command line refuses (:func:`medfusion.io.checks.check_scan`: not 2D / 3D,
            a 2D image for a 3D model, NaN or infinite voxels, no voxel in the HU window, a constant or normalised
            image), naming the file when a path was given.

    >>> std = api.standardize(ct, api.load_model(standard_model_dir), seed=1, num_steps=2)
    >>> std.array.dtype, std.array.shape, std.meta["DerivationDescription"].split()[0]
    (dtype('float32'), (24, 24, 3), 'DiffusionCT')
    """
    return _run_restorer(
        volume_or_path, model, seed=seed, roi_size=roi_size, batch_size=batch_size, hu_window=hu_window,
        device=device, options=options,
    )  # fmt: skip


def restore(
    volume_or_path: Volume | PathLike,
    model: Any,
    *,
    seed: int = 0,
    roi_size: tuple[int, ...] | None = None,
    batch_size: int = 8,
    hu_window: tuple[float, float] | None = None,
    device: str = "cpu",
    **options: Any,
) -> Volume:
    """Restore (denoise / super-resolve) a scan with an RDDM (Liu et al., "Residual Denoising Diffusion Models",
    CVPR 2024) or DiffIR stage-2 model (Xia et al., ICCV 2023); the API of ``medfusion restore``. Arguments and
    return value as :func:`standardize` (RDDM options: ``num_steps``, ``eta``).

    >>> a = api.restore(ct, model, seed=3, eta=1.0)
    >>> b = api.restore(ct, model, seed=3, eta=1.0)
    >>> bool(np.array_equal(a.array, b.array))  # the same seed, the same output
    True
    """
    return _run_restorer(
        volume_or_path, model, seed=seed, roi_size=roi_size, batch_size=batch_size, hu_window=hu_window,
        device=device, options=options,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ augmentation
class Augmented(NamedTuple):
    """One DRDM sample: the deformed image and label (same affine as the input), the field ``ddf`` ``(D, *spatial)``
    in voxels, array-axis order, pull convention (``warped(x) = original(x + u(x))``), its level ``t_start`` and
    the fraction of folded voxels (``det J <= 0``)."""

    image: Volume
    label: Volume | None
    ddf: np.ndarray
    t_start: int
    folding: float


def augment(
    volume_or_path: Volume | PathLike,
    model: Any = None,
    *,
    label: Volume | PathLike | None = None,
    n: int = 1,
    seed: int = 0,
    t_range: tuple[int, int] = (40, 48),
    steps: int | None = None,
    label_mode: str = "nearest",
    device: str = "cpu",
) -> list[Augmented]:
    """``n`` DRDM deformations of an image and its label (Zheng et al., "Deformation-Recovery Diffusion Model",
    arXiv 2407.07295, Algorithm 2); the API of ``medfusion augment``.

    Args:
        volume_or_path: the image (:class:`Volume` or path), in its own voxel order (fields are in voxels).
        model: a DRDM model (:func:`load_model`) or its path, or None for the forward process alone (the random
            field baseline).
        label: its label map (same grid), warped with the same field (``label_mode``: ``nearest`` or ``onehot``).
        n: samples; sample ``k`` is seeded from ``(seed, 0, k)``, as case 0 of ``medfusion augment``.
        t_range: levels ``T'`` drawn per sample (inclusive); steps: recovery steps (default ``T'``).

    >>> samples = api.augment(ct, n=2, t_range=(2, 3), seed=0)
    >>> len(samples), samples[0].image.array.shape, samples[0].ddf.shape
    (2, (24, 24, 3), (3, 24, 24, 3))
    """
    from medfusion.apps.augment import case_tensors, deform, drdm_transform, sample_seed

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    net = None
    if model is not None:
        loaded = load_model(model) if isinstance(model, (str, os.PathLike)) else model
        net = getattr(loaded, "recovery_net", None)
        if net is None:
            raise ValueError(f"a {type(loaded).__name__} is not a DRDM model (no recovery_net)")
        net = net.to(device).eval()
    vol = _as_volume(volume_or_path)
    lab = None if label is None else _as_volume(label)
    data, shape = case_tensors(vol.array, None if lab is None else lab.array, net, device)
    transform = drdm_transform(net, t_range=t_range, steps=steps, label_mode=label_mode)
    out = []
    for k in range(n):
        res = deform(transform, data, shape, sample_seed(seed, 0, k))
        image = Volume(res["image"].reshape(np.shape(vol.array)), vol.affine, dict(vol.meta or {}))
        warped = None
        if lab is not None:
            warped = Volume(
                res["label"].reshape(np.shape(lab.array)).astype(np.int16), lab.affine, dict(lab.meta)
            )
        out.append(
            Augmented(
                image, warped, res["ddf"].astype(np.float32), int(res["t_start"]), float(res["folding"])
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ conversion
def convert(input_dir: PathLike, output_dir: PathLike, **options: Any) -> Any:
    """Convert every DICOM series under ``input_dir`` to ``output_dir/.../<series>.nii.gz`` + JSON sidecar;
    :func:`medfusion.io.convert.convert_tree` (``workers``, ``overwrite``, ``progress``, ``include_derived``,
    ``include_localizers``, ``merge_acquisitions``), the API of ``medfusion convert``. Returns its
    :class:`~medfusion.io.convert.ConvertReport` (``converted``, ``skipped``, ``failed``, ``exit_code``).

    >>> report = api.convert(dicom_dir, tmp / "nifti", progress=False)
    >>> [o.status for o in report.outcomes], report.exit_code
    (['converted'], 0)
    >>> api.read_volume(report.converted[0].output).array.shape
    (24, 24, 3)
    """
    from medfusion.io.convert import convert_tree

    return convert_tree(input_dir, output_dir, **options)


# ------------------------------------------------------------------------------------------------ evaluation
EVALUATION_TASKS = ("standardize", "restore", "segment", "register")


def evaluate(manifest: PathLike, output: PathLike, *, task: str, split: str = "validation", **options: Any) -> dict:
    """Score methods on one split of a manifest and write ``summary.json``, ``cases.csv``, ``report.md`` and
    ``figures/`` to ``output``; the API of ``medfusion evaluate``. Returns the summary.

    * ``task="standardize" | "restore"``: models and baselines against the standard scan
      (:func:`medfusion.apps.evaluate.evaluate`: ``models=[DIR or DIR@key=value]``, ``baselines=["identity",
      "gaussian", "linear-filter", "supervised:DIR", "noise-matched:DIR"]``, ``samples``, ``n_boot``, ``seed``, ...);
    * ``task="segment"``: few-shot segmentation with and without augmentation
      (:func:`medfusion.apps.evaluate_segment.evaluate_segment`: ``augmentations``, ``fractions``, ``seeds``,
      ``train_steps``, ...);
    * ``task="register"``: registration trained on real or synthesised pairs
      (:func:`medfusion.apps.evaluate_register.evaluate_register`: ``pairs``, ``seeds``, ``train_steps``, ...).

    Choose on ``split="validation"``; a ``split="test"`` evaluation is logged to ``output/test_log.jsonl``.

    >>> summary = api.evaluate(manifest, tmp / "eval", task="standardize", baselines=["identity"], n_boot=50)
    >>> run = summary["run"]
    >>> list(summary["methods"]), run["split"]
    (['identity'], 'validation')
    """
    if task in ("standardize", "restore"):
        from medfusion.apps.evaluate import evaluate as run

        options.setdefault("log", None)
        return run(manifest, output, task=task, split=split, **options)
    if task == "segment":
        from medfusion.apps.evaluate_segment import evaluate_segment

        options.setdefault("log", None)
        return evaluate_segment(manifest, output, split=split, **options)
    if task == "register":
        from medfusion.apps.evaluate_register import evaluate_register

        options.setdefault("log", None)
        return evaluate_register(manifest, output, split=split, **options)
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(EVALUATION_TASKS)}")
