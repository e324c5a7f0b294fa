"""DiffusionCT's stage-1 networks behind one contract (encode -> Encoded(mean, sigma, skips), decode(z, skips)), the
DC-AE shortcuts, the space <-> channel rearrangements and the ImageGrid wrapper."""

from __future__ import annotations

import pytest
import torch

from medfusion.nets.autoencoder import Encoded, KLAutoencoder, SkipAutoencoder, build_autoencoder
from medfusion.nets.latent_grid import (
    ImageGrid,
    channel_to_space,
    on_grid,
    pixel_shuffle,
    pixel_unshuffle,
    space_to_channel,
)

KW = dict(in_channels=1, channels=(8, 16), latent_channels=2, num_res_blocks=1, norm_num_groups=4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("architecture", ["kl", "skip"])
def test_one_contract_for_both_architectures(spatial_dims, architecture):
    torch.manual_seed(0)
    net = build_autoencoder(architecture, spatial_dims, **KW)
    assert isinstance(net, KLAutoencoder if architecture == "kl" else SkipAutoencoder)
    assert net.downsample_factor == 2 and net.latent_channels == 2
    x = torch.rand(2, 1, *([16] * spatial_dims)) * 2 - 1
    enc = net.encode(x)
    assert isinstance(enc, Encoded)
    assert enc.mean.shape == enc.sigma.shape == (2, 2, *([8] * spatial_dims)) and (enc.sigma > 0).all()
    assert len(enc.skips) == (1 if architecture == "skip" else 0)
    assert net.decode(enc.mean, enc.skips).shape == x.shape


def test_options_belong_to_their_architecture():
    with pytest.raises(ValueError, match="kl, skip"):
        build_autoencoder("unet", 2, **KW)
    with pytest.raises(ValueError, match="architecture='skip'"):
        build_autoencoder("kl", 2, **KW, shortcuts=True)
    with pytest.raises(ValueError, match="architecture='kl'"):
        build_autoencoder("skip", 2, **KW, attention=True)
    with pytest.raises(ValueError, match="skip_from_level"):
        build_autoencoder("skip", 2, **KW, skip_from_level=2)
    with pytest.raises(ValueError, match="skip"):
        build_autoencoder("kl", 2, **KW).decode(torch.zeros(1, 2, 8, 8), (torch.zeros(1, 8, 16, 16),))
    with pytest.raises(ValueError, match="skip tensors"):
        build_autoencoder("skip", 2, **KW).decode(torch.zeros(1, 2, 8, 8), ())


def test_skip_from_level_drops_the_full_resolution_skip():
    torch.manual_seed(0)
    net = build_autoencoder("skip", 2, **{**KW, "channels": (8, 16, 16)}, skip_from_level=1)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    enc = net.encode(x)
    out = net.decode(enc.mean, enc.skips)
    # the full-resolution skip (level 0) is ignored, the half-resolution one (level 1) is used
    noisy0 = (enc.skips[0] + torch.randn_like(enc.skips[0]), enc.skips[1])
    torch.testing.assert_close(net.decode(enc.mean, noisy0), out)
    noisy1 = (enc.skips[0], enc.skips[1] + torch.randn_like(enc.skips[1]))
    assert not torch.allclose(net.decode(enc.mean, noisy1), out)


@pytest.mark.parametrize("spatial_dims, channels, latent", [(2, (32, 64, 64), 16), (3, (8, 16), 8)])
def test_shortcuts_alone_are_a_lossless_latent(spatial_dims, channels, latent):
    """DC-AE residual autoencoding: with every convolution zeroed only the shortcuts remain, and when the latent
    holds as many values as the image they compose to an exact rearrangement (decode(encode(x)) == x)."""
    net = build_autoencoder(
        "skip", spatial_dims, 1, channels, latent, 1, 4, skip_from_level=len(channels) - 1, shortcuts=True
    )
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias)
    x = torch.rand(2, 1, *([16] * spatial_dims)) * 2 - 1
    enc = net.encode(x)
    assert enc.mean.numel() == x.numel()
    torch.testing.assert_close(net.decode(enc.mean, enc.skips), x)
    with pytest.raises(ValueError, match="divisible"):
        build_autoencoder("skip", 2, 1, (8, 48), 4, 1, 4, skip_from_level=1, shortcuts=True)


@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (2, 2, 4, 6, 8)])
def test_space_to_channel_round_trip(shape):
    x = torch.randn(shape)
    y = space_to_channel(x)
    assert y.shape == (shape[0], shape[1] * 2 ** (len(shape) - 2), *(n // 2 for n in shape[2:]))
    torch.testing.assert_close(channel_to_space(y), x, rtol=0, atol=0)
    if len(shape) == 4:  # the 2D case is torch's pixel_unshuffle
        torch.testing.assert_close(y, torch.nn.functional.pixel_unshuffle(x, 2), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 16, 4, 6), (1, 64, 2, 2, 4)])
def test_pixel_shuffle_round_trip(shape):
    x = torch.randn(shape)
    k = 2 if len(shape) == 4 else 1
    y = pixel_shuffle(x, k)
    assert y.shape == (shape[0], shape[1] // 2 ** (k * (len(shape) - 2)), *(s * 2**k for s in shape[2:]))
    torch.testing.assert_close(pixel_unshuffle(y, k), x)


def test_image_grid_runs_the_network_on_the_finer_grid():
    """ImageGrid(net, k): net sees x and the image condition shuffled by k, timesteps unchanged; its output comes back
    on the latent grid. With an identity network the wrapper is the identity; k = 0 is no wrapper."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, t, cond):
            seen.append((x.shape, t.shape, cond.shape))
            return x + cond

    x, cond, t = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([1, 2])
    out = ImageGrid(Probe(), 2)(x, t, cond)
    assert seen == [((2, 1, 16, 16), (2,), (2, 1, 16, 16))]
    torch.testing.assert_close(out, x + cond)
    probe = Probe()
    assert on_grid(probe, 0) is probe
    with pytest.raises(ValueError, match="k >= 1"):
        ImageGrid(probe, 0)
