"""Warping, composition and integration of dense displacement fields.

Convention (the whole package, STYLE.md rule 11): a displacement field ``ddf`` has shape
``(B, D, *spatial)`` with ``D = len(spatial)``, is measured in **voxels**, and channel ``d`` is the
displacement along **array axis** ``d`` (i, j[, k] index order, not x, y, z). Warping is **pull**
(backward): ``warp(I, u)(x) = I(x + u(x))``. This is the convention of MONAI's ``Warp``/``DVF2DDF``
and of DRDM (Zheng et al., arXiv 2407.07295), whose official code stores fields as fractions of the grid
size: multiply them by the grid size to get ours.

Composition: ``compose(a, b)(x) = b(x) + a(x + b(x))``, so ``warp(warp(I, a), b) == warp(I, compose(a, b))``
(``id + compose(a, b) = (id + a) o (id + b)``: ``b`` is applied to the coordinates first).

Why not MONAI ``Warp`` directly: its reference grid is cached by shape only, not by device or dtype,
so one module reused for CPU then GPU tensors (a transform following its data) fails. ``warp`` below
is the same ``grid_sample(align_corners=True)`` call (a test checks it equals ``Warp``) with the grid built
per call; ``integrate_velocity`` matches MONAI ``DVF2DDF`` (also tested).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

InterpMode = Literal["bilinear", "nearest", "bicubic"]
PaddingMode = Literal["zeros", "border", "reflection"]
LabelMode = Literal["nearest", "onehot"]

_INTERP = ("bilinear", "nearest", "bicubic")
_PADDING = ("zeros", "border", "reflection")
_LABEL = ("nearest", "onehot")


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(valid)}")


def _check_field(image: torch.Tensor, ddf: torch.Tensor) -> int:
    nd = ddf.ndim - 2
    if nd not in (2, 3):
        raise ValueError(
            f"ddf must be (B, D, *spatial) with 2 or 3 spatial dims, got shape {tuple(ddf.shape)}"
        )
    if ddf.shape[1] != nd:
        raise ValueError(
            f"ddf has {ddf.shape[1]} channels but {nd} spatial dims; expected (B, {nd}, *spatial)"
        )
    if image.ndim != ddf.ndim or image.shape[2:] != ddf.shape[2:] or image.shape[0] != ddf.shape[0]:
        raise ValueError(
            f"image {tuple(image.shape)} and ddf {tuple(ddf.shape)} must share batch and spatial size "
            "(image (B, C, *spatial), ddf (B, D, *spatial))"
        )
    return nd


def identity_grid(spatial: tuple[int, ...] | torch.Size, device=None, dtype=None) -> torch.Tensor:
    """Voxel coordinates ``(1, D, *spatial)``: channel ``d`` holds the index along axis ``d``."""
    axes = [torch.arange(s, device=device, dtype=dtype or torch.float32) for s in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


def sample_at(
    image: torch.Tensor,
    coords: torch.Tensor,
    mode: InterpMode = "bilinear",
    padding_mode: PaddingMode = "zeros",
) -> torch.Tensor:
    """Sample ``image`` (B, C, *in_spatial) at voxel ``coords`` (B, D, *out_spatial), axis order i, j[, k]."""
    nd = coords.shape[1]
    grid = torch.stack(
        [coords[:, d] * (2.0 / max(image.shape[2 + d] - 1, 1)) - 1.0 for d in reversed(range(nd))], dim=-1
    )
    return F.grid_sample(
        image, grid.to(image.dtype), mode=mode, padding_mode=padding_mode, align_corners=True
    )


def warp(
    image: torch.Tensor,
    ddf: torch.Tensor,
    mode: InterpMode = "bilinear",
    padding_mode: PaddingMode = "zeros",
) -> torch.Tensor:
    """Pull-warp ``image`` (B, C, *spatial) by ``ddf`` (B, D, *spatial) in voxels: ``out(x) = image(x + ddf(x))``.

    ``mode``: ``bilinear`` (trilinear in 3D), ``nearest`` or ``bicubic`` (2D only). Integer images are
    cast to the field's dtype for sampling and back afterwards (use ``nearest`` for them).
    """
    _check("mode", mode, _INTERP)
    _check("padding_mode", padding_mode, _PADDING)
    nd = _check_field(image, ddf)
    if mode == "bicubic" and nd == 3:
        raise ValueError("mode='bicubic' is 2D only; choose bilinear or nearest for 3D fields")
    src = image if image.is_floating_point() else image.to(ddf.dtype)
    coords = identity_grid(ddf.shape[2:], device=ddf.device, dtype=ddf.dtype) + ddf
    out = sample_at(src, coords, mode=mode, padding_mode=padding_mode)
    return out if image.is_floating_point() else out.round().to(image.dtype)


def warp_labels(label: torch.Tensor, ddf: torch.Tensor, mode: LabelMode = "nearest") -> torch.Tensor:
    """Warp an integer label map (B, 1, *spatial) with the same field as its image.

    ``nearest`` picks the closest voxel's value; ``onehot`` warps one channel per label value bilinearly
    and takes the argmax (smoother boundaries, the same boundary as the image warp). Both keep the
    original label values, non-contiguous ones such as {0, 2, 5} included, and never invent classes.
    Out-of-image samples take the smallest label value present (the background, 0, for usual maps).
    """
    _check("mode", mode, _LABEL)
    _check_field(label, ddf)
    if label.shape[1] != 1:
        raise ValueError(f"label must have one channel (B, 1, *spatial), got {tuple(label.shape)}")
    if mode == "nearest":
        background = label.amin()
        out = warp(label.to(ddf.dtype) - background, ddf, mode="nearest", padding_mode="zeros")
        return (out.round() + background).to(label.dtype)
    values = torch.unique(label)
    onehot = torch.cat([(label == v).to(ddf.dtype) for v in values], dim=1)
    warped = warp(onehot, ddf, mode="bilinear", padding_mode="zeros")
    warped[:, :1] += 1e-6  # ties (outside the image) go to the background value
    return values[warped.argmax(dim=1, keepdim=True)].to(label.dtype)


def compose(a: torch.Tensor, b: torch.Tensor, padding_mode: PaddingMode = "border") -> torch.Tensor:
    """``compose(a, b)(x) = b(x) + a(x + b(x))`` (voxels), so ``warp(warp(I, a), b) == warp(I, compose(a, b))``."""
    return b + warp(a, b, mode="bilinear", padding_mode=padding_mode)


def self_compose(
    v: torch.Tensor, n: torch.Tensor | int, padding_mode: PaddingMode = "border"
) -> torch.Tensor:
    """Compose ``v`` with itself ``n`` times: ``u <- compose(u, v)`` from ``u = 0``.

    This is DRDM's forward field ``Phi_t`` (Zheng et al., arXiv 2407.07295, Fig. 3).

    ``n`` is an int or a per-sample integer tensor (B,); sample ``b`` stops after ``n[b]`` compositions
    (``n = 0`` gives the zero field). Euler-style exponentiation of the stationary field ``v``.
    """
    n = torch.as_tensor(n, device=v.device).reshape(-1).expand(v.shape[0])
    u = torch.zeros_like(v)
    for j in range(int(n.max().item()) if n.numel() else 0):
        active = (n > j).to(v.dtype).view(-1, *([1] * (v.ndim - 1)))
        u = u + active * (compose(u, v, padding_mode=padding_mode) - u)
    return u


def integrate_velocity(
    v: torch.Tensor, num_steps: int = 7, padding_mode: PaddingMode = "border"
) -> torch.Tensor:
    """Scaling and squaring: ``exp(v)`` of a stationary velocity ``v`` (B, D, *spatial), voxels.

    ``u = v / 2**num_steps``, then ``num_steps`` times ``u <- compose(u, u)`` (as MONAI ``DVF2DDF``,
    default 7 steps). Check the result with ``inverse_consistency(integrate_velocity(v), integrate_velocity(-v))``.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    u = v / (2**num_steps)
    for _ in range(num_steps):
        u = compose(u, u, padding_mode=padding_mode)
    return u


def invert_field(u: torch.Tensor, iterations: int = 20, padding_mode: PaddingMode = "border") -> torch.Tensor:
    """Fixed-point inverse ``w = -u o (id + w)``, so that ``compose(u, w) ~ 0`` (and ``compose(w, u) ~ 0``)."""
    w = -u
    for _ in range(iterations):
        w = -warp(u, w, mode="bilinear", padding_mode=padding_mode)
    return w


def inverse_consistency(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean |compose(w, u)| in voxels per sample (B,): 0 when ``w`` inverts ``u``."""
    return compose(w, u).norm(dim=1).flatten(1).mean(dim=1)
