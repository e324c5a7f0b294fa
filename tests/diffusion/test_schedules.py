"""Noise schedules and timestep spacings: equality with diffusers' tables, invariants for every step count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from medfusion.diffusion.schedules import SPACINGS, NoiseSchedule, make_betas, timesteps

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize(
    "ours,theirs,kw",
    [
        ("linear", "linear", {}),
        ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("cosine", "squaredcos_cap_v2", {}),
    ],
)
def test_betas_and_alphas_cumprod_match_diffusers(ours, theirs, kw):
    d = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **kw)
    betas = make_betas(ours, 1000, **kw)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert np.allclose(betas.numpy(), d.betas.double().numpy(), atol=1e-7)
    sch = NoiseSchedule.create(ours, 1000, **kw)
    assert np.allclose(sch.alphas_cumprod.numpy(), d.alphas_cumprod.double().numpy(), atol=1e-6)


def test_alpha_sigma_logsnr_identities():
    sch = NoiseSchedule.create("cosine")
    t = torch.arange(-1, 1000)
    a, s = sch.alpha(t), sch.sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a))
    assert a[0] == 1 and s[0] == 0 and sch.log_snr(torch.tensor(-1)) == float("inf")
    lam = sch.log_snr(t[1:])
    assert (lam[1:] < lam[:-1]).all()  # strictly decreasing in t
    assert torch.allclose(lam, torch.log(a[1:] ** 2 / s[1:] ** 2))
    assert sch.alpha(torch.tensor([[3, 4]])).shape == (1, 2)
    assert sch.to("cpu").alphas_cumprod.dtype == torch.float64


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [2, 10, 50, 53, 1000])
def test_spacings_match_diffusers(spacing, n):
    d = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    d.set_timesteps(n)
    assert timesteps(n, spacing).tolist() == d.timesteps.tolist()


def test_every_step_count_is_exact():
    """For N in 1..T the first step is T-1, len == N, strictly descending, nothing negative."""
    for n in range(1, 1001):
        for spacing in ("linspace", "trailing"):
            t = timesteps(n, spacing)
            assert len(t) == n and t[0] == 999 and t[-1] >= 0 and bool((t[1:] < t[:-1]).all()), (spacing, n)
        t = timesteps(n, "leading")
        assert len(t) == n and t[-1] == 0 and bool((t[1:] < t[:-1]).all())
    sch = NoiseSchedule.create()
    for n in list(range(1, 60)) + [100, 250, 999, 1000]:
        t = timesteps(n, "logsnr", schedule=sch)
        assert len(t) == n and t[0] == 999 and (n == 1 or t[-1] == 0) and bool((t[1:] < t[:-1]).all()), n


def test_logsnr_spacing_is_uniform_in_logsnr():
    sch = NoiseSchedule.create()
    t = timesteps(20, "logsnr", schedule=sch)
    gaps = np.diff(sch.log_snr(t).numpy())
    assert gaps.std() / gaps.mean() < 0.1


@pytest.mark.parametrize("spacing", SPACINGS)
def test_t_start_for_sdedit(spacing):
    sch = NoiseSchedule.create()
    t = timesteps(8, spacing, schedule=sch, t_start=299)
    assert len(t) == 8 and t.max() <= 299 and t[-1] >= 0
    if spacing != "leading":
        assert t[0] == 299


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="cosine"):
        make_betas("sigmoid")
    with pytest.raises(ValueError, match="logsnr"):
        timesteps(10, "karras")
    with pytest.raises(ValueError, match="schedule"):
        timesteps(10, "logsnr")
    with pytest.raises(ValueError, match="num_steps"):
        timesteps(0)
    with pytest.raises(ValueError, match="num_steps"):
        timesteps(11, t_start=9)
    with pytest.raises(ValueError, match="t_start"):
        timesteps(10, t_start=1000)
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="timesteps"):
        NoiseSchedule.create().alpha(torch.tensor([1000]))
