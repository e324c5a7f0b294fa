"""DRDM forward "deformation diffusion", recovery losses and the recovery sampler (Algorithm 2).

Zheng et al., "Deformation-Recovery Diffusion Model (DRDM): Instance Deformation for Image Manipulation
and Synthesis", arXiv 2407.07295, 2024. Facts and constants follow the official code
(github.com/jianqingzheng/def_diff_rec, commit 1c70370); the code is ours.
Hand-written because no maintained library implements DRDM's deformation diffusion (MONAI and diffusers
only diffuse intensities); warping, composition and Jacobians come from :mod:`medfusion.fields`.

Units: fields are displacements in **voxels** ``(B, D, *spatial)``, channel ``d`` along array axis ``d``,
pull convention (``medfusion.fields``). The official code stores fractions of the grid size; multiply
those by the grid size to compare.

Forward process (paper Fig. 3, ``psi_t = [psi^(0) + psi^(1) + ...]^{n_t}``):

1. Multi-scale velocity on a ``C = 64`` control grid covering ``crop_rate = 2`` times the image FOV:
   ``v = sum_i Up_{s_i -> C}((C / s_i) * sigma * eps_i)``, ``s_i = C / 2**i`` (64, 32, 16, 8), bilinear /
   trilinear upsampling with ``align_corners=False`` (node std ``sigma * 2**i``, variance ``4**i sigma**2``).
2. Perturbed velocity ``v' = compose(v_n, v)`` with ``v_n`` drawn the same way at ``0.08 sigma``.
3. Self-composition: ``Phi_t = v'`` composed ``n_img(t) = clamp(floor(2 t**1.3 / 3), 1, 200)`` times (applied
   to the image), ``psi_t = v`` composed ``n_lab(t) = floor(t**0.6)`` times (the part the net must invert).
   One ``v`` per sample, self-composed: the code's reading of the paper's Markov chain.
4. To image resolution: upsample the control field to ``crop_rate * N`` and keep the central ``N``.
   **Deviation (geometric consistency):** displacements are scaled by ``crop_rate * N / C`` image voxels per
   control voxel. The official code scales by ``N / C`` in fraction units (``N**2 / C**2`` voxels per control
   voxel), which is the same at ``N = 128`` but doubles every 2D displacement at its ``N = 256``.
   ``legacy_scale=True`` reproduces it. We sample the control field at the cropped voxel
   centres directly, which equals upsample-then-crop without building the ``(2N)**D`` field.

Training (Algorithm 1): ``I_t = warp(I_0, Phi_t)``, ``r = D(I_t, t)`` should invert ``psi_t``:
``c = r o (id + psi_t)`` should equal ``-psi_t``. Loss ``L_dist + L_ang + 10 L_reg`` (``recovery_losses``),
with a **true** Jacobian penalty ``ReLU(-det(I + grad r))`` in ``L_reg`` (deviation: the official "negdetj"
term is not a Jacobian determinant).

Sampling (Algorithm 2; ``recover``): start from ``phi = Phi_{T'}``, then for each recovery step
``r = D(warp(I_0, phi), t)``, ``phi <- compose(phi, r)``; the *original* image (and label) is re-warped
every step, so there is one interpolation. The official sampler always runs 80 steps from t = 79; ``recovery_schedule`` gives the paper's ``T'`` steps, a strided subset, or the legacy 80.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from medfusion.fields import (
    compose,
    negative_jacobian_penalty,
    sample_at,
    self_compose,
    warp,
    warp_labels,
)
from medfusion.fields.warp import LabelMode, PaddingMode

T_DEFAULT = 80


def n_img(t: torch.Tensor | int) -> torch.Tensor:
    """Compositions applied to the image at level ``t``: ``clamp(floor(2 t**1.3 / 3), 1, 200)`` (long)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.clamp(torch.floor(2.0 * t.pow(1.3) / 3.0 + 1e-9), 1, 200).long()


