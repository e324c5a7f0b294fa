"""DeepCache (Ma et al., CVPR 2024): interval 1 is the network exactly, larger intervals call the deep blocks less
often, with any sampler, 2D and 3D, also inside ImageGrid."""

from __future__ import annotations

import pytest
import torch

from medfusion.diffusion.samplers import SAMPLERS, network_evaluations
from medfusion.diffusion.schedules import NoiseSchedule, timesteps
from medfusion.nets.deepcache import CachedUNet, deep_cache
from medfusion.nets.latent_grid import ImageGrid
from medfusion.nets.unet import DiffusionUNet


def _net(spatial_dims: int, cond: int = 0, **kw) -> DiffusionUNet:
    torch.manual_seed(0)
    net = DiffusionUNet(
        spatial_dims, in_channels=1, out_channels=1, cond_channels=cond, channels=(8, 16, 16),
        attention_levels=(False, False, True), norm_num_groups=8, num_head_channels=8, **kw,
    ).eval()  # fmt: skip
    with torch.no_grad():  # MONAI zero-initialises output convolutions: give every weight a value
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _count_middle(net: DiffusionUNet) -> list[int]:
    count = [0]
    net.unet.middle_block.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("branch", [0, 1])
def test_interval_one_is_the_network_exactly(spatial_dims, branch):
    net = _net(spatial_dims)
    x = torch.randn(2, 1, *([8] * spatial_dims), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 500])
    cached = CachedUNet(net.unet, interval=1, branch=branch)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(cached(x, t), net.unet(x, timesteps=t))
    assert cached.full_calls == 3 and cached.shallow_calls == 0


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    "arch", [{}, {"num_res_blocks": (2, 1, 3), "resblock_updown": True}], ids=["plain", "mixed"]
)
def test_shallow_call_on_its_own_cache_equals_the_full_call(spatial_dims, arch):
    """Called twice with the same input, the second (shallow) call reuses features that equal what a full call
    computes, so it must give the full output exactly: the shallow branch takes the right skip connections."""
    net = _net(spatial_dims, **arch)
    x = torch.randn(2, 1, *([8] * spatial_dims), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 10])
    with torch.no_grad():
        ref = net.unet(x, timesteps=t)
        for branch in range(3):
            cached = CachedUNet(net.unet, interval=2, branch=branch)
            full, shallow = cached(x, t), cached(x, t)
            assert torch.equal(full, ref) and torch.equal(shallow, ref), branch
            assert (cached.full_calls, cached.shallow_calls) == (1, 1)
            assert not torch.equal(cached(x, t + 1), ref)  # a full call again (interval 2) at another t


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "plms", "deis"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_samplers_with_cache_call_the_deep_blocks_less(name, spatial_dims):
    sch = NoiseSchedule.create("linear")
    net = _net(spatial_dims, cond=1)
    middle = _count_middle(net)
    x = torch.randn(1, 1, *([8] * spatial_dims), generator=torch.Generator().manual_seed(2))
    cond = torch.randn_like(x)
    ts = timesteps(6, "trailing", schedule=sch)
    kw = dict(schedule=sch, prediction="v", cond=cond)
    with torch.no_grad():
        ref = SAMPLERS[name](net, x, ts, **kw)
        nfe = network_evaluations(name, len(ts))
        assert middle[0] == nfe
        with deep_cache(net, interval=1):
            assert torch.equal(SAMPLERS[name](net, x, ts, **kw), ref)  # interval 1: the base sampler exactly
        middle[0] = 0
        with deep_cache(net, interval=3) as (cached,):
            out = SAMPLERS[name](net, x, ts, **kw)
        assert (
            middle[0] == cached.full_calls == -(-nfe // 3) and cached.shallow_calls == nfe - cached.full_calls
        )
    assert isinstance(net.unet, torch.nn.Module) and not isinstance(net.unet, CachedUNet)  # restored
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)


def test_inside_image_grid_and_errors():
    net = _net(2)
    grid = ImageGrid(net, 1)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500])
    with torch.no_grad(), deep_cache(grid, interval=2) as (cached,):
        grid(x, t)
        grid(x, t)
    assert (cached.full_calls, cached.shallow_calls) == (1, 1)
    with pytest.raises(ValueError, match="interval"):
        CachedUNet(net.unet, interval=0)
    with pytest.raises(ValueError, match="branch"):
        CachedUNet(net.unet, interval=2, branch=3)
    with pytest.raises(ValueError, match="DiffusionUNet"), deep_cache(torch.nn.Linear(2, 2), interval=2):
        pass
