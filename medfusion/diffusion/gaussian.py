"""Gaussian forward process, parameterisation conversions and the denoising training loss.

Forward process (Ho et al., NeurIPS 2020, eq. 4): ``q(x_t | x0) = N(α_t x0, σ_t² I)``, i.e.
``x_t = α_t x0 + σ_t ε``. Parameterisations of the network output:

* ``epsilon`` — ε̂ (Ho et al. 2020, eq. 11): ``x̂0 = (x_t - σ_t ε̂) / α_t``;
* ``v`` — v̂ = α_t ε - σ_t x0 (Salimans & Ho, "Progressive Distillation", ICLR 2022, §4):
  ``x̂0 = α_t x_t - σ_t v̂``, ``ε̂ = α_t v̂ + σ_t x_t``;
* ``x0`` — x̂0 directly: ``ε̂ = (x_t - α_t x̂0) / σ_t``.

Min-SNR-γ weighting (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023, eq. 7
and §3.4): with SNR = α²/σ², the per-sample weight is ``min(SNR, γ)`` for x0 targets, ``min(SNR, γ)/SNR`` for ε
targets and ``min(SNR, γ)/(SNR + 1)`` for v targets.

All functions work for any ``x.ndim`` (``(B, C, *spatial)``, 2D or 3D): per-sample timesteps ``t`` of shape ``(B,)``
(or a scalar) are broadcast over the remaining dimensions. Coefficients are computed in float64 and cast to ``x``'s
dtype. Hand-written because these are a few lines of algebra that MONAI's schedulers keep private to ``step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from medfusion.diffusion.schedules import NoiseSchedule

Prediction = Literal["epsilon", "v", "x0"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "v", "x0")
LossKind = Literal["mse", "l1", "huber"]
LOSSES: tuple[str, ...] = ("mse", "l1", "huber")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def _coef(values: Tensor, x: Tensor) -> Tensor:
    """Cast per-sample (B,) or scalar float64 coefficients to x's dtype/device and shape (B, 1, …, 1)."""
    values = values.to(device=x.device, dtype=x.dtype)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (x.ndim - 1)))


def _t(t: Tensor | int, x: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=torch.long, device=x.device)


