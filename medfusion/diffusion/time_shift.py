"""Time-Shift sampling against exposure bias (Li et al., "Alleviating Exposure Bias in Diffusion Models through
Sampling with Shifted Time Steps", ICLR 2024; the authors' code Mingxiao-Li/TS-DPM).

During sampling the state x_t drifts from the noise level the network is told (exposure bias). At each step above a
cut-off t_c, the shift rule picks, within the window ``τ ∈ [t - w//2, t + w//2]`` of training timesteps, the one whose
marginal variance matches the sample's variance over its voxels::

    t_s = argmin_τ | Var(x_t) - (ᾱ_τ v_0 + 1 - ᾱ_τ) |          (per sample; t_s = t for t <= t_c)

``v_0`` (``data_variance``) is the data's variance; the paper's rule is ``v_0 = 0`` (it matches 1 - ᾱ_τ, accurate at
high noise, hence the cut-off). The network is evaluated at t_s and its noise prediction ε̂(x_t, t_s) is used in place
of ε̂(x_t, t) by the unchanged solver, as in the authors' DEIS and DPM-Solver code; so it wraps *any* sampler as a
model wrapper (:func:`time_shift_model`). For ``v`` and ``x0`` networks the output at t_s is converted to ε̂ with the
coefficients of t_s and re-expressed in the same parameterisation at t (ε preserved).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medfusion.diffusion.denoiser import DiffusionModel
from medfusion.diffusion.gaussian import PREDICTIONS, Prediction, output_to_eps
from medfusion.diffusion.schedules import NoiseSchedule


def _check(window: int, cutoff: int, data_variance: float, schedule: NoiseSchedule) -> None:
    if window < 0:
        raise ValueError(f"time-shift window must be >= 0 timesteps, got {window}")
    if not -1 <= cutoff <= schedule.num_train_timesteps - 1:
        raise ValueError(
            f"time-shift cutoff must lie in [-1, {schedule.num_train_timesteps - 1}], got {cutoff}"
        )
    if data_variance < 0:
        raise ValueError(f"data_variance must be >= 0, got {data_variance}")


def shifted_timesteps(
    x: Tensor, t: Tensor, schedule: NoiseSchedule, *, window: int, cutoff: int, data_variance: float = 0.0
) -> Tensor:
    """The shift rule (module docstring): LongTensor (B,) of t_s for samples ``x`` (B, C, *spatial) at ``t`` (B,)."""
    _check(window, cutoff, data_variance, schedule)
    t = t.to(torch.long)
    T = schedule.num_train_timesteps
    half = window // 2
    offsets = torch.arange(-half, half + 1, device=t.device)
    # (B, W) candidate timesteps; clamping repeats an edge value, harmless for the argmin
    taus = (t[:, None] + offsets[None]).clamp(0, T - 1)
    ab = schedule.alphas_cumprod.to(t.device)[taus]
    target = ab * data_variance + (1 - ab)
    var = x.detach().double().flatten(1).var(dim=1).to(t.device)
    pick = (var[:, None] - target).abs().argmin(dim=1)
    shifted = taus.gather(1, pick[:, None])[:, 0]
    return torch.where(t > cutoff, shifted, t)


def time_shift_model(
    model: DiffusionModel,
    schedule: NoiseSchedule,
    *,
    prediction: Prediction = "epsilon",
    window: int = 10,
    cutoff: int = 300,
    data_variance: float = 0.0,
) -> DiffusionModel:
    """``model`` evaluated at the shifted timestep (module docstring), with the sampler contract
    ``(x_t, t, cond) -> raw output``; pass it to any sampler with the same ``prediction``.

    Args:
        window: w, the width of the search window in training timesteps (0 = no shift); the authors' examples
            use 5-30 for T = 1000.
        cutoff: t_c: no shift at t <= t_c (-1 = shift down to the last step); their examples use 300-900.
        data_variance: v_0 of the matched variance (0 = the paper's rule).
    """
    _check(window, cutoff, data_variance, schedule)
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    abar = schedule.alphas_cumprod

    def shifted(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        t_s = shifted_timesteps(x, t, schedule, window=window, cutoff=cutoff, data_variance=data_variance)
        out = model(x, t_s, cond)
        if prediction == "epsilon" or bool((t_s == t).all()):
            return out
        shape = (-1, *([1] * (x.ndim - 1)))
        ab_s, ab_t = abar.to(x.device)[t_s].view(shape), abar.to(x.device)[t.to(torch.long)].view(shape)
        eps = output_to_eps(out.double(), x.double(), ab_s.sqrt(), (1 - ab_s).sqrt(), prediction)
        x0 = (x.double() - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
        return (x0 if prediction == "x0" else ab_t.sqrt() * eps - (1 - ab_t).sqrt() * x0).to(out.dtype)

    return shifted
