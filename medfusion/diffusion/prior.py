"""DiffIR's small diffusion over the compact prior vector (IPR) (Xia et al., "DiffIR: Efficient Diffusion
Model for Image Restoration", ICCV 2023, §3.3).

The official code (``Zj-BinXia/DiffIR``, ``ldm/ddpm.py`` + ``S2_arch.py``) differs from the paper text in
ways that matter and that this module follows:

* T = 4, LDM "linear" schedule ``β = linspace(sqrt(0.1), sqrt(0.99), 4)²``;
* **x0 prediction** (the paper says noise; the author confirms x0 is used, issue #26);
* every reverse step is the deterministic posterior mean ``Z_{t-1} = c1_t·f(Z_t, D, t) + c2_t·Z_t`` with
  ``c1 = β_t·sqrt(ā_{t-1})/(1-ā_t)`` and ``c2 = (1-ā_{t-1})·sqrt(α_t)/(1-ā_t)``; no noise is added, so the
  last step returns the denoiser output exactly (``c1[0] = 1``, ``c2[0] = 0``);
* training always noises to the last index T-1 and runs all T reverse steps *with gradients*.

Written here because it is a vector-space diffusion with a bespoke training path that no library scheduler
exposes. Pure torch; the denoiser is any callable ``f(z_t, cond, t) -> z0_hat`` on (B, dim) vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

IPRDenoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


class PriorSchedule(NamedTuple):
    """Coefficients of the IPR diffusion, each (T,), float64."""

    betas: Tensor
    alphas_cumprod: Tensor
    c1: Tensor  # weight of the x0 prediction in the posterior mean
    c2: Tensor  # weight of Z_t in the posterior mean

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def prior_schedule(
    num_timesteps: int = 4, linear_start: float = 0.1, linear_end: float = 0.99
) -> PriorSchedule:
    """LDM ``linear`` schedule and the posterior-mean coefficients (DiffIR defaults: T=4, 0.1 → 0.99)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0.0 < linear_start <= linear_end < 1.0:
        raise ValueError(f"need 0 < linear_start <= linear_end < 1, got {linear_start}, {linear_end}")
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    c1 = betas * ac_prev.sqrt() / (1.0 - ac)
    c2 = (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)
    return PriorSchedule(betas, ac, c1, c2)


def prior_reverse(denoiser: IPRDenoiser, z_T: Tensor, cond: Tensor, schedule: PriorSchedule) -> Tensor:
    """Run the T deterministic posterior-mean steps from ``z_T`` (B, dim); autograd flows through all of them."""
    z = z_T
    for i in reversed(range(schedule.num_timesteps)):
        t = torch.full((z.shape[0],), i, device=z.device, dtype=torch.long)
        z0_hat = denoiser(z, cond, t)
        z = schedule.c1[i].to(z) * z0_hat + schedule.c2[i].to(z) * z
    return z


def prior_train_forward(
    denoiser: IPRDenoiser,
    z0: Tensor,
    cond: Tensor,
    schedule: PriorSchedule,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training path: ``Z_T = sqrt(ā_T)·Z + sqrt(1-ā_T)·ε`` (always index T-1), then all reverse steps.

    Args:
        z0: the stage-1 IPR ``Z = CPEN_S1(LQ, GT)`` (B, dim), detached by the caller.
        cond: ``D = CPEN_S2(LQ)`` (B, dim).

    Returns:
        ``Ẑ`` (B, dim), differentiable w.r.t. the denoiser and ``cond``. The loss is ``L1(Ẑ, Z)``.
    """
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype, device="cpu").to(z0.device)
    a_T = schedule.alphas_cumprod[-1].to(z0)
    z_T = a_T.sqrt() * z0 + (1.0 - a_T).sqrt() * noise
    return prior_reverse(denoiser, z_T, cond, schedule)


def sample_prior(
    denoiser: IPRDenoiser, cond: Tensor, schedule: PriorSchedule, generator: torch.Generator | None = None
) -> Tensor:
    """Inference: ``Z_T ~ N(0, I)`` of shape ``cond.shape`` (B, dim), then the T reverse steps."""
    z_T = torch.randn(cond.shape, generator=generator, dtype=cond.dtype, device="cpu").to(cond.device)
    return prior_reverse(denoiser, z_T, cond, schedule)
