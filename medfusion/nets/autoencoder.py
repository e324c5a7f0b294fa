"""The networks of DiffusionCT (:mod:`medfusion.models.diffusion_ct`): a skip-connected Gaussian-latent
encoder-decoder with DC-AE residual shortcuts, the gated regression U-Net, and the space <-> channel rearrangements
both use. Plain ``nn.Module``s: they know nothing of schedules or training.

Written here because MONAI's ``AutoencoderKL`` has neither a decoder skip path (which the DiffusionCT spec asks to
switch on and off, ``shared/reference/diffusionct_monai.md``) nor DC-AE's parameter-free shortcuts (Chen et al.,
"Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models", ICLR 2025, sec. 3.2), which make
the 16-channel f = 4 latent lossless at initialisation; the regression U-Net itself is MONAI's ``UNet``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv(spatial_dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Module:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
    return conv(cin, cout, kernel, stride=stride, padding=kernel // 2)


class ResBlock(nn.Module):
    def __init__(self, spatial_dims: int, cin: int, cout: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(min(groups, cin), cin),
            nn.SiLU(),
            conv(spatial_dims, cin, cout),
            nn.GroupNorm(min(groups, cout), cout),
            nn.SiLU(),
            conv(spatial_dims, cout, cout),
        )
        self.skip = nn.Identity() if cin == cout else conv(spatial_dims, cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


def space_to_channel(x: Tensor) -> Tensor:
    """``(B, C, *S)`` -> ``(B, C * 2^d, *S / 2)``; channel ``c * 2^d + k`` holds sub-pixel ``k`` of channel ``c``
    (``pixel_unshuffle`` for 2D and 3D alike)."""
    b, c, *size = x.shape
    d = len(size)
    split = [v for n in size for v in (n // 2, 2)]
    x = x.reshape(b, c, *split)
    order = [0, 1, *range(3, 2 + 2 * d, 2), *range(2, 2 + 2 * d, 2)]
    return x.permute(order).reshape(b, c * 2**d, *(n // 2 for n in size))


def channel_to_space(x: Tensor) -> Tensor:
    """Inverse of :func:`space_to_channel`."""
    b, c, *size = x.shape
    d = len(size)
    x = x.reshape(b, c // 2**d, *([2] * d), *size)
    order = [0, 1, *(v for i in range(d) for v in (2 + d + i, 2 + i))]
    return x.permute(order).reshape(b, c // 2**d, *(2 * n for n in size))


def group_mean(x: Tensor, channels: int) -> Tensor:
    """Mean of the channel groups ``x[:, g * channels:(g + 1) * channels]`` (DC-AE's channel averaging)."""
    return x.reshape(x.shape[0], x.shape[1] // channels, channels, *x.shape[2:]).mean(1)


def tile(x: Tensor, channels: int) -> Tensor:
    """Channels repeated up to ``channels`` (DC-AE's channel duplication); the inverse of :func:`group_mean` on
    tiled input."""
    return x.repeat(1, channels // x.shape[1], *([1] * (x.ndim - 2)))


class SkipAutoencoder(nn.Module):
    """U-Net encoder-decoder with a Gaussian latent bottleneck and decoder skips (concatenated per level).

    Written here because MONAI's ``AutoencoderKL`` has no skip path. Interface as ``AutoencoderKL``'s
    ``encode``/``decode`` plus the skip features.

    ``shortcuts=True`` adds the residual-autoencoding shortcuts of DC-AE (Chen et al., "Deep Compression
    Autoencoder for Efficient High-Resolution Diffusion Models", ICLR 2025, sec. 3.2): every change of resolution
    or width adds a parameter-free path, space-to-channel then channel-group averaging going down (and into the
    latent mean), channel duplication then channel-to-space going up (and out of the latent), so the convolutions
    learn a residual. Our ordering of the groups makes the composed shortcut an exact rearrangement when the latent
    holds as many values as the image (1 channel, factor 4, 16 latent channels in 2D): stage 1 then starts from a
    lossless latent instead of learning the noise texture pixel by pixel (tested).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: tuple[int, ...],
        latent_channels: int,
        num_res_blocks: int,
        norm_num_groups: int,
        skip_from_level: int = 0,
        shortcuts: bool = False,
    ):
        super().__init__()
        d, g = spatial_dims, norm_num_groups
        self.skip_from_level = int(skip_from_level)
        self.shortcuts = bool(shortcuts)
        if shortcuts:
            bad = [(a, b) for a, b in zip(channels, channels[1:]) if (a * 2**d) % b]
            if channels[0] % in_channels or bad or channels[-1] % latent_channels:
                raise ValueError(
                    f"shortcuts need channels[0] divisible by in_channels, channels[i] * 2^{d} divisible by "
                    f"channels[i + 1] and channels[-1] divisible by latent_channels; got in_channels={in_channels}, "
                    f"channels={tuple(channels)}, latent_channels={latent_channels}"
                )
        self.conv_in = conv(d, in_channels, channels[0])
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            self.enc.append(
                nn.Sequential(*[ResBlock(d, prev if j == 0 else ch, ch, g) for j in range(num_res_blocks)])
            )
            prev = ch
            if i < len(channels) - 1:
                # with shortcuts the width changes in the downsampling conv (its shortcut averages channel groups)
                nxt = channels[i + 1] if shortcuts else ch
                self.down.append(conv(d, ch, nxt, 3, stride=2))
                prev = nxt
        self.to_latent = conv(d, channels[-1], 2 * latent_channels, 1)
        self.from_latent = conv(d, latent_channels, channels[-1])
        self.mid = ResBlock(d, channels[-1], channels[-1], g)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(channels) - 2, -1, -1):
            self.up.append(conv(d, channels[i + 1], channels[i]))
            self.dec.append(
                nn.Sequential(
                    *[
                        ResBlock(d, self._dec_in(i, channels) if j == 0 else channels[i], channels[i], g)
                        for j in range(num_res_blocks)
                    ]
                )
            )
        self.conv_out = nn.Sequential(
            nn.GroupNorm(min(g, channels[0]), channels[0]), nn.SiLU(), conv(d, channels[0], in_channels)
        )

    def _dec_in(self, level: int, channels: tuple[int, ...]) -> int:
        return 2 * channels[level] if level >= self.skip_from_level else channels[level]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        h = self.conv_in(x)
        if self.shortcuts:
            h = h + tile(x, h.shape[1])
        skips = []
        for i, block in enumerate(self.enc):
            h = block(h)
            if i < len(self.down):
                skips.append(h)
                down = self.down[i](h)
                h = down + group_mean(space_to_channel(h), down.shape[1]) if self.shortcuts else down
        mu, logvar = self.to_latent(h).chunk(2, dim=1)
        if self.shortcuts:
            mu = mu + group_mean(h, mu.shape[1])
        sigma = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mu, sigma, tuple(skips)

    def decode(self, z: Tensor, skips: tuple[Tensor, ...]) -> Tensor:
        h = self.from_latent(z)
        if self.shortcuts:
            h = h + tile(z, h.shape[1])
        h = self.mid(h)
        levels = range(len(skips) - 1, -1, -1)
        for level, up, block, skip in zip(levels, self.up, self.dec, reversed(skips)):
            upped = up(F.interpolate(h, size=skip.shape[2:], mode="nearest"))
            if self.shortcuts:
                upped = upped + channel_to_space(tile(h, upped.shape[1] * 2 ** (h.ndim - 2)))
            # levels below skip_from_level get no skip: their fine texture must pass the bottleneck
            h = block(torch.cat([upped, skip], dim=1) if level >= self.skip_from_level else upped)
        out = self.conv_out(h)
        return out + group_mean(h, out.shape[1]) if self.shortcuts else out


def pixel_shuffle(x: Tensor, k: int) -> Tensor:
    """``k`` steps of :func:`channel_to_space`: ``(B, C, *S)`` -> ``(B, C / 2^(d k), *S * 2^k)``."""
    for _ in range(k):
        x = channel_to_space(x)
    return x


def pixel_unshuffle(x: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pixel_shuffle`."""
    for _ in range(k):
        x = space_to_channel(x)
    return x


class GatedUNet(nn.Module):
    """``g * UNet(z)`` with the scalar gate ``g = 0`` at start (ReZero, Bachlechner et al. 2021): the regression
    of :class:`DiffusionCT` starts from a zero residual, i.e. from the identity map of the latent. With
    ``pixel_shuffle = k`` the U-Net runs on the ``2^k`` finer grid (see :class:`DiffusionCT`)."""

    def __init__(self, spatial_dims: int, channels: int, widths: tuple[int, ...], pixel_shuffle: int = 0):
        super().__init__()
        from monai.networks.nets import UNet

        self.k = pixel_shuffle
        c = channels // 2 ** (spatial_dims * pixel_shuffle)
        self.unet = UNet(
            spatial_dims, c, c, channels=widths, strides=(2,) * (len(widths) - 1), num_res_units=1
        )
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, z: Tensor) -> Tensor:
        return self.gate * pixel_unshuffle(self.unet(pixel_shuffle(z, self.k)), self.k)
