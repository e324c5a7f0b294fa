"""Reverse-diffusion samplers as plain functions with one signature.

Model contract: ``model(x_t, t, cond) -> raw network output`` with ``t`` a LongTensor (B,) and ``cond`` passed through
unchanged (may be None). The output's parameterisation (``epsilon``/``v``/``x0``) is converted to (x̂0, ε̂) by a
small adapter (:func:`make_denoiser`), never by branching on model types.

Every sampler::

    sample_<name>(model, x, timesteps, *, schedule, prediction="epsilon", cond=None, generator=None,
                  callback=None, clip=None, threshold=None, **options) -> Tensor

``x`` is the sample at ``timesteps[0]`` (pure noise when it is T-1, a noised image for SDEdit); the sampler steps
along the strictly descending ``timesteps`` and finally to t = -1 (clean data, ᾱ = 1), making
``len(timesteps)`` network calls (:func:`network_evaluations`: more for the PNDM warm-ups), and returns the data
sample. ``callback(i, t, x, x0_hat)`` is called once per step
with the sample at ``t`` and its data prediction. The sampler math runs in at least float32 (bf16 inputs are promoted;
the model may still run under bf16 autocast) and the result is cast back to ``x.dtype``. Samplers do not disable
autograd: wrap calls in ``torch.no_grad()`` unless you backpropagate through sampling (DiffIR).

Implemented (notation: α = sqrt(ᾱ), σ = sqrt(1-ᾱ), λ = log(α/σ)):

* ``ddpm`` — ancestral sampling (Ho et al., NeurIPS 2020, eqs. 6-7) with the posterior q(x_s | x_t, x0) of the
  *actual* next timestep s (β' = 1 - ᾱ_t/ᾱ_s), so it is exact for any subset of timesteps (MONAI's uses t-1).
* ``ddim`` — Song et al., "Denoising Diffusion Implicit Models", ICLR 2021, eq. 12 with η; the next timestep is the
  next entry of ``timesteps`` (diffusers and MONAI use t - T//N, wrong for linspace spacing: diffusers#12633).
* ``dpmpp_2m`` — DPM-Solver++(2M), Lu et al., arXiv 2211.01095, Algorithm 2 (data prediction, midpoint form),
  first order on the first step and on the final step to σ = 0.
* ``dpmpp_3m`` — third-order multistep DPM-Solver++ (same paper, App. B; the diffusers update), orders ramp 1, 2, 3;
  last step first order, second-to-last at most second order when N < 15 (``lower_order_final``).
* ``unipc`` — UniPC-p2 with the bh2 B(h) (Zhao et al., NeurIPS 2023, arXiv 2302.04867, Algorithms 1-2): the
  DPM-Solver++(2M) predictor plus the UniC-2 corrector that reuses the next model output (no extra NFE).
* ``plms``, ``pndm`` — PLMS and F-PNDM (Liu et al., ICLR 2022; :mod:`medfusion.diffusion.pndm`).
* ``deis`` — DEIS-tAB in log ρ, orders 1-3 (Zhang & Chen, ICLR 2023; :mod:`medfusion.diffusion.deis`).
* ``dpm_v3`` — DPM-Solver-v3, orders 1-3 with the pseudo-order corrector, on the model's empirical model statistics
  (``stats=``; Zheng et al., NeurIPS 2023; :mod:`medfusion.diffusion.dpm_v3`).

Wrappers: :func:`sample_time_shift` / :func:`time_shift_model` (Time-Shift sampler, Li et al., ICLR 2024;
:mod:`medfusion.diffusion.time_shift`) runs any of them with the network evaluated at a shifted timestep; DeepCache
(:mod:`medfusion.nets.deepcache`) is a network-side wrapper, so it works with every sampler too.

Why hand-written: MONAI has no DPM-Solver/UniPC and its DDPM/DDIM ``step()`` use t-1 / t-T//N; diffusers schedulers
are stateful objects with the same DDIM bug and are a test-only dependency here (they are the oracle in the tests).
Optional x̂0 post-processing: ``clip=(lo, hi)`` and ``threshold=p`` (dynamic thresholding, Saharia et al., Imagen,
NeurIPS 2022, §2.3: s = max(1, quantile_p |x̂0|), x̂0 ← clamp(x̂0, -s, s)/s); ε̂ is then recomputed from the clipped
x̂0 so the update stays on a consistent trajectory (diffusers' DDIM keeps the unclipped ε̂).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from medfusion.diffusion.deis import sample_deis
from medfusion.diffusion.denoiser import (
    Callback,
    Denoised,
    DiffusionModel,
    dynamic_threshold,
    make_denoiser,
    prepare_steps,
    randn_like,
)
from medfusion.diffusion.dpm_v3 import sample_dpm_v3
from medfusion.diffusion.gaussian import Prediction
from medfusion.diffusion.pndm import pndm_evaluations, sample_plms, sample_pndm
from medfusion.diffusion.schedules import NoiseSchedule
from medfusion.diffusion.time_shift import time_shift_model

_prepare, _randn = prepare_steps, randn_like

__all__ = [
    "SAMPLERS", "Callback", "Denoised", "DiffusionModel", "dynamic_threshold", "make_denoiser", "network_evaluations",
    "sample", "sample_ddim", "sample_ddpm", "sample_deis", "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_plms",
    "sample_pndm", "sample_time_shift", "sample_unipc", "time_shift_model", "sample_dpm_v3",
]  # fmt: skip


def sample_ddpm(
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
    variance: Literal["small", "large"] = "small",
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, eqs. 6-7), exact for any timestep subset.

    Args:
        variance: posterior variance ``small`` = β̃ = (1-ᾱ_s)/(1-ᾱ_t)·β' (diffusers ``fixed_small``) or
            ``large`` = β' (``fixed_large``), with β' = 1 - ᾱ_t/ᾱ_s for the jump t → s.
        Others: see the module docstring.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"unknown variance {variance!r}; valid: small, large")
    out_dtype = x.dtype
    x, ts, ab = _prepare(x, timesteps, schedule)
    denoise = make_denoiser(model, schedule, prediction, cond, clip, threshold)
    for i, t in enumerate(ts):
        d = denoise(x, t)
        if callback is not None:
            callback(i, t, x, d.x0)
        a_t, a_s = ab[i], ab[i + 1]
        beta = 1.0 - a_t / a_s
        # 1. posterior mean μ̃(x_t, x̂0) of q(x_s | x_t, x0) (Ho et al. eq. 7 with β' for the jump)
        mean = (math.sqrt(a_s) * beta / (1 - a_t)) * d.x0 + (math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t)) * x
        # 2. add noise except on the final step to clean data
        if i + 1 < len(ts):
            var = (1 - a_s) / (1 - a_t) * beta if variance == "small" else beta
            mean = mean + math.sqrt(max(var, 1e-20)) * _randn(x, generator)
        x = mean
    return x.to(out_dtype)


def sample_ddim(
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
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); ``eta=0`` is the deterministic probability-flow discretisation.

    Each step goes to the *next entry* of ``timesteps`` (regression for diffusers#12633 / MONAI's t - T//N).
    Noise is drawn (one ``randn`` of x's shape per step) only when η > 0 and the step is not the final one.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    out_dtype = x.dtype
    x, ts, ab = _prepare(x, timesteps, schedule)
    denoise = make_denoiser(model, schedule, prediction, cond, clip, threshold)
    for i, t in enumerate(ts):
        d = denoise(x, t)
        if callback is not None:
            callback(i, t, x, d.x0)
        a_t, a_s = ab[i], ab[i + 1]
        # 1. σ_η = η sqrt((1-ᾱ_s)/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_s)
        sig = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        # 2. x_s = sqrt(ᾱ_s) x̂0 + sqrt(1 - ᾱ_s - σ_η²) ε̂ + σ_η z
        x = math.sqrt(a_s) * d.x0 + math.sqrt(max(1 - a_s - sig**2, 0.0)) * d.eps
        if sig > 0:
            x = x + sig * _randn(x, generator)
    return x.to(out_dtype)


def _alpha_sigma_lambda(a_bar: float) -> tuple[float, float, float]:
    a, s = math.sqrt(a_bar), math.sqrt(1.0 - a_bar)
    return a, s, (math.log(a) - math.log(s)) if s > 0 else math.inf


def _dpmpp_multistep(
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
    order: int,
    lower_order_final: bool,
    corrector: bool = False,
) -> Tensor:
    """Shared loop of DPM-Solver++(2M/3M) and UniPC-2 (data prediction, exponential integrator in λ)."""
    out_dtype = x.dtype
    x, ts, ab = _prepare(x, timesteps, schedule)
    denoise = make_denoiser(model, schedule, prediction, cond, clip, threshold)
    n = len(ts)
    ms: list[Tensor] = []  # data predictions m_i, newest last
    lams: list[float] = []  # λ of the step where each m_i was evaluated
    x_prev: Tensor | None = None  # sample at the previous step (for the UniC corrector)
    for i, t in enumerate(ts):
        m = denoise(x, t).x0
        a_t, s_t, lam_t = _alpha_sigma_lambda(ab[i])
        if corrector and x_prev is not None:
            # UniC (bh2, B(h) = e^{-h} - 1): redo the previous step s_p -> t using m_i evaluated at the predicted x_t
            a_p, s_p, lam_p = _alpha_sigma_lambda(ab[i - 1])
            h = lam_t - lam_p
            b_h = math.expm1(-h)
            base = (s_t / s_p) * x_prev - a_t * b_h * ms[-1]
            if len(ms) >= 2:
                # UniC-2: rho solves [[1, 1], [r0, 1]] rho = g with g_k = k! phi_{k+1}(-h)-type terms / B(h)
                # (Zhao et al. 2023, Alg. 2; r0 < 0 so the system is never singular)
                r0 = (lams[-2] - lam_p) / h
                g1 = b_h / -h - 1
                g2 = g1 / -h - 0.5
                rhs1, rhs2 = g1 / b_h, 2 * g2 / b_h
                rho0 = (rhs1 - rhs2) / (1 - r0)
                rho1 = rhs1 - rho0
                x = base - a_t * b_h * (rho0 * (ms[-2] - ms[-1]) / r0 + rho1 * (m - ms[-1]))
            else:  # UniC-1 (rho = 1/2): trapezoid rule in the data prediction
                x = base - a_t * b_h * 0.5 * (m - ms[-1])
        if callback is not None:
            callback(i, t, x, m)
        ms.append(m)
        lams.append(lam_t)
        ms, lams = ms[-3:], lams[-3:]
        a_s, s_s, lam_s = _alpha_sigma_lambda(ab[i + 1])
        last = i == n - 1
        k = min(order, len(ms))
        if last:
            k = 1  # the final jump to σ = 0 has h = inf: only the first-order update is defined
        elif lower_order_final and n < 15 and i == n - 2:
            k = min(k, 2)
        x_prev = x
        if k == 1:
            # DDIM / first-order DPM-Solver++: x_s = (σ_s/σ_t) x_t + (α_s - α_t σ_s/σ_t) m  (= -α_s(e^{-h}-1) m)
            x = (s_s / s_t) * x + (a_s - a_t * s_s / s_t) * m
            continue
        h = lam_s - lam_t
        em1 = math.expm1(-h)  # e^{-h} - 1
        r0 = (lam_t - lams[-2]) / h
        d1_0 = (ms[-1] - ms[-2]) / r0
        if k == 2:
            # DPM-Solver++(2M) midpoint: D = m_i + (1/(2 r)) (m_i - m_{i-1})
            x = (s_s / s_t) * x - a_s * em1 * ms[-1] - 0.5 * a_s * em1 * d1_0
            continue
        # third order (diffusers multistep_dpm_solver_third_order_update, dpmsolver++)
        r1 = (lams[-2] - lams[-3]) / h
        d1_1 = (ms[-2] - ms[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        x = (
            (s_s / s_t) * x
            - a_s * em1 * ms[-1]
            + a_s * (em1 / h + 1.0) * d1
            - a_s * ((em1 + h) / h**2 - 0.5) * d2
        )
    return x.to(out_dtype)


def sample_dpmpp_2m(
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
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, midpoint form); deterministic (``generator`` unused)."""
    return _dpmpp_multistep(
        model, x, timesteps, schedule=schedule, prediction=prediction, cond=cond, callback=callback,
        clip=clip, threshold=threshold, order=2, lower_order_final=True,
    )  # fmt: skip


