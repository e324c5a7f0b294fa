"""Residual denoising diffusion (RDDM; Liu et al., "Residual Denoising Diffusion Models", CVPR 2024).

Pure torch math, no networks and no Lightning: schedules, the forward process, the posterior, the
parameterisation adapters and the DDIM-like few-step sampler. Written by hand because no maintained
library implements RDDM's two-coefficient process (diffusers/MONAI schedulers are one-coefficient
``sqrt(a)·x0 + sqrt(1-a)·ε``); facts and numbers follow the official code (``nachifur/RDDM``, restoration
experiment ``2_Image_Restoration_deraing_raindrop_noise1``).

Notation (paper time ``t = 1..T``; code index ``k = t - 1 ∈ {0..T-1}``, used everywhere below):

* ``I_0`` clean target, ``I_in`` degraded input, ``I_res = I_in - I_0`` the residual;
* per step ``I_t = I_{t-1} + α_t·I_res + β_t·ε_{t-1}`` and the marginal (paper Eq. 5 form)
  ``I_t = I_0 + ᾱ_t·I_res + β̄_t·ε`` with ``ᾱ_t = Σ_{i≤t} α_i`` and ``β̄_t² = Σ_{i≤t} β_i²``;
* sum constraint: ``ᾱ_T = 1`` and ``β̄_T² = sum_scale`` (1 for generation-like tasks, 0.01 for
  restoration), so ``I_T = I_in + β̄_T·ε``.

Images are normalised to [-1, 1]; the sampler clips ``Î_res`` *and* ``Î_0`` to ``clip`` (default
(-1, 1), as the official code does, although ``I_res ∈ [-2, 2]``; widen it for large residuals).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

WeightShape = Literal[
    "linear_increasing", "linear_decreasing", "power_increasing", "power_decreasing", "average", "normal"
]
Objective = Literal["res_noise", "res", "noise", "x0_noise"]

#: number of network output heads (each with the image's channel count) per objective
NUM_HEADS: dict[str, int] = {"res_noise": 2, "res": 1, "noise": 1, "x0_noise": 2}


def _check(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(options)}")


def schedule_weights(
    num_timesteps: int, shape: WeightShape, ratio: float = 1.0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Per-step weights summing to 1 (RDDM ``gen_coefficients``), shape ``(T,)``.

    ``linear_increasing`` is ``w_t ∝ t`` and ``linear_decreasing`` ``w_t ∝ T + 1 - t`` (restoration
    experiment: α decreasing, β² increasing). ``power_*`` are the later forks' ``linspace(0, 1, T)**ratio``
    (first increasing weight exactly 0) and its flip; ``average`` is ``1/T``; ``normal`` a Gaussian pdf on
    [-3, 3].
    """
    _check("shape", shape, get_args(WeightShape))
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    t = torch.arange(1, num_timesteps + 1, dtype=dtype)
    if shape == "linear_increasing":
        w = t
    elif shape == "linear_decreasing":
        w = num_timesteps + 1 - t
    elif shape in ("power_increasing", "power_decreasing"):
        w = torch.linspace(0, 1, num_timesteps, dtype=dtype) ** ratio
        if shape == "power_decreasing":
            w = w.flip(0)
    elif shape == "average":
        w = torch.ones(num_timesteps, dtype=dtype)
    else:  # normal
        x = torch.linspace(-3, 3, num_timesteps, dtype=dtype)
        w = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    return w / w.sum()


