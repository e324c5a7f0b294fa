"""Jacobian determinant and plausibility statistics of displacement fields (voxels, array-axis order).

``det J(x) = det(I + grad u(x))`` with central differences inside the image and one-sided differences
at its border (``numpy.gradient`` / ``torch.gradient`` convention, as DRDM's ``eval_detJ_lab``). These are
small closed-form reductions that MONAI does not provide (its ``BendingEnergyLoss`` and
``DiffusionLoss`` regularise but do not report folding), hence hand-written.

Conventions reported by every function here:
- folding fraction: share of voxels with ``det J <= 0`` (optionally inside a mask), in [0, 1];
- SDlogJ: standard deviation of ``log(clip(det J, 1e-9, 1e9))`` over the (masked) voxels, without the
  Learn2Reg "+3" offset;
- displacement scale: ``|u|`` with component ``d`` divided by the size of axis ``d``, in percent of the
  image size (``|u| / N * 100`` for square or cubic images), the scale DRDM reports (Zheng et al.,
  arXiv 2407.07295).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def _spatial_dims(ddf: torch.Tensor) -> int:
    nd = ddf.ndim - 2
    if nd not in (2, 3) or ddf.shape[1] != nd:
        raise ValueError(
            f"ddf must be (B, D, *spatial) with D = 2 or 3 spatial dims, got shape {tuple(ddf.shape)}"
        )
    return nd


def jacobian_matrix(ddf: torch.Tensor) -> torch.Tensor:
    """``I + grad u`` as (B, *spatial, D, D); entry [..., i, j] = d(x_i + u_i)/d x_j."""
    nd = _spatial_dims(ddf)
    rows = []
    for i in range(nd):
        grads = torch.gradient(ddf[:, i], dim=tuple(range(1, nd + 1)))
        rows.append(torch.stack(grads, dim=-1))
    grad = torch.stack(rows, dim=-2)
    return grad + torch.eye(nd, dtype=ddf.dtype, device=ddf.device)


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """``det(I + grad u)`` per voxel, (B, *spatial), for ``ddf`` (B, D, *spatial) in voxels."""
    return torch.linalg.det(jacobian_matrix(ddf))


def _masked(values: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Per-sample 1-D tensors of ``values`` (B, *spatial) inside ``mask`` ((B|1, [1,] *spatial) bool)."""
    if mask is None:
        return list(values.flatten(1))
    m = mask.bool()
    if m.ndim == values.ndim + 1:
        m = m[:, 0]
    m = m.expand_as(values)
    return [v[mm] for v, mm in zip(values, m)]


def folding_fraction(ddf: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction (B,) of voxels with ``det(I + grad u) <= 0``, inside ``mask`` if given (0 for an empty mask)."""
    det = jacobian_determinant(ddf)
    out = [(v <= 0).float().mean() if v.numel() else v.new_zeros(()) for v in _masked(det, mask)]
    return torch.stack(out)


def sdlogj(ddf: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Standard deviation (B,) of ``log(clip(det J, 1e-9, 1e9))`` (no "+3" offset), inside ``mask`` if given."""
    logj = jacobian_determinant(ddf).clamp(1e-9, 1e9).log()
    out = [v.std(unbiased=False) if v.numel() else v.new_zeros(()) for v in _masked(logj, mask)]
    return torch.stack(out)


class DisplacementScale(NamedTuple):
    """Per-sample (B,) statistics of ``|u|`` in percent of the image size."""

    mean: torch.Tensor
    p95: torch.Tensor
    max: torch.Tensor


def displacement_scale(ddf: torch.Tensor, mask: torch.Tensor | None = None) -> DisplacementScale:
    """Mean, 95th percentile and max of ``|u|`` as % of image size (component d / size of axis d)."""
    nd = _spatial_dims(ddf)
    sizes = torch.tensor(ddf.shape[2:], dtype=ddf.dtype, device=ddf.device).view(1, nd, *([1] * nd))
    mag = (ddf / sizes).norm(dim=1) * 100.0
    vals = _masked(mag, mask)
    return DisplacementScale(
        mean=torch.stack([v.mean() for v in vals]),
        p95=torch.stack([torch.quantile(v.float(), 0.95).to(v.dtype) for v in vals]),
        max=torch.stack([v.max() for v in vals]),
    )


def negative_jacobian_penalty(ddf: torch.Tensor) -> torch.Tensor:
    """Mean ``ReLU(-det(I + grad u))`` over voxels and batch: a true folding penalty (scalar, differentiable).

    Replaces the ``negdetj`` term of the official DRDM code (jianqingzheng/def_diff_rec), which is not a Jacobian
    determinant: it gives 0 for a reflection, where this penalty is positive.
    """
    return torch.relu(-jacobian_determinant(ddf)).mean()
