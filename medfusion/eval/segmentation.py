"""Segmentation metrics: Dice and 95th-percentile Hausdorff distance per case and class, and their exact mean.

Protocol (the Medical Segmentation Decathlon's, MONAI's defaults): predictions and references are hard label maps
``(B, 1, *spatial)`` (or ``(B, *spatial)``) with values ``0..num_classes - 1``; Dice and HD95 per case and class
from MONAI's ``compute_dice`` / ``compute_hausdorff_distance`` on one-hot maps, background excluded unless asked.
A class absent from a case's reference gives NaN for that case (MONAI's ``ignore_empty``) and is left out of its
mean, rather than counted as 1 (an empty prediction of an absent organ) or 0: the mean over cases is then the
mean over the cases where the organ exists.

:class:`MeanAccumulator` keeps per-class sums and counts, so a mean over a validation set split across DDP ranks is
exact: sums and counts are summed over ranks (no mean of per-rank means, no padded duplicates counted twice).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["MeanAccumulator", "dice_per_case", "hd95_per_case"]


def _one_hot(labels: Tensor, num_classes: int) -> Tensor:
    if labels.ndim >= 3 and labels.shape[1] == 1:
        labels = labels[:, 0]
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"label values must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}"
        )
    return torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).float()


def dice_per_case(pred: Tensor, target: Tensor, num_classes: int, include_background: bool = False) -> Tensor:
    """Dice ``(B, C)`` of hard label maps (``C = num_classes``, or ``num_classes - 1`` without background);
    NaN where the class is absent from the reference."""
    from monai.metrics import compute_dice

    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return compute_dice(
        _one_hot(pred, num_classes),
        _one_hot(target, num_classes),
        include_background=include_background,
        ignore_empty=True,
    )


def hd95_per_case(
    pred: Tensor, target: Tensor, num_classes: int, include_background: bool = False, spacing=None
) -> Tensor:
    """95th-percentile symmetric Hausdorff distance ``(B, C)`` (voxels, or mm with ``spacing``); NaN where the
    class is absent from the reference (``inf`` where it is missing from the prediction alone)."""
    from monai.metrics import compute_hausdorff_distance

    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    ref = _one_hot(target, num_classes)
    with warnings.catch_warnings():  # MONAI warns per class missing from either map: handled below
        warnings.filterwarnings("ignore", message=r"the (prediction|ground truth) of class \d+ is all 0")
        out = compute_hausdorff_distance(
            _one_hot(pred, num_classes),
            ref,
            include_background=include_background,
            percentile=95,
            spacing=spacing,
        )
    present = ref.flatten(2).any(-1)
    predicted = _one_hot(pred, num_classes).flatten(2).any(-1)
    if not include_background:
        present, predicted = present[:, 1:], predicted[:, 1:]
    out = torch.where(present & ~predicted, torch.full_like(out, float("inf")), out)  # MONAI gives NaN there
    return torch.where(present, out, torch.full_like(out, float("nan")))


class MeanAccumulator:
    """Per-class running sums and counts of a per-case metric ``(B, C)``, exact under DDP. Non-finite values are
    skipped: NaN (class absent from the reference) and, for HD95, ``inf`` (class missing from the prediction: no
    distance exists; Dice already scores that case 0).

    ``update(values)`` on each rank, then ``compute(reduce)`` where ``reduce(tensor) -> tensor`` sums over ranks
    (e.g. ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``; identity on one process). Returns the mean per
    class (NaN for a class seen in no case) and the number of cases per class.
    """

    def __init__(self) -> None:
        self.sums: Tensor | None = None
        self.counts: Tensor | None = None

    def reset(self) -> None:
        self.sums = self.counts = None

    def update(self, values: Tensor) -> None:
        v = values.detach().double()
        ok = torch.isfinite(v)
        s, n = torch.where(ok, v, torch.zeros_like(v)).sum(0), ok.sum(0).double()
        self.sums = s if self.sums is None else self.sums + s.to(self.sums.device)
        self.counts = n if self.counts is None else self.counts + n.to(self.counts.device)

    def compute(self, reduce=None, num_classes: int | None = None, device=None) -> tuple[Tensor, Tensor]:
        """``(mean per class, cases per class)``. A rank that saw no batch passes ``num_classes`` so that every rank
        joins the reduction with tensors of the same shape."""
        if self.sums is None:
            if num_classes is None:
                raise ValueError("no values were accumulated; pass num_classes to take part in a reduction")
            self.sums = torch.zeros(num_classes, dtype=torch.float64, device=device)
            self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        both = torch.stack([self.sums, self.counts])
        if reduce is not None:
            both = reduce(both)
        sums, counts = both[0], both[1]
        return sums / counts.clamp_min(1) + torch.where(counts > 0, 0.0, float("nan")), counts
