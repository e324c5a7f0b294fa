"""The engine of the downstream evaluations (``medfusion evaluate --task segment|register``): cases in memory, a
fixed training budget that gives the same model on 1 or N ranks, and per-case scoring split exactly across ranks.

* :func:`load_cases`: the entries of one manifest split read into memory (images HU-windowed to [-1, 1], labels as
  integers), in the manifest's voxel order; one record per case with its patient id and voxel spacing (mm).
* :class:`StreamSampler` / :class:`StreamDataset`: the training stream. Global position ``g`` of the stream is the
  pair ``(case index, draw seed)`` drawn from one generator seeded by the run's seed; step ``s`` takes global
  positions ``s*B .. s*B + B - 1`` and rank ``r`` of ``W`` takes those with ``g % W == r`` (per-rank batch ``B / W``).
  Under DDP the averaged gradient of the ``W`` rank batches is the gradient of the global batch, so 1 rank and
  ``W`` ranks train the same model up to floating-point summation order (DDP: Li et al., VLDB 2020). Lightning's
  ``DistributedSampler`` would instead shuffle with a different permutation per world size, and pad.
* :func:`fit`: ``Trainer.fit`` of a module on a stream (``use_distributed_sampler=False``, no validation loop: a
  fixed step budget, the protocol of a fair augmentation comparison).
* :func:`score_cases`: ``fn(i) -> rows`` for every case, rank ``r`` taking cases ``r, r + W, ...`` (each case once,
  no padding), rows gathered to every rank with ``all_gather_object``; in one process, every case here.
* :func:`is_writer`: whether this process writes the outputs (global rank 0).
* :func:`label_scores`: Dice and HD95 of one label map, the one definition both tasks score with.
* :func:`prepare` / :func:`write_outputs`: read the manifest's cases before any training (refusing to overwrite
  earlier outputs), and write ``cases.csv``, ``summary.json``, ``report.md`` atomically (plus the test-log line).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class Case(NamedTuple):
    """One manifest entry in memory: ``arrays`` maps each key to a ``(1, *spatial)`` float tensor (images in
    [-1, 1]; labels as integer values), ``patient`` the case id, ``spacing`` the voxel size in mm, ``affine`` the
    first volume's voxel -> RAS+ world matrix (for figures in radiological view)."""

    arrays: dict[str, torch.Tensor]
    patient: str
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None


def load_cases(
    entries: Sequence[Mapping[str, Any]],
    image_keys: Sequence[str],
    label_keys: Sequence[str],
    hu_window: tuple[float, float],
    spatial_dims: int,
) -> list[Case]:
    """Read every entry's image and label files (NIfTI).

    Images are clipped to ``hu_window`` and scaled to [-1, 1] (:func:`medfusion.data.pipelines.hu_to_unit`). A 2D
    evaluation takes volumes of one slice (``(X, Y, 1)``) as 2D. Raises ``ValueError`` naming the file for a volume
    of the wrong dimension, non-finite values, or a label that is not integer-valued.
    """
    from medfusion.data.pipelines import hu_to_unit
    from medfusion.io.nifti import read_nifti

    cases = []
    for n, e in enumerate(entries):
        arrays, spacing, affine = {}, None, None
        for key in (*image_keys, *label_keys):
            path = Path(e[key])
            if not path.name.endswith((".nii", ".nii.gz")):
                raise ValueError(
                    f"{path}: downstream evaluation reads NIfTI (convert DICOM with 'medfusion convert')"
                )
            vol = read_nifti(path)
            a = np.asarray(vol.array, dtype=np.float32)
            if spatial_dims == 2 and a.ndim == 3 and a.shape[2] == 1:
                a = a[:, :, 0]
            if a.ndim != spatial_dims:
                raise ValueError(
                    f"{path}: a {spatial_dims}D evaluation needs {spatial_dims}D volumes, got {a.shape}"
                )
            if not np.isfinite(a).all():
                raise ValueError(f"{path}: the volume holds NaN or Inf values")
            if key in label_keys:
                if not np.array_equal(a, np.rint(a)):
                    raise ValueError(f"{path}: label maps must hold integer values")
                t = torch.from_numpy(np.rint(a))
            else:
                t = hu_to_unit(torch.from_numpy(a), hu_window)
            arrays[key] = t[None].float()
            if spacing is None:
                affine = np.asarray(vol.affine, dtype=np.float64)
                spacing = tuple(float(v) for v in np.linalg.norm(np.asarray(vol.affine)[:3, :3], axis=0))[
                    :spatial_dims
                ]
        cases.append(Case(arrays, str(e.get("case_id", f"case_{n}")), spacing, affine))
    return cases


