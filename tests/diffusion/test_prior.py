"""DiffIR IPR diffusion: faithfulness to the official code (x0 prediction, posterior-mean steps, T = 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfusion.diffusion import prior as P


def test_schedule_values():
    s = P.prior_schedule()
    ref = dict(
        betas=[0.1, 0.294286, 0.590952, 0.99],
        alphas_cumprod=[0.9, 0.635143, 0.259804, 0.002598],
        c1=[1.0, 0.765187, 0.636270, 0.505927],
        c2=[0.0, 0.230246, 0.315256, 0.074212],
    )
    for name, vals in ref.items():
        torch.testing.assert_close(
            getattr(s, name), torch.tensor(vals, dtype=torch.float64), atol=1e-6, rtol=0
        )
    assert s.c1[0].item() == pytest.approx(1.0, abs=1e-15) and s.c2[0].item() == 0.0
    assert s.alphas_cumprod[-1].sqrt().item() == pytest.approx(0.051, abs=1e-3)


def test_bad_schedule_raises():
    with pytest.raises(ValueError):
        P.prior_schedule(0)
    with pytest.raises(ValueError):
        P.prior_schedule(4, 0.5, 0.1)


def test_oracle_chain_returns_z():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(3, 256, generator=g)
    calls = []

    def oracle(z_t, cond, t):
        calls.append(int(t[0]))
        return z

    out = P.sample_prior(oracle, torch.zeros(3, 256), P.prior_schedule(), generator=g)
    torch.testing.assert_close(out, z, atol=1e-6, rtol=0)
    assert calls == [3, 2, 1, 0]


def test_training_path_gradients_reach_cond_and_denoiser():
    torch.manual_seed(0)
    net = nn.Linear(2 * 8 + 1, 8)
    cpen = nn.Linear(4, 8)

    def den(z_t, cond, t):
        return net(torch.cat([cond, t.float()[:, None] / 40, z_t], 1))

    z = torch.rand(2, 8)
    zhat = P.prior_train_forward(den, z, cpen(torch.rand(2, 4)), P.prior_schedule())
    (zhat - z).abs().mean().backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    assert cpen.weight.grad is not None and cpen.weight.grad.abs().sum() > 0


def test_inference_bit_identical_under_seed():
    cond = torch.rand(2, 256)

    def den(z_t, c, t):
        return 0.5 * z_t + c

    a = P.sample_prior(den, cond, P.prior_schedule(), generator=torch.Generator().manual_seed(7))
    b = P.sample_prior(den, cond, P.prior_schedule(), generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 256) and torch.equal(a, b)
