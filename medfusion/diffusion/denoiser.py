"""The sampler contract shared by every sampler in :mod:`medfusion.diffusion.samplers`.

``model(x_t, t, cond) -> raw output`` (ε, v or x0) is wrapped by :func:`make_denoiser` into
``denoise(x_t, t) -> Denoised(x0, eps)`` (the parameterisation adapter of :mod:`medfusion.diffusion.gaussian`, with
optional x̂0 clipping / Imagen dynamic thresholding); :func:`prepare_steps` validates a timestep list and returns the
ᾱ of every step plus the clean end point (t = -1, ᾱ = 1). Samplers in several files import these, and
:mod:`medfusion.diffusion.samplers` re-exports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from medfusion.diffusion.gaussian import Prediction, output_to_eps, output_to_x0
from medfusion.diffusion.schedules import NoiseSchedule

Callback = Callable[[int, int, Tensor, Tensor], None]


class DiffusionModel(Protocol):
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any, /) -> Tensor: ...


class Denoised(NamedTuple):
    """Data and noise predictions at one step."""

    x0: Tensor
    eps: Tensor


def _check_clip(clip: tuple[float, float] | None, threshold: float | None) -> None:
    if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
        raise ValueError(f"clip must be None or (lo, hi) with lo < hi, got {clip!r}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a quantile in (0, 1], got {threshold}")


def dynamic_threshold(x0: Tensor, quantile: float) -> Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022, §2.3), per sample over all non-batch dims."""
    flat = x0.float().abs().flatten(1)
    s = torch.quantile(flat, quantile, dim=1).clamp(min=1.0)
    s = s.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def make_denoiser(
    model: DiffusionModel,
    schedule: NoiseSchedule,
    prediction: Prediction = "epsilon",
    cond: Any = None,
    clip: tuple[float, float] | None = None,
    threshold: float | None = None,
) -> Callable[[Tensor, int], Denoised]:
    """Wrap a raw network into ``denoise(x_t, t) -> Denoised(x0, eps)`` (the parameterisation adapter)."""
    _check_clip(clip, threshold)
    abar = schedule.alphas_cumprod.cpu().tolist()

    def denoise(x: Tensor, t: int) -> Denoised:
        a, s = math.sqrt(abar[t]), math.sqrt(1.0 - abar[t])
        tb = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = model(x, tb, cond).to(x.dtype)
        x0 = output_to_x0(out, x, a, s, prediction)
        if threshold is None and clip is None:
            return Denoised(x0, output_to_eps(out, x, a, s, prediction))
        if threshold is not None:
            x0 = dynamic_threshold(x0, threshold)
        if clip is not None:
            x0 = x0.clamp(clip[0], clip[1])
        return Denoised(x0, (x - a * x0) / s)

    return denoise


def prepare_steps(
    x: Tensor, timesteps: Tensor | Sequence[int], schedule: NoiseSchedule
) -> tuple[Tensor, list[int], list[float]]:
    """``(x in >= float32, timesteps as ints, [ᾱ_t for each step] + [1.0])``; ValueError unless strictly descending
    integers in [0, T-1]."""
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)]
    T = schedule.num_train_timesteps
    if len(ts) == 0:
        raise ValueError("timesteps must not be empty")
    if any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0 or ts[0] > T - 1:
        raise ValueError(f"timesteps must be strictly descending integers in [0, {T - 1}], got {ts}")
    abar = schedule.alphas_cumprod.cpu().tolist()
    ab = [abar[t] for t in ts] + [1.0]  # ᾱ of each step and of the clean end point t = -1
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return work, ts, ab


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of x's shape and dtype, drawn on the generator's device, moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