class StreamSampler(Sampler):
    """This rank's share of a seeded stream of ``(case index, draw seed)`` pairs, ``steps * batch_size`` long.

    Args:
        weights: ``(N,)`` sampling weight of each training item (drawn with replacement, proportionally).
        steps, batch_size: the budget and the global batch (a multiple of the world size).
        seed: the stream's seed (the same on every rank).
    """

    def __init__(self, weights: Sequence[float], steps: int, batch_size: int, seed: int) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if (
            self.weights.ndim != 1
            or not len(self.weights)
            or (self.weights < 0).any()
            or self.weights.sum() <= 0
        ):
            raise ValueError("the training stream needs at least one item with a positive weight")
        self.steps, self.batch_size, self.seed = int(steps), int(batch_size), int(seed)

    def _rank_world(self) -> tuple[int, int]:
        return rank_world()

    def stream(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The global stream: ``(steps * batch_size,)`` case indices and draw seeds."""
        g = torch.Generator().manual_seed(self.seed)
        n = self.steps * self.batch_size
        idx = torch.multinomial(self.weights, n, replacement=True, generator=g)
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=g)
        return idx, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = self._rank_world()
        if self.batch_size % world:
            raise ValueError(
                f"the training batch ({self.batch_size}) must be a multiple of the ranks ({world})"
            )
        idx, seeds = self.stream()
        for g in range(rank, len(idx), world):
            yield int(idx[g]), int(seeds[g])

    def __len__(self) -> int:
        return self.steps * self.batch_size // self._rank_world()[1]


class StreamDataset(Dataset):
    """Training items in memory; ``item((index, seed))`` returns the item's dict of tensors, passed through
    ``draw(arrays, seed)`` when given (a per-draw random crop or deformation, reproducible from the seed)."""

    def __init__(self, items: Sequence[Mapping[str, torch.Tensor]], draw: Callable | None = None) -> None:
        self.items = [dict(i) for i in items]
        self.draw = draw

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        i, seed = key
        item = self.items[i]
        return self.draw(item, seed) if self.draw is not None else item


class Launch(NamedTuple):
    """Where training runs: Lightning's ``accelerator``, ``devices``, ``num_nodes`` and ``strategy``."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"

    @property
    def world(self) -> int:
        return self.devices * self.num_nodes


def fit(module: Any, dataset: StreamDataset, sampler: StreamSampler, launch: Launch, root: Path) -> Any:
    """Train ``module`` on the stream for ``sampler.steps`` optimiser steps; returns the trained module (on CPU)."""
    import logging
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader

    from medfusion.notices import quiet_third_party

    for name in ("lightning.pytorch", "lightning.fabric"):  # one line per run is printed by the caller
        logging.getLogger(name).setLevel(logging.WARNING)
    if sampler.batch_size % launch.world:
        raise ValueError(
            f"--train-batch {sampler.batch_size} must be a multiple of the ranks ({launch.world})"
        )
    loader = DataLoader(
        dataset, batch_size=sampler.batch_size // launch.world, sampler=sampler, num_workers=0
    )
    trainer = L.Trainer(
        max_steps=sampler.steps, accelerator=launch.accelerator, devices=launch.devices,
        num_nodes=launch.num_nodes, strategy=launch.strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False, default_root_dir=str(root), deterministic=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        quiet_third_party()
        warnings.filterwarnings("ignore", message=".*val_dataloader.*")
        trainer.fit(module, train_dataloaders=loader)
    return module.cpu().eval()


def rank_world() -> tuple[int, int]:
    """``(global rank, world size)`` of this process; ``(0, 1)`` without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Global rank 0 (or no process group): the process that writes reports."""
    return rank_world()[0] == 0


def score_cases(n: int, fn: Callable[[int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of ``fn(i)`` for ``i in range(n)``, each case computed on exactly one rank, in case order on every rank."""
    import torch.distributed as dist

    rank, world = rank_world()
    mine = [(i, fn(i)) for i in range(rank, n, world)]
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        mine = [x for part in parts for x in part]
    return [row for _, rows in sorted(mine, key=lambda p: p[0]) for row in rows]


def copy_seed(seed: int, case: int, copy: int) -> int:
    """The seed of deformed copy ``copy`` of training case ``case`` in a run seeded ``seed``."""
    return (seed * 1_000_003 + case * 1_009 + copy) % 2**31


def few_shot_subset(n: int, fraction: float, seed: int) -> list[int]:
    """``max(1, round(fraction * n))`` of ``n`` training cases, drawn without replacement (seeded), sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"labelled fractions must lie in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * n)))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=k, replace=False).tolist())


def label_scores(
    pred: torch.Tensor, ref: torch.Tensor, num_classes: int, spacing: Sequence[float]
) -> dict[str, float]:
    """Dice and HD95 (mm) of one hard label map ``(1, 1, *spatial)`` against its reference, per class
    (``dice_<c>``, ``hd95_<c>``, NaN where the class is absent from the reference) and their means over the classes
    present (``dice``, ``hd95``): :mod:`medfusion.eval.segmentation` (MONAI). A class of the reference missing from
    the prediction has no distance (MONAI gives NaN): its HD95 counts as the image diagonal (mm), so that missing a
    structure never improves the mean; ``missed_classes`` counts them."""
    import warnings

    from medfusion.eval.segmentation import dice_per_case, hd95_per_case

    dice = dice_per_case(pred, ref, num_classes)[0]
    with warnings.catch_warnings():  # MONAI warns for every class absent from the reference (left out here)
        warnings.filterwarnings("ignore", message=".*ground truth of class.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        hd = hd95_per_case(pred, ref, num_classes, spacing=list(spacing))[0]
    row: dict[str, float] = {}
    for c in range(1, num_classes):
        row[f"dice_{c}"], row[f"hd95_{c}"] = float(dice[c - 1]), float(hd[c - 1])
    present = torch.isfinite(dice)  # classes in the reference
    missed = present & ~torch.isfinite(
        hd
    )  # in the reference, absent from the prediction: no distance (MONAI: nan)
    diagonal = float(torch.linalg.vector_norm(torch.tensor(pred.shape[2:], dtype=torch.float64) * torch.tensor(
        [float(v) for v in spacing], dtype=torch.float64)))  # fmt: skip
    h = torch.where(missed, torch.full_like(hd, diagonal), hd)[present]
    row["dice"] = float(dice[present].mean()) if present.any() else float("nan")
    row["hd95"] = float(h.mean()) if h.numel() else float("nan")
    row["missed_classes"] = float(missed.sum())
    return row


# ------------------------------------------------------------------------------------------------ outputs
OUTPUTS = ("cases.csv", "summary.json", "report.md")


def fmt_estimate(e: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``mean [low, high]`` of an estimate's dict, ``-`` without one."""
    if not e or e.get("mean") is None:
        return "-"
    lo, hi = e["ci"]
    return f"{e['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    import csv
    import io

    names = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def json_safe(obj: Any) -> Any:
    """NaN as null, keys as strings, tuples as lists: JSON that every reader accepts."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _spatial_dims(entries: Sequence[Mapping[str, Any]], key: str) -> int:
    import nibabel as nib

    shape = nib.load(str(entries[0][key])).shape
    return 2 if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1) else 3


def drdm_models(names: Sequence[str]) -> dict[str, dict[str, str]]:
    """Path and weights SHA-256 of every trained DRDM among ``names`` (``drdm:PATH``, also inside ``A+B``):
    recorded with the results, so a figure names the exact model that produced it."""
    from medfusion.models.export import weights_sha256

    paths = {part.split(":", 1)[1] for name in names for part in name.split("+") if part.startswith("drdm:")}
    return {p: {"path": p, "weights_sha256": weights_sha256(p)} for p in sorted(paths)}


def write_outputs(
    out: Path, rows, summary, report: str, header: Mapping[str, Any], test_logs, overwrite: bool
) -> None:
    """Write the outputs (and the test-log line for the test split) atomically."""
    from medfusion.eval.report import append_jsonl
    from medfusion.io.atomic import write_text_atomic

    summary = {"run": dict(header), **summary}
    write_text_atomic(out / "cases.csv", _rows_csv(rows), overwrite=overwrite)
    write_text_atomic(out / "summary.json", json.dumps(json_safe(summary), indent=1), overwrite=overwrite)
    write_text_atomic(out / "report.md", report, overwrite=overwrite)
    if header.get("split") == "test":
        record = {**header, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "output": str(out)}  # fmt: skip
        for path in [out / "test_log.jsonl", *(Path(p) for p in test_logs)]:
            append_jsonl(path, record)


def prepare(manifest, output, task: str, split: str, overwrite: bool, image_keys, label_keys, hu_window):
    """Check the split and that no output would be overwritten, read the manifest's training and ``split`` cases:
    ``(output folder, spatial dims, training cases, evaluation cases)``."""
    from medfusion.data.manifest import load_manifest
    from medfusion.io.atomic import check_not_overwriting

    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    out = Path(output)
    for name in (*OUTPUTS, "figures"):
        check_not_overwriting(out / name, overwrite)
    man = load_manifest(manifest, task=task)
    train, evaluation = man.split("training"), man.split(split)
    if not train or not evaluation:
        raise ValueError(f"{manifest}: the downstream evaluation needs 'training' and {split!r} entries")
    dims = _spatial_dims(train, image_keys[0])
    read = [load_cases(e, image_keys, label_keys, tuple(hu_window), dims) for e in (train, evaluation)]
    return out, dims, read[0], read[1]
