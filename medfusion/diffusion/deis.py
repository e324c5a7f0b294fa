"""DEIS: the diffusion exponential integrator sampler with the ``tAB`` multistep, polynomials in log ρ
(Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023, §4 "tAB-DEIS", and the
``logrho`` variant of the authors' code and of diffusers' ``DEISMultistepScheduler``).

With ρ = σ/α the probability-flow ODE is exactly ``d(x/α) = ε(x, ρ) dρ`` (the exponential integrator removes the
linear part), so one step from ρ_t to ρ_s is::

    x_s / α_s = x_t / α_t + ∫_{ρ_t}^{ρ_s} ε(ρ) dρ

with ε replaced by the Lagrange polynomial, in log ρ, through the last ``k`` noise predictions (order ``k`` = 1, 2,
3). Its weights are closed-form antiderivatives (:func:`_weights`); order 1 is DDIM. The orders ramp 1, 2, …,
``order`` over the first steps; with ``lower_order_final`` and fewer than 15 steps the last step is first order and
the second-to-last at most second order (diffusers' rule). The final step goes to clean data, ρ = 0, where every
antiderivative tends to 0.
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


def _antiderivative(rho: float, nodes: Sequence[float]) -> float:
    """``∫ ℓ_0(log r) dr`` at ``rho`` for the Lagrange basis polynomial ℓ_0 in L = log r that is 1 at
    ``log nodes[0]`` and 0 at the other nodes (one or two of them); 0 at ρ = 0 (its limit)."""
    if rho == 0.0:
        return 0.0
    L = math.log(rho)
    lb, *others = (math.log(v) for v in nodes)
    if not others:
        return rho
    if len(others) == 1:
        (lc,) = others
        # ∫ (L - lc) / (lb - lc) dρ = ρ (L - lc - 1) / (lb - lc)
        return rho * (L - lc - 1) / (lb - lc)
    lc, ld = others
    # ∫ (L - lc)(L - ld) dρ = ρ [(L² - 2L + 2) - (lc + ld)(L - 1) + lc ld]
    return rho * ((L * L - 2 * L + 2) - (lc + ld) * (L - 1) + lc * ld) / ((lb - lc) * (lb - ld))


def _weights(rho_t: float, rho_s: float, rhos: Sequence[float]) -> list[float]:
    """Weights of ε̂ at ``rhos`` (newest first) in ``∫_{ρ_t}^{ρ_s} p(ρ) dρ``, p the Lagrange interpolant in log ρ."""
    out = []
    for j, r in enumerate(rhos):
        nodes = [r, *(q for k, q in enumerate(rhos) if k != j)]
        out.append(_antiderivative(rho_s, nodes) - _antiderivative(rho_t, nodes))
    return out


def sample_deis(
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
    order: int = 3,
    lower_order_final: bool = True,
) -> Tensor:
    """DEIS-tAB in log ρ (Zhang & Chen 2023), ``order`` 1-3 (diffusers' default is 2, the paper's best 3);
    deterministic (``generator`` unused), one evaluation per step."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    out_dtype = x.dtype
    x, ts, ab = prepare_steps(x, timesteps, schedule)
    denoise = make_denoiser(model, schedule, prediction, cond, clip, threshold)
    n = len(ts)
    rho = [math.sqrt((1 - a) / a) for a in ab]  # ρ = σ/α of each step; 0 at the clean end point
    eps: list[Tensor] = []  # ε̂ of the last steps, newest last
    for i, t in enumerate(ts):
        d = denoise(x, t)
        if callback is not None:
            callback(i, t, x, d.x0)
        eps = (eps + [d.eps])[-order:]
        # 1. order of this step: ramp up, then lower near the end for short runs
        k = len(eps)
        if lower_order_final and n < 15:
            k = min(k, n - i)
        # 2. x_s/α_s = x_t/α_t + Σ_j w_j ε̂_j, weights from the log-ρ Lagrange polynomial through ρ_{i}, ρ_{i-1}, …
        w = _weights(rho[i], rho[i + 1], [rho[i - j] for j in range(k)])
        y = x / math.sqrt(ab[i])
        for j in range(k):
            y = y + w[j] * eps[-1 - j]
        x = math.sqrt(ab[i + 1]) * y
    return x.to(out_dtype)