@dataclass(frozen=True)
class ResidualSchedule:
    """Cumulative RDDM coefficients indexed by code step ``k = 0..T-1``.

    Attributes:
        alphas_cumsum: ``ᾱ`` (T,), the residual weight at each step.
        betas2_cumsum: ``β̄²`` (T,), the noise variance at each step.
    """

    alphas_cumsum: Tensor
    betas2_cumsum: Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumsum.shape[0])

    @property
    def alphas(self) -> Tensor:
        """Per-step ``α_t = ᾱ_t - ᾱ_{t-1}``."""
        return torch.diff(self.alphas_cumsum, prepend=self.alphas_cumsum.new_zeros(1))

    @property
    def betas2(self) -> Tensor:
        """Per-step ``β_t² = β̄_t² - β̄_{t-1}²``."""
        return torch.diff(self.betas2_cumsum, prepend=self.betas2_cumsum.new_zeros(1))

    @property
    def betas_cumsum(self) -> Tensor:
        """``β̄`` (T,)."""
        return self.betas2_cumsum.sqrt()

    def at(self, k: int | Tensor) -> tuple[Tensor, Tensor]:
        """``(ᾱ, β̄)`` at code index ``k``; ``k = -1`` (the end of sampling) gives ``(0, 0)``."""
        k = torch.as_tensor(k, device=self.alphas_cumsum.device)
        a = torch.where(k >= 0, self.alphas_cumsum[k.clamp(min=0)], torch.zeros_like(self.alphas_cumsum[0]))
        b2 = torch.where(k >= 0, self.betas2_cumsum[k.clamp(min=0)], torch.zeros_like(self.betas2_cumsum[0]))
        return a, b2.sqrt()

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ResidualSchedule:
        return ResidualSchedule(self.alphas_cumsum.to(device, dtype), self.betas2_cumsum.to(device, dtype))


