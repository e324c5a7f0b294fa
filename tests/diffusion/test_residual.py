"""RDDM math: faithfulness to the paper and the official code (float64 reference values)."""

from __future__ import annotations

import pytest
import torch

from medfusion.diffusion import residual as R


def _ddpm_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


# --- 1. schedule invariants ------------------------------------------------------------------------------
@pytest.mark.parametrize("sum_scale", [1.0, 0.01])
def test_schedule_invariants_and_table(sum_scale):
    sch = R.residual_schedule(1000, sum_scale=sum_scale)
    assert sch.alphas_cumsum[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert sch.betas2_cumsum[-1].item() == pytest.approx(sum_scale, abs=1e-12)
    assert sch.alphas.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.all(torch.diff(sch.alphas_cumsum) > 0) and torch.all(torch.diff(sch.betas2_cumsum) > 0)
    t = torch.tensor([1, 200, 400, 600, 800, 1000])
    abar = torch.tensor([0.001998, 0.359840, 0.639760, 0.839760, 0.959840, 1.0], dtype=torch.float64)
    bbar = torch.tensor([0.001414, 0.200399, 0.400300, 0.600200, 0.800100, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sch.alphas_cumsum[t - 1], abar, atol=1e-6, rtol=0)
    torch.testing.assert_close(sch.betas_cumsum[t - 1], bbar * sum_scale**0.5, atol=1e-6, rtol=0)
    # closed forms
    tt = torch.arange(1, 1001, dtype=torch.float64)
    torch.testing.assert_close(sch.alphas_cumsum, tt * (2001 - tt) / (1000 * 1001))
    torch.testing.assert_close(sch.betas2_cumsum, sum_scale * tt * (tt + 1) / (1000 * 1001))


@pytest.mark.parametrize("shape", ["power_increasing", "power_decreasing", "average", "normal"])
def test_other_shapes_sum_to_one(shape):
    w = R.schedule_weights(50, shape, ratio=2.0)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12) and torch.all(w >= 0)
    if shape == "power_increasing":
        assert w[0].item() == 0.0


def test_bad_options_raise():
    with pytest.raises(ValueError, match="linear_decreasing"):
        R.schedule_weights(10, "cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sum_scale"):
        R.residual_schedule(10, sum_scale=2.0)
    with pytest.raises(ValueError, match="res_noise"):
        R.loss_targets("eps", torch.zeros(1), torch.zeros(1), torch.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_steps"):
        R.sampling_timesteps(0, 10)


# --- 2. forward identities -------------------------------------------------------------------------------
def test_forward_identities():
    g = torch.Generator().manual_seed(0)
    sch = R.residual_schedule(1000, sum_scale=0.01)
    x0, x_in, eps = (torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(3))
    T = torch.full((4,), 999)
    torch.testing.assert_close(R.q_sample(x0, x_in, T, sch, eps), x_in + 0.1 * eps, atol=1e-12, rtol=0)
    t = torch.randint(0, 1000, (4,), generator=g)
    xt = R.q_sample(x0, x_in, t, sch, eps)
    a, b = sch.at(t)
    rec = (xt - x0 - a.view(-1, 1, 1, 1) * (x_in - x0)) / b.view(-1, 1, 1, 1)
    torch.testing.assert_close(rec, eps, atol=1e-9, rtol=0)


def test_composed_increments_match_marginal_monte_carlo():
    g = torch.Generator().manual_seed(1)
    sch = R.residual_schedule(20, sum_scale=1.0)
    x0 = torch.tensor([0.3], dtype=torch.float64)
    x_in = torch.tensor([-0.5], dtype=torch.float64)
    n = 200_000
    x = x0.expand(n).clone()
    for a, b2 in zip(sch.alphas, sch.betas2):
        x = x + a * (x_in - x0) + b2.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    assert x.mean().item() == pytest.approx((x0 + (x_in - x0)).item(), abs=5e-3)
    assert x.var().item() == pytest.approx(sch.betas2_cumsum[-1].item(), rel=1e-2)


# --- 3. oracle sampler ---------------------------------------------------------------------------------------
def test_time_pairs():
    assert R.sampling_timesteps(5) == [(999, 799), (799, 599), (599, 399), (399, 199), (199, -1)]
    assert R.sampling_timesteps(2) == [(999, 499), (499, -1)]
    assert len(R.sampling_timesteps(10)) == 10 and R.sampling_timesteps(10)[0] == (999, 899)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 4e-7)])
