"""Discrete variance-preserving noise schedules and sampling-timestep spacings.

Notation (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020, eq. 4): ``x_t = α_t x0 + σ_t ε`` with
``α_t = sqrt(ᾱ_t)``, ``σ_t = sqrt(1 - ᾱ_t)``, ``ᾱ_t = Π_{s<=t} (1 - β_s)`` and ``t ∈ {0, …, T-1}``.
We extend the table with ``t = -1`` meaning *clean data* (``ᾱ = 1``, ``σ = 0``): every sampler's last step goes there.

Beta schedules: ``linear`` (Ho et al. 2020), ``scaled_linear`` (linear in sqrt(β), Rombach et al. LDM 2022),
``cosine`` (Nichol & Dhariwal, "Improved DDPM", ICML 2021, eq. 17 with s = 0.008, β clipped at 0.999).

Timestep spacings (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024, Table 2):
``linspace``, ``leading``, ``trailing``; and ``logsnr`` (uniform in λ = log(α/σ), Lu et al., DPM-Solver, NeurIPS
2022, §3.3 / "logSNR" steps). Why hand-written: MONAI's schedulers expose no spacing option and couple the table to a
stateful ``step()`` whose previous timestep is ``t - T//N`` (off the table for uneven spacings); diffusers is a
test-only dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
Spacing = Literal["linspace", "leading", "trailing", "logsnr"]
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "cosine")
SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing", "logsnr")


def make_betas(
    kind: BetaSchedule = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Tensor:
    """Return the (T,) float64 β_t table of a named schedule.

    Args:
        kind: ``linear`` (β linear in t), ``scaled_linear`` (sqrt(β) linear in t) or ``cosine``
            (ᾱ_t = cos²(((t+1)/T + s)/(1 + s)·π/2) normalised by its value at 0; ``beta_start/end`` unused).
        num_train_timesteps: T.
        beta_start, beta_end: first and last β for the linear schedules.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    T = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")


@dataclass
class NoiseSchedule:
    """A discrete VP schedule: β_t and ᾱ_t (float64, shape (T,)).

    ``alpha(t)``, ``sigma(t)`` and ``log_snr(t)`` take an integer tensor of timesteps (any shape) in
    ``{-1, 0, …, T-1}``; ``t = -1`` is clean data (α = 1, σ = 0, log-SNR = +inf).
    """

    betas: Tensor
    alphas_cumprod: Tensor
    num_train_timesteps: int

    @classmethod
    def create(
        cls, kind: BetaSchedule = "linear", num_train_timesteps: int = 1000, **kw: float
    ) -> NoiseSchedule:
        """Build from a named beta schedule (see :func:`make_betas`)."""
        return cls.from_betas(make_betas(kind, num_train_timesteps, **kw))

    @classmethod
    def from_betas(cls, betas: Tensor | np.ndarray) -> NoiseSchedule:
        """Build from an explicit β table (e.g. a trained/rescaled one); ᾱ is its cumulative product in float64."""
        b = torch.as_tensor(betas, dtype=torch.float64)
        if b.ndim != 1 or b.numel() < 1 or bool(((b <= 0) | (b >= 1)).any()):
            raise ValueError("betas must be a non-empty 1-D table with 0 < beta < 1")
        return cls(betas=b, alphas_cumprod=torch.cumprod(1 - b, 0), num_train_timesteps=int(b.numel()))

    def _abar(self, t: Tensor | int) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.long)
        table = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod]).to(t.device)
        if bool(((t < -1) | (t >= self.num_train_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.num_train_timesteps - 1}]")
        return table[t + 1]

    def alphas_cumprod_at(self, t: Tensor | int) -> Tensor:
        """ᾱ_t (float64), with ᾱ_{-1} = 1."""
        return self._abar(t)

    def alpha(self, t: Tensor | int) -> Tensor:
        """Signal scale α_t = sqrt(ᾱ_t) (float64)."""
        return self._abar(t).sqrt()

    def sigma(self, t: Tensor | int) -> Tensor:
        """Noise scale σ_t = sqrt(1 - ᾱ_t) (float64)."""
        return (1 - self._abar(t)).sqrt()

    def log_snr(self, t: Tensor | int) -> Tensor:
        """Log signal-to-noise ratio log(ᾱ_t / (1 - ᾱ_t)) = 2λ_t (float64; +inf at t = -1)."""
        ab = self._abar(t)
        return torch.log(ab) - torch.log1p(-ab)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Copy of the schedule with its tables on ``device`` (kept in float64)."""
        return NoiseSchedule(self.betas.to(device), self.alphas_cumprod.to(device), self.num_train_timesteps)


def _strictly_descending(t: np.ndarray, top: int) -> np.ndarray:
    """Make rounded steps strictly descending inside [0, top] without changing their count."""
    t = np.clip(t.astype(np.int64), 0, top)
    for i in range(1, len(t)):
        t[i] = min(t[i], t[i - 1] - 1)
    t[-1] = max(t[-1], 0)
    for i in range(len(t) - 2, -1, -1):
        t[i] = max(t[i], t[i + 1] + 1)
    return t


def timesteps(
    num_steps: int,
    spacing: Spacing = "trailing",
    num_train_timesteps: int = 1000,
    *,
    t_start: int | None = None,
    schedule: NoiseSchedule | None = None,
) -> Tensor:
    """Descending (N,) LongTensor of sampling timesteps; a sampler steps along it, then to t = -1 (clean).

    Args:
        num_steps: N, the number of network evaluations; 1 <= N <= t_start + 1.
        spacing: ``linspace`` (round(linspace(t_start, 0, N)), first step at t_start),
            ``leading`` (k·((t_start+1)//N); diffusers DDIM default, does *not* start at T-1),
            ``trailing`` (round(arange(t_start+1, 0, -(t_start+1)/N)) - 1; starts at t_start),
            ``logsnr`` (uniform in log-SNR between t_start and 0, nearest integer step; needs ``schedule``).
        num_train_timesteps: T (ignored when ``schedule`` is given).
        t_start: first (noisiest) timestep, default T-1; smaller values start from an intermediate level (SDEdit).
        schedule: required for ``logsnr``.

    Returns:
        LongTensor (N,), strictly descending, last entry 0 for every spacing except ``leading`` with a remainder.
    """
    T = schedule.num_train_timesteps if schedule is not None else num_train_timesteps
    top = T - 1 if t_start is None else int(t_start)
    if not 0 <= top <= T - 1:
        raise ValueError(f"t_start must lie in [0, {T - 1}], got {t_start}")
    if not 1 <= num_steps <= top + 1:
        raise ValueError(f"num_steps must lie in [1, {top + 1}] (t_start + 1), got {num_steps}")
    n = num_steps
    if spacing == "linspace":
        t = np.linspace(0, top, n).round()[::-1] if n > 1 else np.array([top])
    elif spacing == "leading":
        t = (np.arange(n) * ((top + 1) // n)).round()[::-1]
    elif spacing == "trailing":
        t = np.round(np.arange(top + 1, 0, -(top + 1) / n))[:n] - 1
    elif spacing == "logsnr":
        if schedule is None:
            raise ValueError("spacing='logsnr' needs the NoiseSchedule (schedule=...)")
        lam = schedule.log_snr(torch.arange(top + 1)).cpu().numpy()  # increasing as t decreases
        targets = np.linspace(lam[top], lam[0], n)
        t = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
        if n == 1:
            t = np.array([top])
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    return torch.from_numpy(_strictly_descending(np.asarray(t, dtype=np.float64), top).copy())
