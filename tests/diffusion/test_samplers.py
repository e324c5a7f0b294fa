"""Samplers: oracle equality with diffusers, analytic Gaussian convergence order, NaN sweep, shared contract.

The "network" is the exact MMSE denoiser of Gaussian data x0 ~ N(MU, S²) per voxel
(Tweedie): ε*(x, t) = σ_t (x - α_t MU) / v_t with v_t = α_t² S² + σ_t²; the probability-flow
ODE keeps z = (x_t - α_t MU)/sqrt(v_t) constant, so the exact deterministic sample is known in closed form.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from medfusion.diffusion.samplers import (
    SAMPLERS,
    make_denoiser,
    network_evaluations,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
)
from medfusion.diffusion.schedules import SPACINGS, NoiseSchedule, timesteps

MU, S = 0.5, 0.3

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    diffusers = pytest.importorskip("diffusers")


def gaussian_model(schedule: NoiseSchedule, prediction: str = "epsilon"):
    """Exact denoiser of N(MU, S²) data in the requested parameterisation; model(x, t, cond)."""
    ab = schedule.alphas_cumprod

    def model(x, t, cond=None):
        shape = (-1, *([1] * (x.ndim - 1)))
        a = ab[t.cpu()].sqrt().view(shape).to(x.device)
        s = (1 - ab[t.cpu()]).sqrt().view(shape).to(x.device)
        xd = x.double()
        v = a**2 * S**2 + s**2
        eps = s * (xd - a * MU) / v
        x0 = MU + a * S**2 * (xd - a * MU) / v
        out = {"epsilon": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
        return out.to(x.dtype)

    return model


def exact_endpoint(x_start: torch.Tensor, ab: torch.Tensor, t0: int) -> torch.Tensor:
    """PF-ODE solution from t0 to clean data (t = -1)."""
    a0, s0 = math.sqrt(ab[t0]), math.sqrt(1 - ab[t0])
    return MU + S * (x_start - a0 * MU) / math.sqrt(a0**2 * S**2 + s0**2)


def _run_diffusers(sched, x, model, noises=None, **kw):
    for i, t in enumerate(sched.timesteps):
        out = model(x, torch.full((x.shape[0],), int(t)))
        if noises is not None:
            kw["variance_noise"] = noises[i]
        x = sched.step(out, t, x, **kw).prev_sample
    return x


COMMON = dict(num_train_timesteps=1000, beta_schedule="linear")


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------- oracle equality
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("n", [5, 20])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_leading(x_T, prediction, n, eta):
    """diffusers' DDIM step (prev = t - T//N) is correct for 'leading' spacing, so compare there."""
    d = diffusers.DDIMScheduler(
        **COMMON, clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
        prediction_type="v_prediction" if prediction == "v" else "epsilon",
    )  # fmt: skip
    d.set_timesteps(n)
    sch = NoiseSchedule.from_betas(d.betas)
    model = gaussian_model(sch, prediction)
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(x_T.shape, generator=g) for _ in range(n - 1)] + [torch.zeros_like(x_T)]
    ref = _run_diffusers(d, x_T.clone(), model, noises=noises if eta > 0 else None, eta=eta)
    ours = sample_ddim(
        model, x_T.clone(), d.timesteps, schedule=sch, prediction=prediction, eta=eta,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("n", [10, 53])
def test_ddpm_matches_diffusers_any_subset(x_T, n):
    """diffusers' DDPMScheduler looks the previous timestep up in its list (exact for subsets); MONAI's uses t-1."""
    d = diffusers.DDPMScheduler(
        **COMMON, clip_sample=False, variance_type="fixed_small", timestep_spacing="trailing"
    )
    d.set_timesteps(n)
    sch = NoiseSchedule.from_betas(d.betas)
    model = gaussian_model(sch)
    ref = _run_diffusers(d, x_T.clone(), model, generator=torch.Generator().manual_seed(1))
    ours = SAMPLERS["ddpm"](
        model, x_T.clone(), d.timesteps, schedule=sch, generator=torch.Generator().manual_seed(1)
    )
    assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name,order", [("dpmpp_2m", 2), ("dpmpp_3m", 3)])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("n", [5, 10, 20])
def test_dpmpp_matches_diffusers(x_T, name, order, spacing, n):
    d = diffusers.DPMSolverMultistepScheduler(
        **COMMON, algorithm_type="dpmsolver++", solver_order=order, final_sigmas_type="zero",
        lower_order_final=True, timestep_spacing=spacing,
    )  # fmt: skip
    d.set_timesteps(n)
    sch = NoiseSchedule.from_betas(d.betas)
    model = gaussian_model(sch)
    ref = _run_diffusers(d, x_T.clone(), model)
    ours = SAMPLERS[name](model, x_T.clone(), d.timesteps, schedule=sch)
    assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("n", [6, 20])
def test_unipc_matches_diffusers(x_T, n):
    d = diffusers.UniPCMultistepScheduler(
        **COMMON, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
        final_sigmas_type="zero", timestep_spacing="trailing",
    )  # fmt: skip
    d.set_timesteps(n)
    sch = NoiseSchedule.from_betas(d.betas)
    model = gaussian_model(sch)
    ref = _run_diffusers(d, x_T.clone(), model)
    ours = SAMPLERS["unipc"](model, x_T.clone(), d.timesteps, schedule=sch)
    assert (ours - ref).abs().max() <= 1e-5
    # and the corrector does something: UniPC != DPM-Solver++(2M) on the same steps
    assert (ours - sample_dpmpp_2m(model, x_T.clone(), d.timesteps, schedule=sch)).abs().max() > 1e-4


@pytest.mark.parametrize("name,skip_prk", [("plms", True), ("pndm", False)])
@pytest.mark.parametrize("n", [5, 10, 20, 50])
def test_pndm_matches_diffusers(x_T, name, skip_prk, n):
    """PLMS / F-PNDM against diffusers' PNDMScheduler on its 'leading' steps (it steps t - T//N), same NFE."""
    d = diffusers.PNDMScheduler(
        **COMMON, skip_prk_steps=skip_prk, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0
    )
    d.set_timesteps(n)
    sch = NoiseSchedule.from_betas(d.betas)
    model = gaussian_model(sch)
    calls: list[int] = []

    def spy(x, t, c):
        calls.append(int(t[0]))
        return model(x, t, c)

    ref = _run_diffusers(d, x_T.clone(), model)
    ts = torch.arange(n - 1, -1, -1) * (1000 // n)
    ours = SAMPLERS[name](spy, x_T.clone(), ts, schedule=sch)
    assert (ours - ref).abs().max() <= 1e-5
    assert len(calls) == len(d.timesteps) == network_evaluations(name, n)
    assert sorted(calls, reverse=True) == d.timesteps.tolist()


@pytest.mark.parametrize("name", ["plms", "pndm", "deis"])
def test_parameterisations_give_the_same_sample(x_T, name):
    """Each network evaluation is converted with its own (x, t): ε-, v- and x0-networks of the same exact denoiser
    give one trajectory, in float64 (diffusers' PNDM converts v after combining steps, so it has no v oracle)."""
    sch = NoiseSchedule.create("linear")
    ts = timesteps(10, "trailing", schedule=sch)
    outs = [
        SAMPLERS[name](gaussian_model(sch, p), x_T.double(), ts, schedule=sch, prediction=p)
        for p in ("epsilon", "v", "x0")
    ]
    assert (outs[0] - outs[1]).abs().max() <= 1e-9 and (outs[0] - outs[2]).abs().max() <= 1e-9


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("n", [5, 10, 20])
def test_deis_matches_diffusers(x_T, order, spacing, n):
    """DEIS-tAB (log rho) against diffusers' DEISMultistepScheduler at every intermediate step. diffusers ends at
    t = 0 (sigma_last = sigma of t=0), we at clean data, so the last step is checked against its closed form (first
    order for N < 15: x0-hat). diffusers computes its weights from a float32 sigma table, which alone costs 3.6e-5 at
    order 3 and N = 20; the table is cast to float64 for the comparison."""
    d = diffusers.DEISMultistepScheduler(
        **COMMON, solver_order=order, timestep_spacing=spacing, lower_order_final=True
    )
    d.set_timesteps(n)
    d.sigmas = d.sigmas.double()
    sch = NoiseSchedule.from_betas(d.betas)
    model = gaussian_model(sch)
    ref, xs, x0s = x_T.clone(), [], []
    refs = []
    for t in d.timesteps:
        ref = d.step(model(ref, torch.full((2,), int(t))), t, ref).prev_sample.float()
        refs.append(ref)

    def cb(i, t, x, x0):
        xs.append(x.clone())
        x0s.append(x0.clone())

    ours = SAMPLERS["deis"](model, x_T.clone(), d.timesteps, schedule=sch, order=order, callback=cb)
    assert max(float((a - b).abs().max()) for a, b in zip(xs[1:], refs[:-1])) <= 1e-5
    if n < 15:  # lower_order_final: the last step is DDIM to clean data, x0-hat
        assert (ours - x0s[-1]).abs().max() <= 1e-5


# ------------------------------------------------------------------------- DDIM next-timestep regression (user ask 7)
def test_ddim_linspace_steps_to_the_next_listed_timestep(x_T):
    """linspace, N=10 must go 999 -> 888 (diffusers#12633 and MONAI 1.6.1 step to 899 = t - T//N)."""
    sch = NoiseSchedule.create("linear")
    ts = timesteps(10, "linspace", schedule=sch)
    assert ts[:2].tolist() == [999, 888]
    model = gaussian_model(sch)
    seen: list[int] = []
    xs: list[torch.Tensor] = []

    def spy(x, t, cond):
        seen.append(int(t[0]))
        xs.append(x.clone())
        return model(x, t, cond)

    out = sample_ddim(spy, x_T.clone(), ts, schedule=sch)
    assert seen == ts.tolist()
    # one deterministic step against the closed-form DDIM update 999 -> 888
    ab = sch.alphas_cumprod
    eps = model(x_T, torch.full((2,), 999))
    x0 = (x_T - (1 - ab[999]).sqrt() * eps) / ab[999].sqrt()
    x888 = ab[888].sqrt() * x0 + (1 - ab[888]).sqrt() * eps
    assert (xs[1] - x888.float()).abs().max() <= 1e-5
    # independent oracle for the whole run: first-order DPM-Solver++ == DDIM, on our exact timestep list
    d = diffusers.DPMSolverMultistepScheduler(
        **COMMON, algorithm_type="dpmsolver++", solver_order=1, final_sigmas_type="zero"
    )
    d.set_timesteps(timesteps=ts.tolist())
    assert (out - _run_diffusers(d, x_T.clone(), model)).abs().max() <= 1e-5
    # diffusers' DDIM with the same linspace list differs by ~0.2 (the known bug) - documents why we don't use it
    dd = diffusers.DDIMScheduler(
        **COMMON, clip_sample=False, set_alpha_to_one=True, timestep_spacing="linspace"
    )
    dd.set_timesteps(10)
    assert dd.timesteps.tolist() == ts.tolist()
    assert (out - _run_diffusers(dd, x_T.clone(), model)).abs().max() > 0.05


# ------------------------------------------------------------------------------- analytic convergence order
def _order(name: str, steps=(10, 20, 40, 80)) -> tuple[float, list[float]]:
    sch = NoiseSchedule.create("linear")
    model = gaussian_model(sch)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for n in steps:
        ts = timesteps(n, "logsnr", schedule=sch)
        out = SAMPLERS[name](model, x.clone(), ts, schedule=sch)
        ref = exact_endpoint(x, sch.alphas_cumprod, int(ts[0]))
        errs.append(float((out - ref).pow(2).mean().sqrt()))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    return float(slope), errs


def test_ddim_is_first_order_on_gaussian_oracle():
    slope, errs = _order("ddim")
    assert 0.9 <= slope <= 1.1, (slope, errs)
    assert errs[0] == pytest.approx(7.0e-2, rel=0.05)  # measured anchor (logSNR, NFE 10)


def test_dpmpp_2m_is_higher_order_on_gaussian_oracle():
    slope, errs = _order("dpmpp_2m")
    assert slope > 1.4, (slope, errs)


@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc", "plms", "pndm", "deis"])
def test_higher_order_solvers_beat_ddim(name):
    slope, errs = _order(name)
    assert slope > 1.4, (slope, errs)
    assert errs[-1] < _order("ddim")[1][-1] / 10


# ------------------------------------------------------------------------------------- no-NaN sweep (user ask 8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_no_nan_sweep(name, dtype):
    sch = NoiseSchedule.create("linear")
    exact = gaussian_model(sch, "v")

    def model(x, t, c):  # network output in the sweep dtype (bf16 = what an autocast network returns)
        return exact(x, t, c).to(dtype)

    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    for spacing in SPACINGS:
        for n in (1, 2, 3, 7, 14, 15, 16, 50, 53):
            ts = timesteps(n, spacing, schedule=sch)
            out = SAMPLERS[name](model, x, ts, schedule=sch, prediction="v", generator=torch.Generator())
            assert out.dtype == dtype
            assert torch.isfinite(out.float()).all(), (name, spacing, n)


# ---------------------------------------------------------------------------------------------- shared contract
@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 2, 4, 4, 4)])
def test_sampler_contract(name, shape):
    sch = NoiseSchedule.create("scaled_linear", beta_start=0.00085, beta_end=0.012)
    base = gaussian_model(sch, "x0")
    cond = torch.full(shape, 7.0)
    calls: list[tuple[tuple[int, ...], torch.Tensor, object]] = []

    def model(x, t, c):
        calls.append((tuple(t.shape), t, c))
        return base(x, t)

    ts = timesteps(6, "trailing", schedule=sch)
    steps: list[tuple[int, int]] = []

    def cb(i, t, x, x0):
        assert x.shape == x0.shape == shape
        steps.append((i, t))

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kw = dict(schedule=sch, prediction="x0", cond=cond, callback=cb)
    out1 = sample(name, model, x, ts, generator=torch.Generator().manual_seed(5), **kw)
    assert out1.shape == shape and torch.isfinite(out1).all()
    assert len(calls) == network_evaluations(name, len(ts))  # NFE = number of steps (+ PNDM warm-ups)
    assert all(c is cond for _, _, c in calls)  # conditioning passed through unchanged
    assert all(ts_shape == (shape[0],) and t.dtype == torch.long for ts_shape, t, _ in calls)
    assert steps == list(enumerate(ts.tolist()))  # callback once per step, in order
    out2 = sample(name, model, x, ts, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(out1, out2)  # seeded determinism


def test_ddpm_stochastic_and_seeded():
    sch = NoiseSchedule.create()
    model = gaussian_model(sch)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = timesteps(5, "trailing", schedule=sch)
    a = sample("ddpm", model, x, ts, schedule=sch, generator=torch.Generator().manual_seed(1))
    b = sample("ddpm", model, x, ts, schedule=sch, generator=torch.Generator().manual_seed(2))
    assert (a - b).abs().max() > 1e-3


def test_clip_and_threshold_bound_x0():
    sch = NoiseSchedule.create()
    seen = []
    den = make_denoiser(lambda x, t, c: 5 * torch.ones_like(x), sch, "x0", clip=(-1.0, 1.0))
    d = den(torch.zeros(1, 1, 4, 4), 500)
    assert d.x0.max() == 1.0
    den = make_denoiser(lambda x, t, c: torch.linspace(-4, 4, 16).view(1, 1, 4, 4), sch, "x0", threshold=0.9)
    seen.append(den(torch.zeros(1, 1, 4, 4), 500).x0)
    assert seen[0].abs().max() <= 1.0 + 1e-6


def test_sdedit_start_from_intermediate_level():
    sch = NoiseSchedule.create()
    ts = timesteps(5, "linspace", schedule=sch, t_start=400)
    assert ts[0] == 400 and ts[-1] == 0 and len(ts) == 5
    model = gaussian_model(sch)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample("dpmpp_2m", model, x, timesteps(40, "logsnr", schedule=sch, t_start=400), schedule=sch)
    assert (out - exact_endpoint(x, sch.alphas_cumprod, 400)).abs().max() < 1e-2


def test_bad_inputs_raise():
    sch = NoiseSchedule.create()
    model = gaussian_model(sch)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="ddim"):
        sample("euler", model, x, [999], schedule=sch)
    with pytest.raises(ValueError, match="descending"):
        sample("ddim", model, x, [0, 999], schedule=sch)
    with pytest.raises(ValueError, match="descending"):
        sample("ddim", model, x, [1000, 0], schedule=sch)
    with pytest.raises(ValueError, match="epsilon"):
        sample("ddim", model, x, [999], schedule=sch, prediction="score")
    with pytest.raises(ValueError, match="clip"):
        sample("ddim", model, x, [999], schedule=sch, clip=(1.0, -1.0))
    with pytest.raises(ValueError, match="small"):
        sample("ddpm", model, x, [999], schedule=sch, variance="learned")
