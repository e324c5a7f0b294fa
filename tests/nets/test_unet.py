"""DiffusionUNet: shapes 2D/3D with an image condition, SDPA attention always on, training step lowers the loss."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from medfusion.diffusion.gaussian import diffusion_loss, q_sample
from medfusion.diffusion.schedules import NoiseSchedule
from medfusion.nets.unet import DiffusionUNet, autocast_context

TINY = dict(channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)


def _net(spatial_dims, cond_channels=1):
    torch.manual_seed(0)
    net = DiffusionUNet(spatial_dims, in_channels=1, out_channels=1, cond_channels=cond_channels, **TINY)
    with torch.no_grad():  # MONAI zero-initialises the output conv; make the output depend on the input
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return net


@pytest.mark.parametrize("spatial_dims,size", [(2, (16, 16)), (3, (8, 8, 8))])
def test_forward_shape_and_sdpa(spatial_dims, size, monkeypatch):
    net = _net(spatial_dims)
    flags = [m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention")]
    assert flags and all(flags)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return sdpa(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x, c = torch.randn(2, 1, *size), torch.randn(2, 1, *size)
    out = net(x, torch.tensor([3, 900]), c)
    assert out.shape == x.shape
    assert calls  # attention really went through SDPA
    # the condition reaches the network
    assert (net(x, torch.tensor([3, 900]), c + 1) - out).abs().max() > 0


def test_one_optimisation_step_lowers_the_loss():
    net = _net(2)
    sch = NoiseSchedule.create()
    g = torch.Generator().manual_seed(0)
    x0, noise, cond = (torch.randn(4, 1, 16, 16, generator=g) for _ in range(3))
    t = torch.tensor([10, 200, 500, 900])
    x_t = q_sample(x0, t, noise, sch)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def loss():
        with autocast_context("cpu"):
            return diffusion_loss(net(x_t, t, cond), x0, noise, t, sch, "v", min_snr_gamma=5.0)

    before = loss()
    before.backward()
    opt.step()
    opt.zero_grad()
    assert loss().item() < before.item()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="norm_num_groups"):
        DiffusionUNet(2, channels=(8, 12), attention_levels=(False, True), norm_num_groups=8)
    with pytest.raises(ValueError, match="spatial_dims"):
        DiffusionUNet(1)
    net = _net(2)
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="cond"):
        net(x, torch.tensor([1]))
    with pytest.raises(ValueError, match="cond"):
        _net(2, cond_channels=0)(x, torch.tensor([1]), x)


def test_autocast_context_is_noop_on_cpu():
    with autocast_context("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" on CPU machines
        assert isinstance(autocast_context(torch.device("cuda")), torch.autocast)


@pytest.mark.gpu
@pytest.mark.parametrize("spatial_dims,size", [(2, (64, 64)), (3, (32, 32, 32))])
def test_bf16_sdpa_training_step_on_cuda(spatial_dims, size):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    net = _net(spatial_dims).cuda()
    x, c = torch.randn(2, 1, *size, device="cuda"), torch.randn(2, 1, *size, device="cuda")
    with autocast_context("cuda"):
        out = net(x, torch.tensor([3, 900], device="cuda"), c)
        assert out.dtype == torch.bfloat16
        loss = out.float().pow(2).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
