"""DPM-Solver-v3: the EMS estimator against their closed form on Gaussian data, exactness with exact EMS, the
DPM-Solver++ special case against diffusers, convergence order, NaN sweep, file format and errors.

Gaussian oracle (as in test_samplers.py): x0 ~ N(MU, S_d²) per voxel, exact denoiser
ε*(x, t) = σ (x - α MU)/v with v = α² S² + σ²; the PF-ODE keeps z = (x - α MU)/sqrt(v) constant.
Closed-form EMS (λ = log(α/σ)): σ ∂ε*/∂x = σ²/v, so with one variance S² for every voxel l = σ²/v = 1/(S² e^{2λ} + 1),
f = (σ ε - l x)/α = -MU l does not depend on x (s = 0) and b = df/dλ = 2 MU S² e^{2λ} l². With per-voxel variances
pooled per channel, f = -l MU + B_d(λ) z with B_d = (σ²/v_d - l) sqrt(v_d)/α, so s = mean(B B')/mean(B²) and
b = (-l MU)' - s (-l MU).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from medfusion.diffusion.dpm_v3 import EMS, compute_ems, degenerate_ems, load_ems, sample_dpm_v3, save_ems
from medfusion.diffusion.samplers import SAMPLERS, network_evaluations, sample_ddim
from medfusion.diffusion.schedules import SPACINGS, NoiseSchedule, timesteps

MU, S = 0.5, 0.3
SCH = NoiseSchedule.create("linear")
AB = SCH.alphas_cumprod


def gaussian_model(schedule: NoiseSchedule, prediction: str = "epsilon", var: float | torch.Tensor = S**2):
    """Exact denoiser of N(MU, var) data (var a float or a per-voxel (1, C, *spatial) tensor); model(x, t, cond)."""
    ab = schedule.alphas_cumprod

    def model(x, t, cond=None):
        shape = (-1, *([1] * (x.ndim - 1)))
        a = ab[t.cpu()].sqrt().view(shape).to(x.device)
        s = (1 - ab[t.cpu()]).sqrt().view(shape).to(x.device)
        xd = x.double()
        v = a**2 * var + s**2
        eps = s * (xd - a * MU) / v
        x0 = MU + a * var * (xd - a * MU) / v
        return {"epsilon": eps, "x0": x0, "v": a * eps - s * x0}[prediction].to(x.dtype)

    return model


def exact_state(x_start: torch.Tensor, t0: int, t: int, var: float | torch.Tensor = S**2) -> torch.Tensor:
    """The PF-ODE solution at timestep t from x_start at t0."""
    a0, s0, a, s = math.sqrt(AB[t0]), math.sqrt(1 - AB[t0]), math.sqrt(AB[t]), math.sqrt(1 - AB[t])
    v0, v = torch.as_tensor(a0**2 * var + s0**2), torch.as_tensor(a**2 * var + s**2)
    return a * MU + v.sqrt() * (x_start - a0 * MU) / v0.sqrt()


def exact_ems(schedule: NoiseSchedule) -> EMS:
    """The closed-form EMS of the single-variance Gaussian on every timestep."""
    ts = torch.arange(schedule.num_train_timesteps - 1, -1, -1)
    lam = 0.5 * schedule.log_snr(ts)
    lin = 1 / (S**2 * torch.exp(2 * lam) + 1)
    b = 2 * MU * S**2 * torch.exp(2 * lam) * lin**2
    return EMS(ts, lam, lin[:, None], torch.zeros_like(lin)[:, None], b[:, None])


def last_state_error(stats, n, *, var=S**2, model=None, x=None, **kw) -> float:
    """RMS error of the sample at the last timestep (t = 0 for logsnr steps) against the exact ODE state there."""
    model = model or gaussian_model(SCH, var=var)
    x = (
        torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        if x is None
        else x
    )
    ts = timesteps(n, "logsnr", schedule=SCH)
    states: list[torch.Tensor] = []
    sample_dpm_v3(
        model, x.clone(), ts, schedule=SCH, stats=stats, callback=lambda i, t, s, x0: states.append(s), **kw
    )
    return float((states[-1] - exact_state(x, int(ts[0]), int(ts[-1]), var)).pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------------ the estimator
def test_ems_estimator_matches_closed_form_single_variance():
    """l exact, s = 0, b = the central difference in λ of the closed-form f over the neighbours t ± 1 (exactly the
    estimator's definition) and within 1% of the analytic derivative where the λ spacing is small. Two contiguous
    grid segments, so every interior point's neighbours are on the grid."""
    grid = [*range(0, 41), *range(960, 1000)]
    data = MU + S * torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ems = compute_ems(gaussian_model(SCH), data, SCH, grid, generator=torch.Generator().manual_seed(2))
    ref = exact_ems(SCH)
    assert ems.timesteps.tolist() == sorted(grid, reverse=True)
    idx = (999 - ems.timesteps).tolist()  # rows of the closed-form table
    assert (ems.l[:, 0] - ref.l[idx, 0]).abs().max() <= 1e-10
    lam = 0.5 * SCH.log_snr(torch.arange(1000))
    f = -MU / (S**2 * torch.exp(2 * lam) + 1)
    for row, t in enumerate(ems.timesteps.tolist()):
        if t in (0, 40, 960, 999):
            continue  # one-sided, or a neighbour off the grid (l interpolated across the gap)
        assert abs(float(ems.s[row, 0])) <= 1e-6
        central = (f[t - 1] - f[t + 1]) / (lam[t - 1] - lam[t + 1])
        assert float(ems.b[row, 0]) == pytest.approx(float(central), rel=1e-6, abs=1e-10)
        if t >= 5:
            assert float(ems.b[row, 0]) == pytest.approx(float(ref.b[999 - t, 0]), rel=1e-2)


def test_ems_estimator_matches_closed_form_pooled_regression():
    """Per-voxel variances pooled per channel: f depends on x, and s, b are the least-squares fit of the closed form
    (derivatives by autograd in λ); agreement to 0.03 (0.1 below t = 40) inside the grid: the sampling error of
    256 x 64 draws and the O(Δλ) error of the difference over t ± 1 (one-sided at the grid ends)."""
    var = torch.linspace(0.05, 1.0, 64, dtype=torch.float64).view(1, 1, 8, 8)
    data = MU + var.sqrt() * torch.randn(
        256, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    grid = timesteps(60, "logsnr", schedule=SCH)
    ems = compute_ems(
        gaussian_model(SCH, var=var), data, SCH, grid, generator=torch.Generator().manual_seed(2)
    )
    lam = ems.lambdas.clone().requires_grad_(True)
    a2, s2 = torch.sigmoid(2 * lam)[:, None], torch.sigmoid(-2 * lam)[:, None]
    v = a2 * var.flatten()[None] + s2
    lin = (s2 / v).mean(1)
    A = -lin * MU
    B = (s2 / v - lin[:, None]) * v.sqrt() / a2.sqrt()
    dA = torch.autograd.grad(A.sum(), lam, retain_graph=True)[0]
    dB = torch.stack([torch.autograd.grad(B[:, j].sum(), lam, retain_graph=True)[0] for j in range(64)], 1)
    s_ref = ((B * dB).mean(1) / (B**2).mean(1)).detach()
    b_ref = (dA - s_ref * A).detach()
    # Rademacher probes are exact for a diagonal Jacobian
    assert (ems.l[:, 0] - lin.detach()).abs().max() <= 1e-10
    for lo, tol in ((40, 0.03), (2, 0.1)):  # small t: larger λ spacing of t ± 1 and fewer effective draws
        inner = (ems.timesteps >= lo) & (ems.timesteps <= 990)
        assert (ems.s[inner, 0] - s_ref[inner]).abs().max() <= tol
        assert (ems.b[inner, 0] - b_ref[inner]).abs().max() <= tol
    assert s_ref.min() < -1.5 and s_ref.max() > 0.9  # a non-trivial s

    # the estimated statistics make the solver far better than DPM-Solver++ at few steps
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in (5, 10):
        ours = last_state_error(ems, n, var=var, x=x)
        plain = last_state_error(degenerate_ems(SCH), n, var=var, x=x)
        assert ours < plain / 10, (n, ours, plain)  # measured: 1.0e-2 vs 1.7e-1 (5), 3.3e-3 vs 5.5e-2 (10)


def test_estimator_per_voxel_and_3d():
    """reduce='none' keeps one statistic per voxel; 3D batches of (x0, cond) pairs; conditioning passed through."""
    var = torch.linspace(0.1, 1.0, 8, dtype=torch.float64).view(1, 1, 2, 2, 2)
    base = gaussian_model(SCH, var=var)
    seen = []

    def model(x, t, c):
        seen.append(c)
        return base(x, t)

    data = [(MU + var.sqrt() * torch.randn(3, 1, 2, 2, 2, dtype=torch.float64), "c")]
    ems = compute_ems(model, data, SCH, [999, 500, 100, 0], reduce="none")
    assert ems.l.shape == (4, 1, 2, 2, 2) and set(seen) == {"c"}
    t = ems.timesteps.view(-1, 1, 1, 1, 1)
    lam = 0.5 * SCH.log_snr(t)
    assert (ems.l - 1 / (var * torch.exp(2 * lam) + 1)).abs().max() <= 1e-10


# ----------------------------------------------------------------------------------------------------- the solver
def test_exact_ems_make_the_solver_exact():
    """With the closed-form EMS, g is constant in λ: every order and step count is exact up to the interpolation of
    l between the (integer) timesteps (measured <= 1.6e-4), while the same solver with l = 1, s = b = 0
    (DPM-Solver++) is 5-500x worse (8.3e-3, 5.4e-2, 4.8e-4 at 5, 10, 20 steps)."""
    for n in (5, 10, 20):
        for order in (1, 3):
            assert last_state_error(exact_ems(SCH), n, order=order, corrector=False) <= 2e-4
        exact = last_state_error(exact_ems(SCH), n, corrector=False)
        assert last_state_error(degenerate_ems(SCH), n, corrector=False) >= 5 * exact


@pytest.mark.parametrize("order,corrector", [(1, False), (2, True), (3, True), (3, False)])
def test_any_s_with_its_matching_b_keeps_the_solver_exact(order, corrector):
    """g = e^{-∫s} f - ∫ e^{-∫s} b is constant whenever b = f' - s f, whatever s is: with the exact l, an arbitrary
    s(λ) = 0.8 sin(λ) and that b, the solver stays exact (this checks every s term: the Taylor weights, the
    transport of earlier nodes into the step's g, the b integral)."""
    ref = exact_ems(SCH)
    lam = ref.lambdas[:, None]
    f = -MU * ref.l  # f = (σ ε - l x)/α = -MU l for the single-variance Gaussian
    s = 0.8 * torch.sin(lam)
    stats = ref._replace(s=s, b=ref.b - s * f)
    for n in (5, 10, 20):
        assert last_state_error(stats, n, order=order, corrector=corrector) <= 3e-4, n
    assert last_state_error(ref._replace(s=s), 10, order=order, corrector=corrector) > 1e-2  # s without its b


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("n", [5, 10, 20])
def test_degenerate_ems_is_dpm_solver_pp(spacing, n):
    """l = 1, s = b = 0 (paper App. A.2): order 1 is DDIM, order 2 is diffusers' DPM-Solver++(2M) in its Taylor
    ('heun') form, both to 1e-5."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers = pytest.importorskip("diffusers")
    d = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
        solver_type="heun", final_sigmas_type="zero", lower_order_final=False, timestep_spacing=spacing,
    )  # fmt: skip
    d.set_timesteps(n)
    sch = NoiseSchedule.from_betas(d.betas)
    model = gaussian_model(sch)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = x.clone()
    for t in d.timesteps:
        ref = d.step(model(ref, torch.full((2,), int(t))), t, ref).prev_sample
    deg = degenerate_ems(sch)
    kw = dict(schedule=sch, stats=deg, corrector=False)
    ours = sample_dpm_v3(model, x.clone(), d.timesteps, order=2, lower_order_final=False, **kw)
    assert (ours - ref).abs().max() <= 1e-5
    first = sample_dpm_v3(model, x.clone(), d.timesteps, order=1, **kw)
    assert (first - sample_ddim(model, x.clone(), d.timesteps, schedule=sch)).abs().max() <= 1e-5


def _slope(errs: list[float], steps: tuple[int, ...]) -> float:
    return float(-np.polyfit(np.log(steps), np.log(errs), 1)[0])


@pytest.mark.parametrize(
    "order,corrector,low", [(1, False, 0.95), (2, False, 1.9), (3, False, 2.7), (1, True, 1.9)]
)
def test_convergence_order(order, corrector, low):
    """With non-exact statistics (degenerate) the predictor converges with its order as steps grow (logsnr steps,
    error at t = 0; measured slopes 1.00, 2.10, 2.91); the pseudo-order corrector lifts order 1 to 2 (2.06).
    ``lower_order_final`` (first-order last step) is off: it caps the asymptotic order at 2."""
    steps = (20, 40, 80)
    errs = [
        last_state_error(degenerate_ems(SCH), n, order=order, corrector=corrector, lower_order_final=False)
        for n in steps
    ]
    assert _slope(errs, steps) >= low, errs


@pytest.mark.parametrize("name", ["epsilon", "v", "x0"])
def test_parameterisations_give_the_same_sample(name):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = timesteps(8, "logsnr", schedule=SCH)
    ref = sample_dpm_v3(gaussian_model(SCH), x, ts, schedule=SCH, stats=exact_ems(SCH))
    out = sample_dpm_v3(gaussian_model(SCH, name), x, ts, schedule=SCH, stats=exact_ems(SCH), prediction=name)
    assert (out - ref).abs().max() <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order,corrector", [(1, False), (2, True), (3, True), (3, False)])
def test_no_nan_sweep_with_statistics(dtype, order, corrector):
    """Estimated statistics (per channel), every spacing, 1-53 steps, network output in fp32 / bf16."""
    var = torch.linspace(0.05, 1.0, 16, dtype=torch.float64).view(1, 1, 4, 4)
    data = MU + var.sqrt() * torch.randn(
        8, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    ems = compute_ems(gaussian_model(SCH, var=var), data, SCH, timesteps(40, "logsnr", schedule=SCH))
    exact = gaussian_model(SCH, "v", var=var)

    def model(x, t, c):
        return exact(x, t, c).to(dtype)

    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    for spacing in SPACINGS:
        for n in (1, 2, 3, 5, 10, 20, 53):
            ts = timesteps(n, spacing, schedule=SCH)
            out = sample_dpm_v3(
                model, x, ts, schedule=SCH, prediction="v", stats=ems, order=order, corrector=corrector
            )
            assert out.dtype == dtype and torch.isfinite(out.float()).all(), (spacing, n)


def test_contract_with_statistics():
    """One network call per step, cond passed through, callback once per step, deterministic; 3D, 2 channels."""
    shape = (2, 2, 4, 4, 4)
    base = gaussian_model(SCH, "x0")
    calls = []

    def model(x, t, c):
        calls.append(c)
        return base(x, t)

    ems = degenerate_ems(SCH, channels=2)._replace(l=torch.full((1000, 2), 0.7))
    ts = timesteps(6, "logsnr", schedule=SCH)
    steps: list[int] = []
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kw = dict(schedule=SCH, prediction="x0", cond="c", stats=ems)
    out = SAMPLERS["dpm_v3"](model, x, ts, callback=lambda i, t, s, x0: steps.append(t), **kw)
    assert len(calls) == network_evaluations("dpm_v3", 6) == 6 and set(calls) == {"c"}
    assert steps == ts.tolist() and out.shape == shape and torch.isfinite(out).all()
    assert torch.equal(out, SAMPLERS["dpm_v3"](model, x, ts, **kw))


def test_missing_statistics_warn_and_run_as_dpm_solver_pp():
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = timesteps(6, "logsnr", schedule=SCH)
    with pytest.warns(UserWarning, match="compute_ems"):
        out = sample_dpm_v3(gaussian_model(SCH), x, ts, schedule=SCH)
    assert torch.equal(
        out, sample_dpm_v3(gaussian_model(SCH), x, ts, schedule=SCH, stats=degenerate_ems(SCH))
    )


# --------------------------------------------------------------------------------------------- files and errors
def test_save_load_roundtrip_and_never_overwrite(tmp_path):
    ems = exact_ems(SCH)
    path = save_ems(ems, tmp_path / "dpm_v3_stats.safetensors")
    back = load_ems(path)
    assert all(torch.equal(a, b) for a, b in zip(ems, back))
    with pytest.raises(FileExistsError):
        save_ems(ems, path)
    save_ems(ems._replace(b=ems.b * 0), path, overwrite=True)
    assert load_ems(path).b.abs().max() == 0


def test_bad_files_and_inputs_raise(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="x.safetensors"):
        load_ems(bad)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_ems(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"l": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors"):
        load_ems(tmp_path / "other.safetensors")

    model, x = gaussian_model(SCH), torch.zeros(1, 1, 4, 4)
    ts = timesteps(5, "logsnr", schedule=SCH)
    cosine = NoiseSchedule.create("cosine")
    with pytest.raises(ValueError, match="another noise schedule"):
        sample_dpm_v3(model, x, ts, schedule=cosine, stats=exact_ems(SCH))
    narrow = compute_ems(model, x + MU, SCH, [500, 400])
    with pytest.raises(ValueError, match="cover"):
        sample_dpm_v3(model, x, ts, schedule=SCH, stats=narrow)
    with pytest.raises(ValueError, match="do not fit"):
        sample_dpm_v3(model, torch.zeros(1, 3, 4, 4), ts, schedule=SCH, stats=exact_ems(SCH))
    with pytest.raises(ValueError, match="order"):
        sample_dpm_v3(model, x, ts, schedule=SCH, stats=exact_ems(SCH), order=4)
    with pytest.raises(ValueError, match="channel, none"):
        compute_ems(model, x, SCH, [1, 0], reduce="pixel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="re-iterable"):
        compute_ems(model, (b for b in [x]), SCH, [1, 0])
    with pytest.raises(ValueError, match="at least two"):
        compute_ems(model, x, SCH, [5])
