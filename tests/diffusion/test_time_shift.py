"""Time-Shift sampler (Li et al., ICLR 2024): the shift rule, reduction to the base sampler, shifts under a biased
model, and the sampler contract through :func:`sample_time_shift`."""

from __future__ import annotations

import math

import pytest
import torch

from medfusion.diffusion.samplers import SAMPLERS, sample_time_shift
from medfusion.diffusion.schedules import NoiseSchedule, timesteps
from medfusion.diffusion.time_shift import shifted_timesteps, time_shift_model

MU, S = 0.5, 0.3


def gaussian_model(schedule: NoiseSchedule, prediction: str = "epsilon", scale: float = 1.0):
    """Exact denoiser of N(MU, S²) voxels; ``scale`` != 1 multiplies its ε̂ (a model with the wrong variance)."""
    ab = schedule.alphas_cumprod

    def model(x, t, cond=None):
        shape = (-1, *([1] * (x.ndim - 1)))
        a = ab[t.cpu()].sqrt().view(shape)
        s = (1 - ab[t.cpu()]).sqrt().view(shape)
        v = a**2 * S**2 + s**2
        eps = scale * s * (x.double() - a * MU) / v
        x0 = (x.double() - s * eps) / a
        return {"epsilon": eps, "x0": x0, "v": a * eps - s * x0}[prediction].to(x.dtype)

    return model


def test_rule_picks_the_timestep_whose_variance_matches():
    sch = NoiseSchedule.create("linear")
    z = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean(dim=(1, 2, 3), keepdim=True)) / z.flatten(1).std(dim=1).view(
        -1, 1, 1, 1
    )  # variance exactly 1
    for t in (100, 400, 700):
        ab = float(sch.alphas_cumprod[t])
        exact = math.sqrt(ab) * MU + math.sqrt(ab * S**2 + 1 - ab) * z  # Var = ᾱ S² + 1 - ᾱ exactly
        tt = torch.full((3,), t)
        # the exact marginal: no shift (with the data variance in the rule)
        assert shifted_timesteps(exact, tt, sch, window=20, cutoff=0, data_variance=S**2).tolist() == [t] * 3
        # too much noise -> a later (noisier) timestep, too little -> an earlier one, within the window
        up = shifted_timesteps(exact * 1.05, tt, sch, window=20, cutoff=0, data_variance=S**2)
        down = shifted_timesteps(exact * 0.95, tt, sch, window=20, cutoff=0, data_variance=S**2)
        assert (up > t).all() and (up <= t + 10).all() and (down < t).all() and (down >= t - 10).all()
        # below the cut-off nothing moves
        assert (
            shifted_timesteps(exact * 1.05, tt, sch, window=20, cutoff=t, data_variance=S**2).tolist()
            == [t] * 3
        )


@pytest.mark.parametrize("base", ["ddim", "dpmpp_2m", "plms", "pndm", "deis"])
def test_no_window_or_cutoff_above_start_is_the_base_sampler(base):
    sch = NoiseSchedule.create("linear")
    model = gaussian_model(sch)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = timesteps(10, "trailing", schedule=sch)
    ref = SAMPLERS[base](model, x, ts, schedule=sch)
    assert torch.equal(sample_time_shift(model, x, ts, schedule=sch, base=base, window=0, cutoff=0), ref)
    assert torch.equal(sample_time_shift(model, x, ts, schedule=sch, base=base, window=20, cutoff=999), ref)


@pytest.mark.parametrize("base", ["ddim", "dpmpp_2m", "pndm"])
def test_shift_direction_follows_the_sample_variance(base):
    """The exact denoiser with a 20-step solver leaves x_t under-dispersed (discretisation error: DDIM-20 ends at
    std 0.24 for S = 0.3), so the rule moves the network to earlier timesteps; ε̂ scaled by 0.8 leaves too much
    noise, so it moves it to later ones; the result then differs from the base sampler's."""
    sch = NoiseSchedule.create("linear")
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = timesteps(20, "trailing", schedule=sch)
    opts = dict(window=40, cutoff=200, data_variance=S**2)
    for scale, sign in ((1.0, -1), (0.8, 1)):
        model = gaussian_model(sch, scale=scale)
        called: list[int] = []
        shifted = time_shift_model(
            lambda x_, t, c, m=model, log=called: (log.append(int(t[0])), m(x_, t, c))[1], sch, **opts
        )
        out = SAMPLERS[base](shifted, x, ts, schedule=sch)
        nominal = [t for t in ts.tolist() for _ in range(len(called) // len(ts))] if base != "pndm" else None
        if nominal is not None:
            moved = [c - t for c, t in zip(called[1:], nominal[1:]) if t > 200]  # after the drawn start noise
            assert all(m * sign > 0 for m in moved), (scale, called)
        assert (out - SAMPLERS[base](model, x, ts, schedule=sch)).abs().max() > 1e-3


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_other_parameterisations_keep_the_noise_prediction(prediction):
    sch = NoiseSchedule.create("linear")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.2
    ts = timesteps(10, "trailing", schedule=sch)
    kw = dict(schedule=sch, window=40, cutoff=100)
    ref = sample_time_shift(gaussian_model(sch, scale=0.9), x, ts, **kw)
    out = sample_time_shift(gaussian_model(sch, prediction, scale=0.9), x, ts, prediction=prediction, **kw)
    assert (out - ref).abs().max() <= 1e-8


def test_contract_and_bad_options():
    sch = NoiseSchedule.create("linear")
    model = gaussian_model(sch)
    x = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cond = object()
    seen = []
    out = sample_time_shift(
        lambda x_, t, c: (seen.append(c), model(x_, t))[1], x, timesteps(7, "trailing", schedule=sch), schedule=sch,
        cond=cond, window=10, cutoff=0,
    )  # fmt: skip
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert len(seen) == 7 and all(c is cond for c in seen)
    with pytest.raises(ValueError, match="ddim"):
        sample_time_shift(model, x, [999], schedule=sch, base="euler")
    with pytest.raises(ValueError, match="window"):
        time_shift_model(model, sch, window=-1)
    with pytest.raises(ValueError, match="cutoff"):
        time_shift_model(model, sch, cutoff=1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", ["ddim", "dpmpp_2m", "plms", "pndm", "deis"])
def test_no_nan_sweep_with_time_shift(base, dtype):
    """The NaN sweep of test_samplers.py through the wrapper (v-prediction, every spacing, 1 to 53 steps)."""
    from medfusion.diffusion.schedules import SPACINGS

    sch = NoiseSchedule.create("linear")
    exact = gaussian_model(sch, "v")
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    for spacing in SPACINGS:
        for n in (1, 2, 3, 7, 16, 53):
            ts = timesteps(n, spacing, schedule=sch)
            out = sample_time_shift(
                lambda x_, t, c: exact(x_, t, c).to(dtype), x, ts, schedule=sch, prediction="v", base=base,
                window=20, cutoff=0,
            )  # fmt: skip
            assert out.dtype == dtype and torch.isfinite(out.float()).all(), (base, spacing, n)
