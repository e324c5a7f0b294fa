"""Space <-> channel rearrangements of latents, and :class:`ImageGrid`, the wrapper that runs a network on a finer
grid than the latent it is given.

``space_to_channel`` is ``pixel_unshuffle`` for 2D and 3D alike (Shi et al. 2016, "Real-time single image and video
super-resolution using an efficient sub-pixel convolutional neural network"): ``(B, C, *S) -> (B, C 2^d, *S / 2)``
with channel ``c 2^d + k`` holding sub-pixel ``k`` of channel ``c``. DC-AE's shortcuts (Chen et al., "Deep
Compression Autoencoder for Efficient High-Resolution Diffusion Models", ICLR 2025, sec. 3.2) use the same order, so
:func:`pixel_shuffle` of a shortcut latent undoes the encoder's own rearrangement and puts the latent back on the
image grid.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


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


def grid_channels(channels: int, spatial_dims: int, k: int) -> int:
    """Channels of a ``channels``-channel latent after :func:`pixel_shuffle` by ``k``; ``ValueError`` when the
    shuffle cannot divide them."""
    if k < 0:
        raise ValueError(f"pixel_shuffle must be >= 0, got {k}")
    per = 2 ** (spatial_dims * k)
    if channels % per:
        raise ValueError(
            f"pixel_shuffle={k} needs latent_channels divisible by {per} ({2**spatial_dims} per step in "
            f"{spatial_dims}D); the latent has {channels}"
        )
    return channels // per


class ImageGrid(nn.Module):
    """``net`` run on the ``2^k`` times finer grid: image-shaped inputs are :func:`pixel_shuffle`-d by ``k`` before
    ``net`` and its output is :func:`pixel_unshuffle`-d back, so the wrapper maps latents to latents.

    ``forward(x, *args)``: ``x`` ``(B, C, *S)``; every further tensor argument with ``x``'s number of axes (an image
    condition) is shuffled like ``x``, the others (timesteps ``(B,)``, None) are passed unchanged.
    """

    def __init__(self, net: nn.Module, k: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"ImageGrid needs k >= 1 shuffle steps, got {k}")
        self.net = net
        self.k = int(k)

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        def fine(v: Any) -> Any:
            return pixel_shuffle(v, self.k) if isinstance(v, Tensor) and v.ndim == x.ndim else v

        return pixel_unshuffle(self.net(fine(x), *(fine(a) for a in args)), self.k)


def on_grid(net: nn.Module, k: int) -> nn.Module:
    """``net`` itself for ``k = 0`` (the latent grid), else :class:`ImageGrid` ``(net, k)``."""
    return net if k == 0 else ImageGrid(net, k)