def n_lab(t: torch.Tensor | int) -> torch.Tensor:
    """Compositions of the clean velocity the network must invert at level ``t``: ``floor(t**0.6)`` (long)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.floor(t.pow(0.6) + 1e-9).long()


def multiscale_velocity(
    batch: int,
    spatial_dims: int,
    *,
    ctl_size: int = 64,
    sigma: float = 4e-5,
    n_scales: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Step A: ``v = sum_i Up((C / s_i) sigma eps_i)`` on the ``C**D`` control grid, in **control voxels** (B, D, C, ...).

    ``sigma`` is in fractions of the control grid (the official unit), so the result is ``C`` times the
    official field. ``n_scales`` defaults to ``min(5, log2(C) - 2)`` (4 for C = 64: scales 64, 32, 16, 8).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if n_scales is None:
        n_scales = int(min(5, math.log2(ctl_size) - 2))
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    gen_device = generator.device if generator is not None else torch.device("cpu")
    v = torch.zeros(batch, spatial_dims, *([ctl_size] * spatial_dims), device=gen_device)
    for i in range(n_scales):
        s = ctl_size // 2**i
        eps = torch.randn(batch, spatial_dims, *([s] * spatial_dims), generator=generator, device=gen_device)
        noise = (ctl_size / s) * sigma * eps
        v = v + F.interpolate(noise, size=[ctl_size] * spatial_dims, mode=mode, align_corners=False)
    return (v * ctl_size).to(device if device is not None else gen_device)


def control_to_image(
    u_ctl: torch.Tensor, spatial: Sequence[int], *, crop_rate: float = 2.0, legacy_scale: bool = False
) -> torch.Tensor:
    """Step D: a control-grid field (B, D, C, ...) in control voxels -> (B, D, *spatial) in image voxels.

    Equals upsampling (linear, ``align_corners=False``) to ``crop_rate * N`` then keeping the central ``N``
    per axis. Scale per axis: ``crop_rate * N_d / C`` (consistent) or ``N_d**2 / C**2`` (official, legacy).
    """
    nd = u_ctl.shape[1]
    c = u_ctl.shape[2]
    if len(spatial) != nd:
        raise ValueError(f"spatial {tuple(spatial)} must have {nd} entries for a {nd}-D field")
    axes = []
    for n in spatial:
        big = crop_rate * n
        offset = (big - n) / 2.0
        i = torch.arange(n, device=u_ctl.device, dtype=u_ctl.dtype)
        axes.append((i + offset + 0.5) * c / big - 0.5)
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None].expand(
        u_ctl.shape[0], *([-1] * (nd + 1))
    )
    out = sample_at(u_ctl, coords, mode="bilinear", padding_mode="border")
    scale = [(n * n / (c * c)) if legacy_scale else (crop_rate * n / c) for n in spatial]
    return out * torch.tensor(scale, dtype=out.dtype, device=out.device).view(1, nd, *([1] * nd))


class ForwardFields(NamedTuple):
    """Fields of the forward process at levels ``t`` (voxels, ``(B, D, *spatial)``)."""

    phi: torch.Tensor  # Phi_t, applied to the image: I_t = warp(I_0, Phi_t)
    psi: torch.Tensor  # psi_t, what the recovery net must invert (zeros when not requested)
    n_img: torch.Tensor  # (B,) compositions in Phi_t
    n_lab: torch.Tensor  # (B,) compositions in psi_t


class ForwardSample(NamedTuple):
    image: torch.Tensor  # I_t (B, C, *spatial)
    fields: ForwardFields


class DeformationDiffusion:
    """The DRDM forward process (steps 1-4 of the module docstring); pure torch, no parameters.

    Args:
        timesteps: T (80). Training levels are ``t ~ U{0..T-1}``; the forward process accepts ``t <= T``.
        sigma: base std of the finest scale, fraction of the control grid (4e-5).
        ctl_size: control grid size C (64), for 2D and 3D and whatever the image size.
        n_scales: number of scales (default ``min(5, log2(C) - 2)`` = 4).
        noise_ratio: std ratio of the perturbation field ``v_n`` (0.08).
        crop_rate: the control grid covers ``crop_rate`` x the image FOV (2).
        legacy_scale: reproduce the official ``N / C`` rescale (doubles 2D-256 displacements).
        padding_mode: padding used when composing fields (``border`` as the official code).
    """

    def __init__(
        self,
        timesteps: int = T_DEFAULT,
        sigma: float = 4e-5,
        ctl_size: int = 64,
        n_scales: int | None = None,
        noise_ratio: float = 0.08,
        crop_rate: float = 2.0,
        legacy_scale: bool = False,
        padding_mode: PaddingMode = "border",
    ) -> None:
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if ctl_size < 8 or ctl_size & (ctl_size - 1):
            raise ValueError(f"ctl_size must be a power of two >= 8, got {ctl_size}")
        if crop_rate < 1:
            raise ValueError(f"crop_rate must be >= 1, got {crop_rate}")
        self.timesteps = timesteps
        self.sigma = sigma
        self.ctl_size = ctl_size
        self.n_scales = n_scales
        self.noise_ratio = noise_ratio
        self.crop_rate = crop_rate
        self.legacy_scale = legacy_scale
        self.padding_mode = padding_mode

    def _velocity(self, batch, nd, sigma, generator, device):
        return multiscale_velocity(
            batch,
            nd,
            ctl_size=self.ctl_size,
            sigma=sigma,
            n_scales=self.n_scales,
            generator=generator,
            device=device,
        )

    def control_fields(
        self,
        t: torch.Tensor,
        spatial_dims: int,
        *,
        with_psi: bool = True,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> ForwardFields:
        """Steps A-C on the control grid (control voxels)."""
        t = torch.as_tensor(t).reshape(-1)
        if (t < 0).any() or (t > self.timesteps).any():
            raise ValueError(f"levels t must lie in [0, {self.timesteps}], got {t.tolist()}")
        b = t.numel()
        v = self._velocity(b, spatial_dims, self.sigma, generator, device)
        v_n = self._velocity(b, spatial_dims, self.sigma * self.noise_ratio, generator, device)
        v_pert = compose(v_n, v, padding_mode=self.padding_mode)
        ni, nl = n_img(t).to(v.device), n_lab(t).to(v.device)
        phi = self_compose(v_pert, ni, padding_mode=self.padding_mode)
        psi = self_compose(v, nl, padding_mode=self.padding_mode) if with_psi else torch.zeros_like(v)
        return ForwardFields(phi, psi, ni, nl)

    def fields(
        self,
        t: torch.Tensor | int,
        spatial: Sequence[int],
        *,
        with_psi: bool = True,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> ForwardFields:
        """``Phi_t`` and ``psi_t`` at image size ``spatial`` (voxels), one per entry of ``t`` (B,)."""
        ctl = self.control_fields(t, len(spatial), with_psi=with_psi, generator=generator, device=device)
        kw = dict(crop_rate=self.crop_rate, legacy_scale=self.legacy_scale)
        phi = control_to_image(ctl.phi, spatial, **kw)
        psi = control_to_image(ctl.psi, spatial, **kw) if with_psi else torch.zeros_like(phi)
        return ForwardFields(phi, psi, ctl.n_img, ctl.n_lab)

    def q_sample(
        self,
        image: torch.Tensor,
        t: torch.Tensor | int,
        *,
        generator: torch.Generator | None = None,
        padding_mode: PaddingMode = "zeros",
    ) -> ForwardSample:
        """Algorithm 1, lines 3-4: draw ``Phi_t, psi_t`` and return ``I_t = warp(I_0, Phi_t)`` (bilinear)."""
        t = torch.as_tensor(t, device=image.device).reshape(-1).expand(image.shape[0])
        f = self.fields(t, image.shape[2:], generator=generator, device=image.device)
        return ForwardSample(warp(image, f.phi.to(image.dtype), padding_mode=padding_mode), f)


def _to_fraction(u: torch.Tensor) -> torch.Tensor:
    nd = u.ndim - 2
    sizes = torch.tensor(u.shape[2:], dtype=u.dtype, device=u.device).view(1, nd, *([1] * nd))
    return u / sizes


class RecoveryLoss(NamedTuple):
    total: torch.Tensor
    dist: torch.Tensor
    ang: torch.Tensor
    grad: torch.Tensor
    jacobian: torch.Tensor


def recovery_losses(
    r: torch.Tensor,
    psi: torch.Tensor,
    *,
    padding_mode: PaddingMode = "border",
    weights: tuple[float, float, float] = (1.0, 1.0, 10.0),
    jacobian_weight: float = 2.0,
    grad_threshold: float = 1e-4,
) -> RecoveryLoss:
    """DRDM training loss (paper Fig. 4 ``l1 L_dist + l2 L_ang + l3 L_reg``) for ``r``, ``psi`` in voxels.

    ``c = r o (id + psi)`` (``r`` resampled at ``x + psi(x)``) should equal ``-psi``. Computed in fractions
    of the image size (channel d / N_d), as the official constants assume:
    ``L_dist = mean ||100 c + 100 psi||^2 / (||100 psi||^2 + 1e-3)``,
    ``L_ang = mean <1e5 c, 1e5 psi> / sqrt(||1e5 c||^2 ||1e5 psi||^2 + 1e-4)`` (minimised towards -1),
    ``L_reg = mean_i mean ReLU(|Delta_i r| - 1e-4) + 2 mean ReLU(-det(I + grad r))`` (the last term a true
    Jacobian penalty, our deviation), ``total = 1 L_dist + 1 L_ang + 10 L_reg``.
    """
    c = _to_fraction(warp(r, psi, padding_mode=padding_mode))
    p = _to_fraction(psi)
    dist = ((100 * c + 100 * p).pow(2).sum(1) / ((100 * p).pow(2).sum(1) + 1e-3)).mean()
    cs, ps = 1e5 * c, 1e5 * p
    ang = ((cs * ps).sum(1) / torch.sqrt(cs.pow(2).sum(1) * ps.pow(2).sum(1) + 1e-4)).mean()
    rf = _to_fraction(r)
    nd = r.ndim - 2
    grad = sum(torch.relu(torch.diff(rf, dim=2 + i).abs() - grad_threshold).mean() for i in range(nd)) / nd
    jac = negative_jacobian_penalty(r)
    reg = grad + jacobian_weight * jac
    total = weights[0] * dist + weights[1] * ang + weights[2] * reg
    return RecoveryLoss(total, dist, ang, grad, jac)


def recovery_schedule(
    t_start: int, steps: int | None = None, *, legacy: bool = False, timesteps: int = T_DEFAULT
) -> list[int]:
    """Network levels for Algorithm 2, descending.

    ``steps=None``: the paper's ``T'`` steps ``T'-1, ..., 0``; ``steps=k < T'``: ``k`` levels evenly
    strided over the same range (first ``T'-1``, last 0); ``legacy=True``: the official 80 steps
    ``T-1, ..., 0`` whatever ``T'``.
    """
    if legacy:
        return list(range(timesteps - 1, -1, -1))
    if not 1 <= t_start <= timesteps:
        raise ValueError(f"t_start must lie in [1, {timesteps}], got {t_start}")
    top = t_start - 1
    if steps is None or steps >= t_start:
        return list(range(top, -1, -1))
    if steps < 1:
        raise ValueError(f"steps must be >= 1 or None, got {steps}")
    if steps == 1:
        return [top]
    return [round(top - k * top / (steps - 1)) for k in range(steps)]


def augmentation_levels(n: int, start: int = 48, step: int = 2, timesteps: int = T_DEFAULT) -> list[int]:
    """The official augmentation schedule of ``T'``: starts at ``start``, ``+step`` after each even-indexed sample.

    CMR (48, +2) for 32 samples: [48, 50, 50, 52, 52, ..., 78, 78, 80]; clamped to ``timesteps``.
    """
    out, level = [], start
    for i in range(n):
        out.append(min(level, timesteps))
        if i % 2 == 0:
            level += step
    return out


class RecoveryResult(NamedTuple):
    image: torch.Tensor  # warp(I_0, phi) (B, C, *spatial)
    label: torch.Tensor | None  # labels warped with the same phi, or None
    ddf: torch.Tensor  # the generated deformation phi (B, D, *spatial), voxels
    random_ddf: torch.Tensor  # the starting random field Phi_{T'}


def recover(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    ddf: torch.Tensor,
    timesteps: Sequence[int],
    *,
    label: torch.Tensor | None = None,
    label_mode: LabelMode = "nearest",
    padding_mode: PaddingMode = "border",
    image_padding_mode: PaddingMode = "zeros",
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> RecoveryResult:
    """Algorithm 2 (recovery sampling): deterministic given the starting field ``ddf = Phi_{T'}``.

    Args:
        model: ``model(image_t, t) -> r`` (B, D, *spatial) voxels, ``t`` a (B,) long tensor.
        image: the original ``I_0`` (B, C, *spatial).
        ddf: the random starting field (B, D, *spatial), voxels.
        timesteps: network levels, descending (``recovery_schedule``).
        label: optional (B, 1, *spatial) integer labels, warped with the same field.
        padding_mode: padding when accumulating ``phi`` (official: zeros for 2D cmr, border for 3D lct).
    """
    phi = ddf
    # 1. one interpolation of the original per step: I = warp(I_0, phi)
    cur = warp(image, phi, padding_mode=image_padding_mode)
    for t in timesteps:
        tt = torch.full((image.shape[0],), int(t), dtype=torch.long, device=image.device)
        # 2. r = D(I_t, t), applied first in pull terms: phi <- compose(phi, r)
        r = model(cur, tt)
        phi = compose(phi, r, padding_mode=padding_mode)
        # 3. re-warp the original image with the accumulated field
        cur = warp(image, phi, padding_mode=image_padding_mode)
        if callback is not None:
            callback(int(t), phi)
    lab = warp_labels(label, phi, mode=label_mode) if label is not None else None
    return RecoveryResult(cur, lab, phi, ddf)