def sample_dpmpp_3m(
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
    lower_order_final: bool = True,
) -> Tensor:
    """Third-order multistep DPM-Solver++ (Lu et al. 2022); recommended for unconditional sampling only."""
    return _dpmpp_multistep(
        model, x, timesteps, schedule=schedule, prediction=prediction, cond=cond, callback=callback,
        clip=clip, threshold=threshold, order=3, lower_order_final=lower_order_final,
    )  # fmt: skip


def sample_unipc(
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
    """UniPC-2, bh2 (Zhao et al. 2023): DPM-Solver++(2M) predictor + UniC corrector (no extra NFE)."""
    return _dpmpp_multistep(
        model, x, timesteps, schedule=schedule, prediction=prediction, cond=cond, callback=callback,
        clip=clip, threshold=threshold, order=2, lower_order_final=True, corrector=True,
    )  # fmt: skip


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
    "plms": sample_plms,
    "pndm": sample_pndm,
    "deis": sample_deis,
    "dpm_v3": sample_dpm_v3,
}


def network_evaluations(name: str, num_steps: int) -> int:
    """Network evaluations (NFE) of sampler ``name`` for ``num_steps`` timesteps: ``num_steps`` except for the
    pseudo-numerical warm-ups (``plms``: N + 1, ``pndm``: N + 3 min(3, N - 1))."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    if name in ("plms", "pndm"):
        return pndm_evaluations(num_steps, "improved_euler" if name == "plms" else "runge_kutta")
    return num_steps


def sample(
    name: str, model: DiffusionModel, x: Tensor, timesteps: Tensor | Sequence[int], **kw: Any
) -> Tensor:
    """Run the sampler registered as ``name`` (see :data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](model, x, timesteps, **kw)


def sample_time_shift(
    model: DiffusionModel,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    schedule: NoiseSchedule,
    prediction: Prediction = "epsilon",
    base: str = "ddim",
    window: int = 10,
    cutoff: int = 300,
    data_variance: float = 0.0,
    **kw: Any,
) -> Tensor:
    """Time-Shift sampling (Li et al., ICLR 2024): the sampler ``base`` (any :data:`SAMPLERS` name) run on
    :func:`~medfusion.diffusion.time_shift.time_shift_model`; ``window``, ``cutoff``, ``data_variance`` as there,
    the other keywords (``cond``, ``generator``, ``callback``, ...) go to ``base``."""
    if base not in SAMPLERS:
        raise ValueError(f"unknown base sampler {base!r}; valid: {', '.join(SAMPLERS)}")
    shifted = time_shift_model(
        model, schedule, prediction=prediction, window=window, cutoff=cutoff, data_variance=data_variance
    )
    return SAMPLERS[base](shifted, x, timesteps, schedule=schedule, prediction=prediction, **kw)
