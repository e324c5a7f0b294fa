"""Registration / deformation evaluation: Dice per label, folding %, SDlogJ, displacement scale, in one call.

Conventions (one, the same for every registration and augmentation metric):
- fields are displacements in **voxels**, ``(B, D, *spatial)``, channel ``d`` along array axis ``d``, **pull**
  (``warped(x) = moving(x + u(x))``, moving -> fixed), as ``medfusion.fields``;
- Dice protocol: hard label maps (already argmaxed or nearest-warped), one Dice per label value present in
  either map, background (0) excluded unless asked; an empty-vs-empty label gives 1;
- folding: % of voxels with ``det(I + grad u) <= 0`` (central differences), inside a mask if given;
- SDlogJ: std of ``log(clip(det J, 1e-9, 1e9))``, no Learn2Reg "+3" offset;
- displacement: mean / 95th percentile / max ``|u|`` in % of image size (component d / size of axis d).
Thin wrappers over ``medfusion.fields`` (the geometry) plus Dice; MONAI's ``DiceMetric`` needs one-hot
contiguous classes, which we avoid to keep arbitrary label values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medfusion.fields import displacement_scale, folding_fraction, sdlogj

__all__ = [
    "RegistrationMetrics",
    "dice_per_label",
    "displacement_stats",
    "evaluate_registration",
    "folding_fraction",
    "sdlogj",
]


def dice_per_label(
    pred: torch.Tensor,
    target: torch.Tensor,
    labels: list[int] | None = None,
    include_background: bool = False,
) -> dict[int, float]:
    """Dice of hard label maps (same shape, any integer values) per label value, pooled over the batch."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    if labels is None:
        labels = sorted(set(torch.unique(pred).tolist()) | set(torch.unique(target).tolist()))
        if not include_background:
            labels = [v for v in labels if v != 0]
    out = {}
    for v in labels:
        p, t = pred == v, target == v
        denom = p.sum() + t.sum()
        out[int(v)] = 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)
    return out


def displacement_stats(ddf: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Batch means of the mean / p95 / max ``|u|`` in % of image size."""
    s = displacement_scale(ddf, mask)
    return {
        "disp_mean_pct": float(s.mean.mean()),
        "disp_p95_pct": float(s.p95.mean()),
        "disp_max_pct": float(s.max.mean()),
    }


@dataclass
class RegistrationMetrics:
    """Batch-averaged metrics of one evaluation (percentages in [0, 100])."""

    folding_pct: float
    folding_mask_pct: float | None
    sdlogj: float
    disp_mean_pct: float
    disp_p95_pct: float
    disp_max_pct: float
    dice: dict[int, float] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float | None:
        return sum(self.dice.values()) / len(self.dice) if self.dice else None


def evaluate_registration(
    ddf: torch.Tensor,
    warped_label: torch.Tensor | None = None,
    fixed_label: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> RegistrationMetrics:
    """All metrics for a field ``ddf`` (B, D, *spatial) voxels, with Dice when both label maps are given."""
    dice = {}
    if (warped_label is None) != (fixed_label is None):
        raise ValueError("give both warped_label and fixed_label (or neither)")
    if warped_label is not None:
        dice = dice_per_label(warped_label, fixed_label)
    stats = displacement_stats(ddf)
    return RegistrationMetrics(
        folding_pct=float(folding_fraction(ddf).mean()) * 100,
        folding_mask_pct=float(folding_fraction(ddf, mask).mean()) * 100 if mask is not None else None,
        sdlogj=float(sdlogj(ddf).mean()),
        dice=dice,
        **stats,
    )
