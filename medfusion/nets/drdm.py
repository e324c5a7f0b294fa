"""DRDM recovery network: a time-conditioned atrous residual U-Net with weight-shared recursion.

Zheng et al., DRDM, arXiv 2407.07295, Fig. 4 (``psi_hat_t^(k) = D_theta(I_hat_t^(k), t)``, recursive
recovery). Architecture from the official ``RecResACNet`` (github.com/jianqingzheng/def_diff_rec); the code
is ours. MONAI has no network with this block (conv + dilated 1/3 residual pair) and per-stage
additive/multiplicative time injection, hence hand-written; warping and composition come from
``medfusion.fields``.

Contract: ``forward(x, t) -> r`` with ``x`` (B, 1, *spatial) the deformed image (intensities ~[0, 1]),
``t`` (B,) integer levels in ``[0, time_steps)``, and ``r`` (B, D, *spatial) the recovery field in
**voxels** (array-axis order, pull convention) that should invert the last ``psi_t`` of the forward
process. (The official net outputs fractions of the grid size; voxels here.) Spatial sizes must be
divisible by 8.

Recursion (K = ``recursion``, 2 by default): ``u1 = f(x, t)``; ``u2 = f(warp(x, u1), t)``; the output is
``compose(u1, u2)``, so ``warp(x, out) = warp(warp(x, u1), u2)``; weights are shared and gradients flow
through the inner warp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from medfusion.fields import compose, warp


def drdm_time_table(steps: int = 80, dim: int = 100) -> torch.Tensor:
    """Frozen sinusoidal table (steps, dim): ``e[t, 2k] = sin(t w_k)``, ``e[t, 2k+1] = cos(t w_k)``,
    ``w_k = 10000 ** (-4k / dim)`` (the official exponent 4k/d, not the usual 2k/d)."""
    t = torch.arange(steps, dtype=torch.float64)[:, None]
    k = torch.arange(dim // 2, dtype=torch.float64)[None]
    w = 10000.0 ** (-4.0 * k / dim)
    table = torch.zeros(steps, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(t * w)
    table[:, 1::2] = torch.cos(t * w)
    return table.float()


class AtrousBlock(nn.Module):
    """``h = [IN](Conv3(x))``; ``r = Conv3_dil3(LReLU(Conv3_dil1(LReLU(h))))``; ``out = LReLU(r + h)``."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, norm: bool) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        inorm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        self.conv_in = conv(cin, cout, 3, padding=1)
        self.norm = inorm(cout, affine=True) if norm else nn.Identity()
        self.conv_d1 = conv(cout, cout, 3, padding=1, dilation=1)
        self.conv_d3 = conv(cout, cout, 3, padding=3, dilation=3)
        self.act = nn.LeakyReLU(1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv_in(x))
        r = self.conv_d3(self.act(self.conv_d1(self.act(h))))
        return self.act(r + h)


def _stage(spatial_dims: int, chans: Sequence[int], norm: bool) -> nn.Sequential:
    return nn.Sequential(*[AtrousBlock(spatial_dims, a, b, norm) for a, b in zip(chans[:-1], chans[1:])])


class _TimeMLP(nn.Module):
    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, channels), nn.ReLU(), nn.Linear(channels, channels))

    def forward(self, emb: torch.Tensor, spatial_dims: int) -> torch.Tensor:
        return self.net(emb).view(emb.shape[0], -1, *([1] * spatial_dims))


