"""DRDM recovery network contract: forward(x, t) -> field of the right shape, recursion, time table."""

from __future__ import annotations

import math

import pytest
import torch

from medfusion.fields import compose, warp
from medfusion.nets.drdm import DRDMRecoveryNet, drdm_time_table


@pytest.mark.parametrize("nd, n_params", [(2, 435_435), (3, 1_305_646)])
def test_shapes_and_parameter_count_match_official(nd, n_params):
    torch.manual_seed(0)
    net = DRDMRecoveryNet(spatial_dims=nd)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == n_params
    x = torch.rand(2, 1, *([16] * nd))
    out = net(x, torch.tensor([0, 79]))
    assert out.shape == (2, nd, *([16] * nd)) and torch.isfinite(out).all()


def test_time_table_uses_official_exponent():
    e = drdm_time_table(80, 100)
    assert e.shape == (80, 100)
    t, k = 7, 3
    w = 10000 ** (-4 * k / 100)
    assert e[t, 2 * k].item() == pytest.approx(math.sin(t * w), abs=1e-6)
    assert e[t, 2 * k + 1].item() == pytest.approx(math.cos(t * w), abs=1e-6)


def test_recursion_is_composition_of_weight_shared_passes():
    torch.manual_seed(1)
    net = DRDMRecoveryNet(spatial_dims=2, recursion=2, normalize_input=False)
    with torch.no_grad():  # make the field non-trivial so the inner warp matters
        net.head.weight.mul_(50)
    x = torch.rand(1, 1, 16, 16)
    t = torch.tensor([30])
    u1 = net.single_pass(x, t)
    u2 = net.single_pass(warp(x, u1), t)
    assert torch.allclose(net(x, t), compose(u1, u2), atol=1e-5)
    single = DRDMRecoveryNet(spatial_dims=2, recursion=1, normalize_input=False)
    single.load_state_dict(net.state_dict())
    assert torch.allclose(single(x, t), u1, atol=1e-6)


def test_gradients_flow_through_inner_warp():
    torch.manual_seed(2)
    net = DRDMRecoveryNet(spatial_dims=2, normalize_input=False)
    with torch.no_grad():
        net.head.weight.mul_(50)
    x = torch.rand(1, 1, 16, 16)
    t = torch.tensor([10])
    net(x, t).pow(2).sum().backward()
    full = net.head.weight.grad.clone()
    net.zero_grad()
    u1 = net.single_pass(x, t)
    u2 = net.single_pass(warp(x, u1.detach()), t)  # cut the path through the warp
    compose(u1, u2).pow(2).sum().backward()
    assert not torch.allclose(full, net.head.weight.grad)


def test_bad_inputs_raise():
    net = DRDMRecoveryNet(spatial_dims=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.rand(1, 1, 12, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match="t must lie"):
        net(torch.rand(1, 1, 16, 16), torch.tensor([80]))
    with pytest.raises(ValueError, match="spatial dims"):
        net(torch.rand(1, 1, 16, 16, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match="spatial_dims"):
        DRDMRecoveryNet(spatial_dims=1)


def test_input_normalisation_makes_intensity_range_irrelevant():
    torch.manual_seed(3)
    net = DRDMRecoveryNet(spatial_dims=2)
    x = torch.rand(2, 1, 16, 16)
    t = torch.tensor([5, 40])
    assert torch.allclose(net(x, t), net(x * 2000 - 1000, t), atol=1e-4)