def residual_schedule(
    num_timesteps: int = 1000,
    alpha_shape: WeightShape = "linear_decreasing",
    beta_shape: WeightShape = "linear_increasing",
    sum_scale: float = 1.0,
    ratio: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> ResidualSchedule:
    """Sum-constrained RDDM schedule: ``Σα = 1`` and ``Σβ² = sum_scale = β̄_T²``.

    Defaults are the restoration experiment's (α linear decreasing, β² linear increasing), giving
    ``ᾱ_t = t(2T+1-t)/(T(T+1))`` and ``β̄_t² = s·t(t+1)/(T(T+1))``. Use ``sum_scale=0.01`` for
    restoration (the official default when conditioning on ``I_in``), 1 for generation. Both cumulative sums
    are clipped to [0, 1] as in the official code.
    """
    if not 0.0 < sum_scale <= 1.0:
        raise ValueError(f"sum_scale (β̄_T²) must be in (0, 1], got {sum_scale}")
    alphas = schedule_weights(num_timesteps, alpha_shape, ratio, dtype)
    betas2 = schedule_weights(num_timesteps, beta_shape, ratio, dtype) * sum_scale
    return ResidualSchedule(alphas.cumsum(0).clamp(0, 1), betas2.cumsum(0).clamp(0, 1))


def schedule_from_ddpm(alphas_cumprod: Tensor) -> ResidualSchedule:
    """RDDM coefficients equivalent to a DDPM/DDIM schedule ``ā`` (RDDM §"coefficient transformation").

    ``ᾱ_t = 1 - sqrt(ā_t)`` and ``β̄_t² = 1 - ā_t``; with ``I_in = 0`` the marginal is DDPM's
    ``sqrt(ā_t)·I_0 + sqrt(1-ā_t)·ε``. The sum constraint does not hold here (``ᾱ_T < 1``).
    """
    return ResidualSchedule(1.0 - alphas_cumprod.sqrt(), 1.0 - alphas_cumprod)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a scalar or (B,) coefficient to broadcast against ``x`` (B, C, *spatial)."""
    v = v.to(device=x.device, dtype=x.dtype)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v


def q_sample(x0: Tensor, x_in: Tensor, t: Tensor, schedule: ResidualSchedule, noise: Tensor) -> Tensor:
    """Marginal ``I_t = I_0 + ᾱ_t·(I_in - I_0) + β̄_t·ε``.

    Args:
        x0: clean image ``I_0`` (B, C, *spatial).
        x_in: degraded image ``I_in`` (B, C, *spatial); zeros for generation.
        t: integer code indices (B,) in ``0..T-1``.
        noise: ``ε`` like ``x0``.
    """
    a, b = schedule.at(t)
    return x0 + _bcast(a, x0) * (x_in - x0) + _bcast(b, x0) * noise


class PosteriorCoefficients(NamedTuple):
    """``q(I_{t-1} | I_t, I_0, I_res) = N(coef1·I_t + coef2·I_res + coef3·I_0, variance)``, each (T,)."""

    coef1: Tensor
    coef2: Tensor
    coef3: Tensor
    variance: Tensor


def posterior_coefficients(schedule: ResidualSchedule) -> PosteriorCoefficients:
    """RDDM posterior (official ``posterior_mean_coef1..3``, ``posterior_variance``).

    mean ``= (β̄²_{t-1}/β̄²_t)·I_t + ((β_t²ᾱ_{t-1} - β̄²_{t-1}α_t)/β̄²_t)·I_res + (β_t²/β̄²_t)·I_0``,
    variance ``= β_t²·β̄²_{t-1}/β̄²_t``.
    """
    a_bar, b2_bar = schedule.alphas_cumsum, schedule.betas2_cumsum
    a_prev = torch.cat([a_bar.new_zeros(1), a_bar[:-1]])
    b2_prev = torch.cat([b2_bar.new_zeros(1), b2_bar[:-1]])
    alphas, betas2 = schedule.alphas, schedule.betas2
    return PosteriorCoefficients(
        coef1=b2_prev / b2_bar,
        coef2=(betas2 * a_prev - b2_prev * alphas) / b2_bar,
        coef3=betas2 / b2_bar,
        variance=betas2 * b2_prev / b2_bar,
    )


class ResidualPrediction(NamedTuple):
    """What one network evaluation says about the current state: ``Î_res``, ``ε̂`` and ``Î_0``."""

    res: Tensor
    noise: Tensor
    x0: Tensor


def _clip(x: Tensor, clip: tuple[float, float] | None) -> Tensor:
    return x if clip is None else x.clamp(clip[0], clip[1])


def predictions_from_output(
    objective: Objective,
    output: Tensor,
    x_t: Tensor,
    x_in: Tensor,
    t: Tensor,
    schedule: ResidualSchedule,
    clip: tuple[float, float] | None = (-1.0, 1.0),
) -> ResidualPrediction:
    """Map the network heads to ``(Î_res, ε̂, Î_0)`` (official ``model_predictions``).

    Args:
        objective: ``res_noise`` (SM-Res-N, heads ``[I_res, ε]``), ``res`` (SM-Res, ε derived),
            ``noise`` (SM-N, residual derived) or ``x0_noise`` (heads ``[I_0, ε]``).
        output: network output (B, NUM_HEADS[objective]·C, *spatial), heads stacked along channels.
        x_t, x_in: current state and degraded input (B, C, *spatial).
        t: code indices (B,) or a scalar index.
        clip: clamp range applied to ``Î_res`` and ``Î_0`` (None disables it).
    """
    _check("objective", objective, get_args(Objective))
    heads = output.chunk(NUM_HEADS[objective], dim=1)
    a, b = schedule.at(t)
    a, b = _bcast(a, x_t), _bcast(b, x_t)
    if objective == "res_noise":
        res, noise = _clip(heads[0], clip), heads[1]
        x0 = _clip(x_t - a * res - b * noise, clip)
    elif objective == "res":
        res = _clip(heads[0], clip)
        noise = (x_t - x_in - (a - 1) * res) / b
        x0 = _clip(x_in - res, clip)
    elif objective == "noise":
        noise = heads[0]
        denom = torch.where(1 - a == 0, torch.full_like(a, 1e-6), 1 - a)  # ill-posed at t = T (ᾱ_T = 1)
        x0 = _clip((x_t - a * x_in - b * noise) / denom, clip)
        res = _clip(x_in - x0, clip)
    else:  # x0_noise
        x0, noise = _clip(heads[0], clip), heads[1]
        res = _clip(x_in - x0, clip)
    return ResidualPrediction(res, noise, x0)


def loss_targets(objective: Objective, x0: Tensor, x_in: Tensor, noise: Tensor) -> Tensor:
    """Regression targets stacked along channels like the network heads (official ``p_losses``)."""
    _check("objective", objective, get_args(Objective))
    res = x_in - x0
    targets = {"res_noise": (res, noise), "res": (res,), "noise": (noise,), "x0_noise": (x0, noise)}[
        objective
    ]
    return torch.cat(targets, dim=1)


def sampling_timesteps(num_steps: int, num_timesteps: int = 1000) -> list[tuple[int, int]]:
    """Pairs ``(t, s)`` of the few-step sampler: ``reversed(int(linspace(-1, T-1, S+1)))``.

    S=5, T=1000 gives (999, 799), (799, 599), (599, 399), (399, 199), (199, -1); ``s = -1`` marks the last step.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_timesteps}, got {num_steps}")
    times = list(reversed(torch.linspace(-1, num_timesteps - 1, steps=num_steps + 1).int().tolist()))
    return list(zip(times[:-1], times[1:]))