class DRDMRecoveryNet(nn.Module):
    """Recovery network ``D_theta`` of DRDM (``RecResACNet``; 435,435 trainable parameters in 2D, 1,305,646 in 3D).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 in DRDM).
        time_steps: rows of the time table (T = 80); ``t`` must lie in ``[0, time_steps)``.
        time_dim: width of the sinusoidal embedding (100).
        recursion: K, weight-shared recursive passes composed together (2).
        normalize_input: min-max normalise each sample to [0, 1] before the first pass (the official net is
            trained on data stored in [0, 1]; this makes it independent of the pipeline's intensity range).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        time_steps: int = 80,
        time_dim: int = 100,
        recursion: int = 2,
        normalize_input: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if recursion < 1:
            raise ValueError(f"recursion must be >= 1, got {recursion}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.time_steps = time_steps
        self.recursion = recursion
        self.normalize_input = normalize_input
        nd = spatial_dims
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        convt = nn.ConvTranspose2d if nd == 2 else nn.ConvTranspose3d
        self.register_buffer("time_table", drdm_time_table(time_steps, time_dim), persistent=False)
        self.te1 = _TimeMLP(time_dim, in_channels)
        self.b1 = _stage(nd, (in_channels, 10, 10, 10), norm=True)
        self.down1 = conv(10, 10, 4, stride=2, padding=1)
        self.te2 = _TimeMLP(time_dim, 10)
        self.b2 = _stage(nd, (10, 20, 20, 20), norm=True)
        self.down2 = conv(20, 20, 4, stride=2, padding=1)
        self.te3 = _TimeMLP(time_dim, 20)
        self.b3 = _stage(nd, (20, 40, 40, 40), norm=True)
        self.down3 = conv(40, 40, 4, stride=2, padding=1)
        self.te_mid = _TimeMLP(time_dim, 40)
        self.b_mid = _stage(nd, (40, 20, 20, 40), norm=True)
        self.up1 = convt(40, 40, 4, stride=2, padding=1)
        self.te4 = _TimeMLP(time_dim, 80)
        self.b4 = _stage(nd, (80, 40, 20, 20), norm=False)
        self.up2 = convt(20, 20, 4, stride=2, padding=1)
        self.te5 = _TimeMLP(time_dim, 40)
        self.b5 = _stage(nd, (40, 20, 10, 10), norm=False)
        self.up3 = convt(10, 10, 4, stride=2, padding=1)
        self.te_out = _TimeMLP(time_dim, 20)
        self.b_out = _stage(nd, (20, 10, 10, 10), norm=False)
        self.head = conv(10, nd, 3, padding=1)

    def single_pass(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One pass of the U-Net: (B, C, *spatial), (B,) -> (B, D, *spatial) voxels."""
        nd = self.spatial_dims
        emb = self.time_table[t.long()]
        h1 = self.b1(x + self.te1(emb, nd))
        h2 = self.b2(self.down1(h1) + self.te2(emb, nd))
        h3 = self.b3(self.down2(h2) + self.te3(emb, nd))
        mid = self.b_mid(self.down3(h3) * self.te_mid(emb, nd))
        u = self.b4(torch.cat([self.up1(mid), h3], 1) + self.te4(emb, nd))
        u = self.b5(torch.cat([self.up2(u), h2], 1) + self.te5(emb, nd))
        u = self.b_out(torch.cat([self.up3(u), h1], 1) + self.te_out(emb, nd))
        return self.head(u)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Recursive recovery field (B, D, *spatial) in voxels for image ``x`` (B, C, *spatial) at levels ``t`` (B,)."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape (B, {self.in_channels}, *spatial) with {self.spatial_dims} spatial dims, "
                f"got {tuple(x.shape)}"
            )
        if any(s % 8 for s in x.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by 8 (three stride-2 stages)"
            )
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if (t < 0).any() or (t >= self.time_steps).any():
            raise ValueError(f"t must lie in [0, {self.time_steps - 1}], got {t.tolist()}")
        if self.normalize_input:
            lo = x.flatten(1).amin(1).view(-1, *([1] * (x.ndim - 1)))
            hi = x.flatten(1).amax(1).view(-1, *([1] * (x.ndim - 1)))
            x = (x - lo) / (hi - lo).clamp_min(1e-6)
        out = self.single_pass(x, t)
        for _ in range(self.recursion - 1):
            u = self.single_pass(warp(x, out, padding_mode="zeros"), t)
            out = compose(out, u, padding_mode="border")
        return out