@pytest.mark.parametrize("objective", ["res_noise", "res"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_oracle_sampler_returns_x0(dtype, tol, objective, steps):
    g = torch.Generator().manual_seed(2)
    sch = R.residual_schedule(1000, sum_scale=0.01)
    x0 = torch.rand(2, 1, 8, 8, generator=g, dtype=dtype) * 2 - 1
    x_in = (x0 + 0.3 * torch.randn(2, 1, 8, 8, generator=g, dtype=dtype)).clamp(-1, 1)
    z = torch.randn(2, 1, 8, 8, generator=g, dtype=dtype)

    def oracle(x_t, t, x_in_):
        a, b = sch.at(t)
        res = x_in_ - x0
        eps = (x_t - x0 - a.view(-1, 1, 1, 1).to(x_t) * res) / b.view(-1, 1, 1, 1).to(x_t)
        return torch.cat([res, eps], 1) if objective == "res_noise" else res

    out = R.sample_rddm(oracle, x_in, sch, steps, objective=objective, clip=None, noise=z)
    torch.testing.assert_close(out, x0, atol=tol, rtol=0)


def test_sampler_seeded_and_eta():
    sch = R.residual_schedule(1000, sum_scale=1.0)
    x_in = torch.zeros(1, 1, 4, 4)

    def model(x_t, t, x_in_):
        return torch.cat([0.1 * x_t, x_t], 1)

    outs = [
        R.sample_rddm(model, x_in, sch, 5, eta=1.0, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().max() <= 1.0
    det = R.sample_rddm(model, x_in, sch, 5, eta=0.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(det, outs[0])


# --- 4. DDPM/DDIM coefficient transform ----------------------------------------------------------------------
def test_ddpm_transform_marginal_and_ddim_step():
    ab = _ddpm_alphas_cumprod()
    sch = R.schedule_from_ddpm(ab)
    assert sch.alphas_cumsum[-1].item() == pytest.approx(0.993647, abs=1e-6)
    assert sch.betas2_cumsum[-1].item() == pytest.approx(0.999960, abs=1e-6)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(3, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 1, 6, 6, generator=g, dtype=torch.float64)
    zero = torch.zeros_like(x0)
    t = torch.tensor([10, 500, 990])
    ddpm = ab[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(R.q_sample(x0, zero, t, sch, eps), ddpm, atol=1e-15, rtol=0)

    # one deterministic step with Î_res derived from an imperfect ε̂ equals DDIM η=0
    for tk, sk in [(999, 799), (500, 250), (120, 0)]:
        x_t = R.q_sample(x0, zero, torch.full((3,), tk), sch, eps)
        eps_hat = eps + 0.1 * torch.randn(eps.shape, generator=g, dtype=torch.float64)
        pred = R.predictions_from_output("noise", eps_hat, x_t, zero, torch.tensor(tk), sch, clip=None)
        ours = R.ddim_step(x_t, pred, tk, sk, sch)
        x0_hat = (x_t - (1 - ab[tk]).sqrt() * eps_hat) / ab[tk].sqrt()
        ddim = ab[sk].sqrt() * x0_hat + (1 - ab[sk]).sqrt() * eps_hat
        torch.testing.assert_close(ours, ddim, atol=2e-14, rtol=0)
        # guard: η=1 variances differ by the factor ā_s (stochastic equivalence does not hold)
        ddim_var = (1 - ab[sk]) / (1 - ab[tk]) * (1 - ab[tk] / ab[sk])
        assert (R.step_variance(sch, tk, sk, 1.0) / ddim_var).item() == pytest.approx(
            ab[sk].item(), rel=1e-10
        )


# --- 5. posterior consistency --------------------------------------------------------------------------------
def test_posterior_matches_step_with_S_equal_T():
    T = 50
    sch = R.residual_schedule(T, sum_scale=0.5)
    post = R.posterior_coefficients(sch)
    g = torch.Generator().manual_seed(5)
    x_t, res, eps = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    pairs = R.sampling_timesteps(T, T)
    assert pairs[0] == (T - 1, T - 2) and pairs[-1] == (0, -1)
    for t, s in pairs[:-1]:
        assert s == t - 1
        var = R.step_variance(sch, t, s, 1.0)
        assert var.item() == pytest.approx(post.variance[t].item(), rel=1e-12)
        a, b = sch.at(t)
        x0_hat = x_t - a * res - b * eps  # unclipped
        mean = R.ddim_step(
            x_t, R.ResidualPrediction(res, eps, x0_hat), t, s, sch, eta=1.0, noise=torch.zeros_like(x_t)
        )
        ref = post.coef1[t] * x_t + post.coef2[t] * res + post.coef3[t] * x0_hat
        torch.testing.assert_close(mean, ref, atol=1e-12, rtol=0)
        closed = x_t - sch.alphas[t] * res - sch.betas2[t] / b * eps
        torch.testing.assert_close(mean, closed, atol=1e-12, rtol=0)


def test_adapters_and_targets_consistent():
    g = torch.Generator().manual_seed(6)
    sch = R.residual_schedule(1000, sum_scale=0.01)
    x0, x_in = (torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 1.0 - 0.5 for _ in range(2))
    eps = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([300, 700])
    x_t = R.q_sample(x0, x_in, t, sch, eps)
    for obj in ["res_noise", "res", "noise", "x0_noise"]:
        tgt = R.loss_targets(obj, x0, x_in, eps)
        assert tgt.shape[1] == R.NUM_HEADS[obj]
        p = R.predictions_from_output(obj, tgt, x_t, x_in, t, sch, clip=None)
        torch.testing.assert_close(p.x0, x0, atol=1e-9, rtol=0)
        torch.testing.assert_close(p.res, x_in - x0, atol=1e-9, rtol=0)
        torch.testing.assert_close(p.noise, eps, atol=1e-9, rtol=0)
    # default clip clamps Î_res to [-1, 1] as the official code does
    big = R.predictions_from_output(
        "res",
        torch.full((1, 1, 2, 2), 1.7),
        torch.zeros(1, 1, 2, 2),
        torch.zeros(1, 1, 2, 2),
        torch.tensor([5]),
        sch,
    )
    assert big.res.max().item() == 1.0
    assert R.clip_range(1.0) == (-1.0, 1.0) and R.clip_range(None) is None