def step_variance(schedule: ResidualSchedule, t: int, s: int, eta: float) -> Tensor:
    """``σ² = η·(β̄_t² - β̄_s²)·β̄_s²/β̄_t²``: η enters linearly (DDIM uses η²); 0 at the last step."""
    _, b_t = schedule.at(t)
    _, b_s = schedule.at(s)
    return eta * (b_t**2 - b_s**2) * b_s**2 / b_t**2


def ddim_step(
    x_t: Tensor,
    pred: ResidualPrediction,
    t: int,
    s: int,
    schedule: ResidualSchedule,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One RDDM sampling step ``I_t → I_s`` (official ``ddim_sample`` update).

    1. ``σ² = η·(β̄_t² - β̄_s²)·β̄_s²/β̄_t²``;
    2. ``I_s = I_t - (ᾱ_t - ᾱ_s)·Î_res - (β̄_t - sqrt(β̄_s² - σ²))·ε̂ + σ·z``;
    3. at the last step (``s = -1``) the result is ``Î_0`` (clipped as the prediction was).
    """
    if s < 0:
        return pred.x0
    a_t, b_t = schedule.at(t)
    a_s, b_s = schedule.at(s)
    var = step_variance(schedule, t, s, eta)
    out = x_t - (a_t - a_s).to(x_t) * pred.res - (b_t - (b_s**2 - var).sqrt()).to(x_t) * pred.noise
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor z")
        out = out + var.sqrt().to(x_t) * noise
    return out


ResidualModel = Callable[[Tensor, Tensor, Tensor], Tensor]


def sample_rddm(
    model: ResidualModel,
    x_in: Tensor,
    schedule: ResidualSchedule,
    num_steps: int,
    *,
    objective: Objective = "res_noise",
    eta: float = 0.0,
    clip: tuple[float, float] | None = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    callback: Callable[[int, Tensor, ResidualPrediction], None] | None = None,
) -> Tensor:
    """Few-step RDDM sampler from ``I_T = I_in + β̄_T·z`` (S network calls).

    Args:
        model: ``model(x_t, t, x_in) -> (B, NUM_HEADS[objective]·C, *spatial)`` with ``t`` integer code
            indices (B,). For 3D volumes wrap the network in a sliding-window inferer here, so the window
            blending happens inside every step.
        x_in: degraded input (B, C, *spatial) in [-1, 1] (zeros for generation).
        num_steps: S; the time pairs come from :func:`sampling_timesteps`.
        eta: stochasticity (0 = deterministic, the official restoration setting).
        generator: seeds the start noise and the per-step noise.
        noise: optional start noise ``z`` (overrides the generator for ``I_T``).
        callback: called as ``callback(step_index, x_t, prediction)`` after each network call.

    Returns:
        ``Î_0`` (B, C, *spatial).
    """
    if noise is None:
        noise = torch.randn(x_in.shape, generator=generator, dtype=x_in.dtype, device="cpu").to(x_in.device)
    _, b_T = schedule.at(schedule.num_timesteps - 1)
    x = x_in + b_T.to(x_in) * noise
    for i, (t, s) in enumerate(sampling_timesteps(num_steps, schedule.num_timesteps)):
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        pred = predictions_from_output(objective, model(x, t_vec, x_in), x, x_in, t_vec, schedule, clip)
        if callback is not None:
            callback(i, x, pred)
        z = None
        if eta > 0 and s >= 0:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        x = ddim_step(x, pred, t, s, schedule, eta, z)
    return x


def clip_range(clip: float | Sequence[float] | None) -> tuple[float, float] | None:
    """Normalise a clip argument: ``1.0 → (-1, 1)``, ``(lo, hi)`` kept, ``None`` disables clipping."""
    if clip is None:
        return None
    if isinstance(clip, (int, float)):
        if clip <= 0:
            raise ValueError(f"clip must be positive, got {clip}")
        return (-float(clip), float(clip))
    lo, hi = (float(c) for c in clip)
    if lo >= hi:
        raise ValueError(f"clip range must have lo < hi, got {clip}")
    return (lo, hi)
