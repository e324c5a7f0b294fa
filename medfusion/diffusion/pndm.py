"""Pseudo numerical methods for diffusion models: PLMS and F-PNDM (Liu et al., "Pseudo Numerical Methods for
Diffusion Models on Manifolds", ICLR 2022).

Both step the noise prediction ε̂ with the *transfer* φ(x_t, ε, t → s) of the paper's eq. 9 (algebraically the DDIM
step, Song et al. 2021, eq. 12 with η = 0)::

    x_s = sqrt(ᾱ_s/ᾱ_t) x_t - (ᾱ_s - ᾱ_t) ε / (ᾱ_t sqrt(1-ᾱ_s) + sqrt(ᾱ_t (1-ᾱ_t) ᾱ_s))

and differ in how ε is formed (eqs. 11-13):

* ``plms`` — pseudo linear multistep: the first step is the pseudo improved Euler method (one extra evaluation at
  the next timestep, ε = (e_0 + e_1)/2), then Adams-Bashforth of order 2, 3, 4 on the stored ε̂
  (``(3, -1)/2``, ``(23, -16, 5)/12``, ``(55, -59, 37, -9)/24``). This is the PLMS of latent diffusion and diffusers'
  ``PNDMScheduler(skip_prk_steps=True)``: ``N + 1`` network evaluations for ``N >= 2`` steps.
* ``pndm`` — F-PNDM: the first ``min(3, N - 1)`` steps are the pseudo Runge-Kutta method (four evaluations each, at t,
  twice at the midpoint ``t - (t - s) // 2`` and at s), then the fourth-order linear multistep; ``N + 9``
  evaluations for ``N >= 4`` (diffusers' ``PNDMScheduler(skip_prk_steps=False)``).

The multistep coefficients assume equally spaced steps (the paper's and diffusers'); the midpoint and every step go
to the next *listed* timestep, so any strictly descending list works (diffusers steps ``t - T//N``, which equals the
next listed timestep only for ``leading`` spacing). The final step goes to clean data (ᾱ = 1); it never needs an
evaluation at t = -1 (pseudo Runge-Kutta and the improved Euler start are not used on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from medfusion.diffusion.denoiser import Callback, DiffusionModel, make_denoiser, prepare_steps
from medfusion.diffusion.gaussian import Prediction
from medfusion.diffusion.schedules import NoiseSchedule

# Adams-Bashforth weights (newest first) by the number of stored ε̂ (PNDM eq. 12)
_AB: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def transfer(x: Tensor, eps: Tensor, a_t: float, a_s: float) -> Tensor:
    """PNDM eq. 9: move ``x`` at ᾱ_t to ᾱ_s along the DDIM direction of ``eps`` (ᾱ_s = 1: clean data)."""
    denom = a_t * math.sqrt(1 - a_s) + math.sqrt(a_t * (1 - a_t) * a_s)
    return math.sqrt(a_s / a_t) * x - ((a_s - a_t) / denom) * eps


def _linear_multistep(ets: list[Tensor]) -> Tensor:
    weights = _AB[len(ets)]
    out = weights[0] * ets[-1]
    for w, e in zip(weights[1:], reversed(ets[:-1])):
        out = out + w * e
    return out


def pndm_evaluations(num_steps: int, warmup: str) -> int:
    """Network evaluations of ``N`` steps: ``plms`` (``improved_euler``) N + 1, ``pndm`` (``runge_kutta``)
    N + 3 min(3, N - 1); one step is a single DDIM step (1)."""
    if num_steps <= 1:
        return num_steps
    if warmup == "improved_euler":
        return num_steps + 1
    return num_steps + 3 * min(3, num_steps - 1)


def _pndm(
    model: DiffusionModel,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    schedule: NoiseSchedule,
    prediction: Prediction,
    cond: Any,
    callback: Callback | None,
    clip: tuple[float, float] | None,
    threshold: float | None,
    warmup: str,
) -> Tensor:
    """Shared loop: ``warmup`` = ``improved_euler`` (PLMS) or ``runge_kutta`` (F-PNDM), then linear multistep."""
    out_dtype = x.dtype
    x, ts, ab = prepare_steps(x, timesteps, schedule)
    denoise = make_denoiser(model, schedule, prediction, cond, clip, threshold)
    n = len(ts)
    rk_steps = min(3, n - 1) if warmup == "runge_kutta" else 0
    ets: list[Tensor] = []  # ε̂ at the start of each step, newest last
    for i, t in enumerate(ts):
        d = denoise(x, t)
        if callback is not None:
            callback(i, t, x, d.x0)
        a_t, a_s = ab[i], ab[i + 1]
        ets = (ets + [d.eps])[-4:]
        if i < rk_steps:
            # 1. pseudo Runge-Kutta (eq. 13): e1 at t, e2 and e3 at the midpoint m, e4 at s, all from x_t
            m = t - (t - ts[i + 1]) // 2
            a_m = schedule.alphas_cumprod[m].item()
            e2 = denoise(transfer(x, d.eps, a_t, a_m), m).eps
            e3 = denoise(transfer(x, e2, a_t, a_m), m).eps
            e4 = denoise(transfer(x, e3, a_t, a_s), ts[i + 1]).eps
            x = transfer(x, (d.eps + 2 * e2 + 2 * e3 + e4) / 6, a_t, a_s)
        elif i == 0 and warmup == "improved_euler" and n > 1:
            # 2. pseudo improved Euler (eq. 11): e' = (e_t + e_s(φ(x_t, e_t))) / 2
            e_s = denoise(transfer(x, d.eps, a_t, a_s), ts[1]).eps
            x = transfer(x, (d.eps + e_s) / 2, a_t, a_s)
        else:
            # 3. linear multistep on the stored ε̂ (eq. 12; lower orders until four are stored)
            x = transfer(x, _linear_multistep(ets), a_t, a_s)
    return x.to(out_dtype)


def sample_plms(
    model: DiffusionModel,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    schedule: NoiseSchedule,
    prediction: Prediction = "epsilon",
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip: tuple[float, float] | None = None,
    threshold: float | None = None,
) -> Tensor:
    """PLMS (Liu et al. 2022, pseudo improved Euler start + linear multistep); N + 1 evaluations; deterministic."""
    return _pndm(
        model, x, timesteps, schedule=schedule, prediction=prediction, cond=cond, callback=callback, clip=clip,
        threshold=threshold, warmup="improved_euler",
    )  # fmt: skip


def sample_pndm(
    model: DiffusionModel,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    schedule: NoiseSchedule,
    prediction: Prediction = "epsilon",
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip: tuple[float, float] | None = None,
    threshold: float | None = None,
) -> Tensor:
    """F-PNDM (Liu et al. 2022, pseudo Runge-Kutta for three steps + fourth-order linear multistep); N + 9
    evaluations for N >= 4; deterministic."""
    return _pndm(
        model, x, timesteps, schedule=schedule, prediction=prediction, cond=cond, callback=callback, clip=clip,
        threshold=threshold, warmup="runge_kutta",
    )  # fmt: skip
