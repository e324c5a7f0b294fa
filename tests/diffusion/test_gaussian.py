"""Forward process, parameterisation conversions and the training loss (2D and 3D batches)."""

from __future__ import annotations

import warnings

import pytest
import torch

from medfusion.diffusion.gaussian import (
    diffusion_loss,
    draw_timesteps,
    min_snr_weight,
    predict_eps,
    predict_x0,
    q_sample,
    training_target,
    v_target,
)
from medfusion.diffusion.schedules import NoiseSchedule

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    diffusers = pytest.importorskip("diffusers")

SHAPES = [(3, 2, 8, 8), (3, 1, 4, 4, 4)]


def _batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([0, 500, 999])
    return x0, noise, t


@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample_and_velocity_match_diffusers(shape):
    d = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sch = NoiseSchedule.from_betas(d.betas)
    x0, noise, t = _batch(shape)
    assert torch.allclose(q_sample(x0, t, noise, sch), d.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(v_target(x0, noise, t, sch), d.get_velocity(x0, noise, t), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_conversions_invert_the_forward_process(shape, prediction):
    sch = NoiseSchedule.create("cosine")
    x0, noise, t = _batch(shape)
    t = torch.tensor([1, 400, 900])  # σ > 0 and α > 0 for all parameterisations
    x_t = q_sample(x0, t, noise, sch)
    out = training_target(x0, noise, t, sch, prediction)
    assert torch.allclose(predict_x0(out, x_t, t, sch, prediction), x0, atol=1e-4)
    assert torch.allclose(predict_eps(out, x_t, t, sch, prediction), noise, atol=1e-4)


def test_clean_endpoint_and_scalar_t():
    sch = NoiseSchedule.create()
    x0, noise, _ = _batch((2, 1, 4, 4))
    assert torch.equal(q_sample(x0, -1, noise, sch), x0)  # t = -1 is clean data
    assert torch.allclose(q_sample(x0, 999, noise, sch), q_sample(x0, torch.tensor([999, 999]), noise, sch))


def test_min_snr_weights_closed_form():
    sch = NoiseSchedule.create()
    t = torch.tensor([0, 100, 999])
    snr = sch.alphas_cumprod[t] / (1 - sch.alphas_cumprod[t])
    g = 5.0
    assert torch.allclose(min_snr_weight(t, sch, "epsilon", g), torch.clamp(snr, max=g) / snr)
    assert torch.allclose(min_snr_weight(t, sch, "v", g), torch.clamp(snr, max=g) / (snr + 1))
    assert torch.allclose(min_snr_weight(t, sch, "x0", g), torch.clamp(snr, max=g))
    # large-t (low SNR) samples keep weight 1 for epsilon, the t = 0 (high SNR) sample is down-weighted
    w = min_snr_weight(t, sch, "epsilon", g)
    assert w[-1] == 1 and w[0] < 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_diffusion_loss_values(shape):
    sch = NoiseSchedule.create()
    x0, noise, t = _batch(shape)
    out = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    target = v_target(x0, noise, t, sch)
    per = ((out - target) ** 2).flatten(1).mean(1)
    assert torch.allclose(diffusion_loss(out, x0, noise, t, sch, "v"), per.mean())
    w = min_snr_weight(t, sch, "v", 5.0).float()
    assert torch.allclose(diffusion_loss(out, x0, noise, t, sch, "v", min_snr_gamma=5.0), (w * per).mean())
    assert diffusion_loss(noise, x0, noise, t, sch, "epsilon", loss="l1") == 0
    assert diffusion_loss(out.bfloat16(), x0, noise, t, sch, loss="huber").dtype == torch.float32


def test_draw_timesteps_seeded_and_in_range():
    a = draw_timesteps(64, 1000, generator=torch.Generator().manual_seed(0))
    b = draw_timesteps(64, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.long and 0 <= a.min() and a.max() < 1000


def test_bad_arguments_raise():
    sch = NoiseSchedule.create()
    x0, noise, t = _batch((3, 1, 4, 4))
    with pytest.raises(ValueError, match="epsilon"):
        predict_x0(x0, x0, t, sch, "score")
    with pytest.raises(ValueError, match="mse"):
        diffusion_loss(x0, x0, noise, t, sch, loss="l2")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion_loss(x0, x0, noise, t, sch, min_snr_gamma=0.0)
