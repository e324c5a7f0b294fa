"""The encoder-decoders of DiffusionCT stage 1 behind one contract, :class:`LatentAutoencoder`:
``encode(x) -> Encoded(mean, sigma, skips)`` and ``decode(z, skips) -> image``.

* :class:`KLAutoencoder`: MONAI's ``AutoencoderKL`` (the Gaussian-latent autoencoder of Rombach et al. 2022, "High-
  Resolution Image Synthesis with Latent Diffusion Models", CVPR), no skips; a thin adapter.
* :class:`SkipAutoencoder`: a U-Net-style encoder-decoder with a Gaussian latent bottleneck, decoder skips from the
  levels ``>= skip_from_level`` and optionally DC-AE's parameter-free residual shortcuts (Chen et al., "Deep
  Compression Autoencoder for Efficient High-Resolution Diffusion Models", ICLR 2025, sec. 3.2). Written here
  because MONAI ships no autoencoder with a decoder skip path or such shortcuts.

:func:`build_autoencoder` picks one by name (``"kl"`` or ``"skip"``). Plain ``nn.Module``s: they know nothing of
schedules or training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion.nets.latent_grid import channel_to_space, space_to_channel

Architecture = Literal["kl", "skip"]
ARCHITECTURES: tuple[str, ...] = ("kl", "skip")


class Encoded(NamedTuple):
    """Posterior of an image: ``mean`` and ``sigma`` ``(B, C_lat, *spatial / f)`` (unscaled), and ``skips``, the
    encoder features the decoder takes (an empty tuple for autoencoders without skips)."""

    mean: Tensor
    sigma: Tensor
    skips: tuple[Tensor, ...]


class LatentAutoencoder(Protocol):
    """The contract of DiffusionCT's stage-1 networks (``nn.Module``s)."""

    downsample_factor: int
    latent_channels: int

    def encode(self, x: Tensor) -> Encoded: ...

    def decode(self, z: Tensor, skips: tuple[Tensor, ...]) -> Tensor: ...


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


def group_mean(x: Tensor, channels: int) -> Tensor:
    """Mean of the channel groups ``x[:, g * channels:(g + 1) * channels]`` (DC-AE's channel averaging)."""
    return x.reshape(x.shape[0], x.shape[1] // channels, channels, *x.shape[2:]).mean(1)


def tile(x: Tensor, channels: int) -> Tensor:
    """Channels repeated up to ``channels`` (DC-AE's channel duplication); the inverse of :func:`group_mean` on
    tiled input."""
    return x.repeat(1, channels // x.shape[1], *([1] * (x.ndim - 2)))


class KLAutoencoder(nn.Module):
    """MONAI ``AutoencoderKL`` behind :class:`LatentAutoencoder` (no skips; ``decode`` takes an empty tuple).

    ``attention``: self-attention in the deepest level and the encoder's / decoder's non-local blocks (costly in 3D).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        latent_channels: int,
        num_res_blocks: int,
        norm_num_groups: int,
        attention: bool = False,
    ) -> None:
        super().__init__()
        from monai.networks.nets import AutoencoderKL

        n = len(channels)
        self.kl = AutoencoderKL(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(channels),
            latent_channels=latent_channels,
            num_res_blocks=(num_res_blocks,) * n,
            attention_levels=(False,) * (n - 1) + (bool(attention),),
            norm_num_groups=norm_num_groups,
            with_encoder_nonlocal_attn=bool(attention),
            with_decoder_nonlocal_attn=bool(attention),
        )
        self.downsample_factor = 2 ** (n - 1)
        self.latent_channels = int(latent_channels)

    def encode(self, x: Tensor) -> Encoded:
        mu, sigma = self.kl.encode(x)
        return Encoded(mu, sigma, ())

    def decode(self, z: Tensor, skips: tuple[Tensor, ...] = ()) -> Tensor:
        if skips:
            raise ValueError("KLAutoencoder has no skip path: decode takes an empty skips tuple")
        return self.kl.decode(z)


class SkipAutoencoder(nn.Module):
    """U-Net encoder-decoder with a Gaussian latent bottleneck and decoder skips (concatenated per level).

    Written here because MONAI's ``AutoencoderKL`` has no skip path. ``skip_from_level``: only encoder levels
    ``>= skip_from_level`` feed the decoder (0 = every level; ``len(channels) - 1`` = none).

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
        channels: Sequence[int],
        latent_channels: int,
        num_res_blocks: int,
        norm_num_groups: int,
        skip_from_level: int = 0,
        shortcuts: bool = False,
    ):
        super().__init__()
        d, g = spatial_dims, norm_num_groups
        if not 0 <= skip_from_level <= len(channels) - 1:
            raise ValueError(
                f"skip_from_level must be in 0..{len(channels) - 1} (len(channels) - 1), got {skip_from_level}"
            )
        channels = tuple(int(c) for c in channels)
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.latent_channels = int(latent_channels)
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

    def encode(self, x: Tensor) -> Encoded:
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
        return Encoded(mu, sigma, tuple(skips))

    def decode(self, z: Tensor, skips: tuple[Tensor, ...]) -> Tensor:
        if len(skips) != len(self.up):
            raise ValueError(
                f"this SkipAutoencoder's decode needs the encoder's {len(self.up)} skip tensors (encode(x).skips; "
                f"the skip levels also give the decoder its sizes), got {len(skips)}"
            )
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


def build_autoencoder(
    architecture: Architecture,
    spatial_dims: int,
    in_channels: int,
    channels: Sequence[int],
    latent_channels: int,
    num_res_blocks: int,
    norm_num_groups: int,
    *,
    attention: bool = False,
    skip_from_level: int = 0,
    shortcuts: bool = False,
) -> KLAutoencoder | SkipAutoencoder:
    """The encoder-decoder named ``architecture``; ``ValueError`` for options the other one owns (``attention``:
    ``"kl"`` only; ``skip_from_level`` > 0 and ``shortcuts``: ``"skip"`` only)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {architecture!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if len(channels) < 1:
        raise ValueError("channels must have at least one level")
    if architecture == "kl":
        if shortcuts or skip_from_level:
            raise ValueError(
                "shortcuts and skip_from_level belong to architecture='skip' (our U-Net encoder-decoder; "
                f"skip_from_level={len(channels) - 1} for no skip); MONAI's AutoencoderKL has neither"
            )
        return KLAutoencoder(
            spatial_dims, in_channels, channels, latent_channels, num_res_blocks, norm_num_groups, attention
        )
    if attention:
        raise ValueError("attention belongs to architecture='kl' (MONAI's AutoencoderKL)")
    return SkipAutoencoder(
        spatial_dims, in_channels, channels, latent_channels, num_res_blocks, norm_num_groups, skip_from_level,
        shortcuts,
    )  # fmt: skip