def q_sample(x0: Tensor, t: Tensor | int, noise: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Draw x_t ~ q(x_t | x0) with the given noise: ``α_t x0 + σ_t ε`` (Ho et al. 2020, eq. 4).

    Args:
        x0: clean data (B, C, *spatial).
        t: (B,) integer timesteps in [-1, T-1] (or a scalar).
        noise: ε, same shape as x0.
    """
    t = _t(t, x0)
    return _coef(schedule.alpha(t), x0) * x0 + _coef(schedule.sigma(t), x0) * noise


def v_target(x0: Tensor, noise: Tensor, t: Tensor | int, schedule: NoiseSchedule) -> Tensor:
    """Velocity target ``v = α_t ε - σ_t x0`` (Salimans & Ho 2022, §4)."""
    t = _t(t, x0)
    return _coef(schedule.alpha(t), x0) * noise - _coef(schedule.sigma(t), x0) * x0


def training_target(
    x0: Tensor, noise: Tensor, t: Tensor | int, schedule: NoiseSchedule, prediction: Prediction
) -> Tensor:
    """What the network regresses for a parameterisation: ε, v or x0."""
    _check_prediction(prediction)
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        return v_target(x0, noise, t, schedule)
    return x0


def _x0_from_eps(out: Tensor, x: Tensor, a: Tensor | float, s: Tensor | float) -> Tensor:
    return (x - s * out) / a


def _x0_from_v(out: Tensor, x: Tensor, a: Tensor | float, s: Tensor | float) -> Tensor:
    return a * x - s * out


def _x0_from_x0(out: Tensor, x: Tensor, a: Tensor | float, s: Tensor | float) -> Tensor:
    return out


def _eps_from_eps(out: Tensor, x: Tensor, a: Tensor | float, s: Tensor | float) -> Tensor:
    return out


def _eps_from_v(out: Tensor, x: Tensor, a: Tensor | float, s: Tensor | float) -> Tensor:
    return a * out + s * x


def _eps_from_x0(out: Tensor, x: Tensor, a: Tensor | float, s: Tensor | float) -> Tensor:
    return (x - a * out) / s


# Parameterisation adapters: one small function per (target, parameterisation), no branching on model types.
_TO_X0: dict[str, Callable[..., Tensor]] = {
    "epsilon": _x0_from_eps,
    "v": _x0_from_v,
    "x0": _x0_from_x0,
}
_TO_EPS: dict[str, Callable[..., Tensor]] = {
    "epsilon": _eps_from_eps,
    "v": _eps_from_v,
    "x0": _eps_from_x0,
}


def output_to_x0(
    model_out: Tensor, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction: Prediction
) -> Tensor:
    """x̂0 from a raw output given α_t, σ_t already broadcast to x_t (floats or tensors); for samplers."""
    _check_prediction(prediction)
    return _TO_X0[prediction](model_out, x_t, alpha, sigma)


def output_to_eps(
    model_out: Tensor, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction: Prediction
) -> Tensor:
    """ε̂ from a raw output given α_t, σ_t already broadcast to x_t (floats or tensors); for samplers."""
    _check_prediction(prediction)
    return _TO_EPS[prediction](model_out, x_t, alpha, sigma)


def predict_x0(
    model_out: Tensor, x_t: Tensor, t: Tensor | int, schedule: NoiseSchedule, prediction: Prediction
) -> Tensor:
    """Data prediction x̂0 from a raw network output of the given parameterisation."""
    _check_prediction(prediction)
    t = _t(t, x_t)
    return _TO_X0[prediction](model_out, x_t, _coef(schedule.alpha(t), x_t), _coef(schedule.sigma(t), x_t))


def predict_eps(
    model_out: Tensor, x_t: Tensor, t: Tensor | int, schedule: NoiseSchedule, prediction: Prediction
) -> Tensor:
    """Noise prediction ε̂ from a raw network output (undefined for ``x0`` at t = -1 where σ = 0)."""
    _check_prediction(prediction)
    t = _t(t, x_t)
    return _TO_EPS[prediction](model_out, x_t, _coef(schedule.alpha(t), x_t), _coef(schedule.sigma(t), x_t))


def eps_from_x0(x0_hat: Tensor, x_t: Tensor, t: Tensor | int, schedule: NoiseSchedule) -> Tensor:
    """ε̂ consistent with a (possibly clipped) x̂0: ``(x_t - α_t x̂0) / σ_t``."""
    return predict_eps(x0_hat, x_t, t, schedule, "x0")


def min_snr_weight(t: Tensor, schedule: NoiseSchedule, prediction: Prediction, gamma: float) -> Tensor:
    """Per-sample min-SNR-γ loss weight (Hang et al. 2023, §3.4), float64 (B,)."""
    _check_prediction(prediction)
    snr = torch.exp(schedule.log_snr(t))
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def draw_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Uniform training timesteps t ~ U{0, …, T-1} (Ho et al. 2020, Algorithm 1), LongTensor (B,)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator)


def diffusion_loss(
    model_out: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    prediction: Prediction = "epsilon",
    *,
    min_snr_gamma: float | None = None,
    loss: LossKind = "mse",
) -> Tensor:
    """Denoising loss ``E_t w(t) ‖f(x_t, t) - target‖`` (Ho et al. 2020, eq. 14; weighting of Hang et al. 2023).

    Args:
        model_out: network output at x_t = q_sample(x0, t, noise), (B, C, *spatial).
        x0, noise: the clean data and the ε used to make x_t.
        t: (B,) timesteps.
        prediction: parameterisation of ``model_out``.
        min_snr_gamma: γ of min-SNR-γ weighting (5 in the paper); None = unweighted.
        loss: ``mse``, ``l1`` or ``huber`` (smooth L1, β = 1), averaged per sample then over the batch.

    Returns:
        Scalar loss (float32 even when model_out is bf16).
    """
    target = training_target(x0, noise, t, schedule, prediction)
    out, target = model_out.float(), target.float()
    if loss == "mse":
        per = F.mse_loss(out, target, reduction="none")
    elif loss == "l1":
        per = F.l1_loss(out, target, reduction="none")
    elif loss == "huber":
        per = F.smooth_l1_loss(out, target, reduction="none")
    else:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    per_sample = per.flatten(1).mean(1)
    if min_snr_gamma is not None:
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        w = min_snr_weight(torch.as_tensor(t, device=out.device), schedule, prediction, min_snr_gamma)
        per_sample = per_sample * w.to(per_sample)
    return per_sample.mean()
