"""DiffIR networks (Xia et al., "DiffIR: Efficient Diffusion Model for Image Restoration", ICCV 2023, §3.2-3.3).

* :class:`CPEN` — compact IR prior extraction network: conv stem, residual blocks, three strided-free convs,
  global average pool and a two-layer MLP to a ``4·n_feats`` (= 256) vector, the IPR. Stage 1 (``CPEN_S1``)
  sees ``cat(unshuffle(LQ), unshuffle(GT))``; stage 2 (``CPEN_S2``) sees ``unshuffle(LQ)`` only.
* :class:`DIRformer` — Restormer U-shaped transformer whose every block is modulated by the IPR:
  ``F' = LN(x)·k1 + k2`` with ``[k1, k2] = W·Z`` (``W`` a bias-free Linear(256 → 2C), one per DMTA and per
  DGFN). DMTA is transposed (channel) attention, DGFN the gated depth-wise feed-forward. Global residual ``+ LQ``.
* :class:`IPRDenoiser` — the stage-2 x0-predicting MLP over ``cat[D, t/(10·T), Z_t]`` (named ``ResMLP``
  upstream, it has no skip).

Hand-written because no maintained library ships DiffIR or a modulated Restormer (MONAI has neither); one code
path for 2D and 3D (``spatial_dims``): convolutions come from MONAI's ``Conv`` factory, (un)shuffle from
``monai.networks.utils.pixelshuffle``/``pixelunshuffle`` (identical to torch in 2D, exact round trip in 3D). In
3D the down/upsample convolutions use ``2C/2^d`` and ``C·2^d/2`` channels so that every level still doubles
or halves the width as in 2D. Layer layout follows the official deblurring architecture
(``DiffIR/archs/S2_arch.py``), so its 2D configuration reproduces the official parameter count.

:class:`DIRformerConfig` and :class:`CPENConfig` are the typed option groups of the two networks (YAML-fillable),
shared by both training stages of :mod:`medfusion.models.diffir`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.utils import pixelshuffle, pixelunshuffle
from torch import Tensor, nn


def _conv(spatial_dims: int, cin: int, cout: int, k: int, bias: bool = True, groups: int = 1) -> nn.Module:
    return Conv[Conv.CONV, spatial_dims](cin, cout, kernel_size=k, padding=k // 2, bias=bias, groups=groups)


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, *spatial) (Restormer ``WithBias`` / ``BiasFree``)."""

    def __init__(
        self, dim: int, norm_type: Literal["with_bias", "bias_free"] = "with_bias", eps: float = 1e-5
    ):
        super().__init__()
        if norm_type not in ("with_bias", "bias_free"):
            raise ValueError(f"norm_type={norm_type!r}; choose with_bias or bias_free")
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if norm_type == "with_bias" else None
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.movedim(1, -1)
        var = x.var(-1, keepdim=True, unbiased=False)
        if self.bias is None:  # BiasFree: scale only, no mean subtraction
            y = x / torch.sqrt(var + self.eps) * self.weight
        else:
            y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(var + self.eps) * self.weight + self.bias
        return y.movedim(-1, 1)


def _modulate(x: Tensor, kernel: nn.Linear, z: Tensor) -> Tensor:
    """``F' = x·k1 + k2`` with ``[k1, k2] = W·Z`` broadcast over space (no ``+1``)."""
    k = kernel(z).reshape(x.shape[0], 2 * x.shape[1], *([1] * (x.ndim - 2)))
    k1, k2 = k.chunk(2, dim=1)
    return x * k1 + k2


class DMTA(nn.Module):
    """Dynamic multi-head transposed attention: IPR-modulated Restormer MDTA (channel attention)."""

    def __init__(self, spatial_dims: int, dim: int, num_heads: int, bias: bool = False, ipr_dim: int = 256):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.kernel = nn.Linear(ipr_dim, 2 * dim, bias=False)
        self.qkv = _conv(spatial_dims, dim, 3 * dim, 1, bias)
        self.qkv_dwconv = _conv(spatial_dims, 3 * dim, 3 * dim, 3, bias, groups=3 * dim)
        self.project_out = _conv(spatial_dims, dim, dim, 1, bias)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = _modulate(x, self.kernel, z)
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (y.reshape(b, self.num_heads, c // self.num_heads, -1) for y in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # along the spatial axis
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # (B, h, C/h, C/h)
        return self.project_out((attn @ v).reshape(b, c, *spatial))


class DGFN(nn.Module):
    """Dynamic gated feed-forward network: IPR-modulated Restormer GDFN, hidden width ``int(C·γ)``."""

    def __init__(
        self, spatial_dims: int, dim: int, ffn_expansion_factor: float, bias: bool = False, ipr_dim: int = 256
    ):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.kernel = nn.Linear(ipr_dim, 2 * dim, bias=False)
        self.project_in = _conv(spatial_dims, dim, 2 * hidden, 1, bias)
        self.dwconv = _conv(spatial_dims, 2 * hidden, 2 * hidden, 3, bias, groups=2 * hidden)
        self.project_out = _conv(spatial_dims, hidden, dim, 1, bias)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        x = _modulate(x, self.kernel, z)
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """``x += DMTA(LN(x), Z)``; ``x += DGFN(LN(x), Z)``."""

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        num_heads: int,
        ffn_expansion_factor: float,
        bias: bool,
        norm_type: Literal["with_bias", "bias_free"],
        ipr_dim: int = 256,
    ):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, norm_type)
        self.attn = DMTA(spatial_dims, dim, num_heads, bias, ipr_dim)
        self.norm2 = ChannelLayerNorm(dim, norm_type)
        self.ffn = DGFN(spatial_dims, dim, ffn_expansion_factor, bias, ipr_dim)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), z)
        return x + self.ffn(self.norm2(x), z)


class _Stage(nn.ModuleList):
    def forward(self, x: Tensor, z: Tensor) -> Tensor:  # type: ignore[override]
        for block in self:
            x = block(x, z)
        return x


class Downsample(nn.Module):
    """``conv3×3(C → 2C/2^d)`` + pixel-unshuffle(2): halves the grid, doubles the width."""

    def __init__(self, spatial_dims: int, dim: int):
        super().__init__()
        if (2 * dim) % 2**spatial_dims:
            raise ValueError(
                f"width {dim} cannot be downsampled in {spatial_dims}D (needs 2·C divisible by 2^d)"
            )
        self.spatial_dims = spatial_dims
        self.conv = _conv(spatial_dims, dim, 2 * dim // 2**spatial_dims, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return pixelunshuffle(self.conv(x), self.spatial_dims, 2)


class Upsample(nn.Module):
    """``conv3×3(C → C·2^d/2)`` + pixel-shuffle(2): doubles the grid, halves the width."""

    def __init__(self, spatial_dims: int, dim: int):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.conv = _conv(spatial_dims, dim, dim * 2**spatial_dims // 2, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return pixelshuffle(self.conv(x), self.spatial_dims, 2)


class DIRformer(nn.Module):
    """IPR-modulated Restormer (DiffIR §3.2). ``forward(lq, z) -> restored``, same shape as ``lq``.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: image channels (the global residual needs them equal).
        dim: width of level 1 (levels are dim, 2dim, 4dim, 8dim).
        num_blocks: transformer blocks per level (4 values).
        num_refinement_blocks: blocks after decoder level 1 (width 2·dim).
        heads: attention heads per level (4 values).
        ffn_expansion_factor: DGFN hidden width factor γ.
        bias: bias in the convolutions.
        norm_type: ``with_bias`` or ``bias_free`` channel LayerNorm.
        ipr_dim: IPR length (256 upstream).

    Spatial size must be divisible by 8 (three downsamplings).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        dim: int = 48,
        num_blocks: Sequence[int] = (3, 5, 6, 6),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.0,
        bias: bool = False,
        norm_type: Literal["with_bias", "bias_free"] = "with_bias",
        ipr_dim: int = 256,
    ):
        super().__init__()
        _check_dims(spatial_dims)
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f"num_blocks and heads need 4 values each, got {num_blocks}, {heads}")
        if in_channels != out_channels:
            raise ValueError(
                "DIRformer adds the input back (global residual): in_channels must equal out_channels"
            )
        d = spatial_dims

        def stage(width: int, n_heads: int, n: int) -> _Stage:
            return _Stage(
                TransformerBlock(d, width, n_heads, ffn_expansion_factor, bias, norm_type, ipr_dim)
                for _ in range(n)
            )

        self.patch_embed = _conv(d, in_channels, dim, 3, bias=False)
        self.encoder_level1 = stage(dim, heads[0], num_blocks[0])
        self.down1_2 = Downsample(d, dim)
        self.encoder_level2 = stage(2 * dim, heads[1], num_blocks[1])
        self.down2_3 = Downsample(d, 2 * dim)
        self.encoder_level3 = stage(4 * dim, heads[2], num_blocks[2])
        self.down3_4 = Downsample(d, 4 * dim)
        self.latent = stage(8 * dim, heads[3], num_blocks[3])
        self.up4_3 = Upsample(d, 8 * dim)
        self.reduce_chan_level3 = _conv(d, 8 * dim, 4 * dim, 1, bias)
        self.decoder_level3 = stage(4 * dim, heads[2], num_blocks[2])
        self.up3_2 = Upsample(d, 4 * dim)
        self.reduce_chan_level2 = _conv(d, 4 * dim, 2 * dim, 1, bias)
        self.decoder_level2 = stage(2 * dim, heads[1], num_blocks[1])
        self.up2_1 = Upsample(d, 2 * dim)
        self.decoder_level1 = stage(2 * dim, heads[0], num_blocks[0])
        self.refinement = stage(2 * dim, heads[0], num_refinement_blocks)
        self.output = _conv(d, 2 * dim, out_channels, 3, bias)

    def forward(self, lq: Tensor, z: Tensor) -> Tensor:
        e1 = self.encoder_level1(self.patch_embed(lq), z)
        e2 = self.encoder_level2(self.down1_2(e1), z)
        e3 = self.encoder_level3(self.down2_3(e2), z)
        lat = self.latent(self.down3_4(e3), z)
        d3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(lat), e3], 1)), z)
        d2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(d3), e2], 1)), z)
        d1 = self.decoder_level1(torch.cat([self.up2_1(d2), e1], 1), z)
        return self.output(self.refinement(d1, z)) + lq


class _ResBlock(nn.Module):
    def __init__(self, spatial_dims: int, n: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv(spatial_dims, n, n, 3), nn.LeakyReLU(0.1, inplace=True), _conv(spatial_dims, n, n, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class CPEN(nn.Module):
    """Compact IR prior extraction network; ``forward(lq, gt=None) -> (B, 4·n_feats)`` IPR.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels C.
        use_target: stage 1 (``CPEN_S1``, needs ``gt``) when True, stage 2 (``CPEN_S2``, LQ only) when False.
        downscale: pixel-unshuffle factor applied to each input (4 for the ×1 tasks upstream; in 3D factor 4
            multiplies channels by 64, factor 2 is the memory fallback).
        n_feats: stem width (64 upstream, IPR length 4·n_feats = 256).
        n_encoder_res: residual blocks (5 for deblurring/inpainting, 9 for SR).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        use_target: bool = True,
        downscale: int = 4,
        n_feats: int = 64,
        n_encoder_res: int = 5,
    ):
        super().__init__()
        _check_dims(spatial_dims)
        if downscale < 1:
            raise ValueError(f"downscale must be >= 1, got {downscale}")
        self.spatial_dims, self.downscale, self.use_target = spatial_dims, downscale, use_target
        d = spatial_dims
        cin = in_channels * downscale**d * (2 if use_target else 1)
        act = nn.LeakyReLU(0.1, inplace=True)
        self.E = nn.Sequential(
            _conv(d, cin, n_feats, 3),
            act,
            *[_ResBlock(d, n_feats) for _ in range(n_encoder_res)],
            _conv(d, n_feats, 2 * n_feats, 3),
            act,
            _conv(d, 2 * n_feats, 2 * n_feats, 3),
            act,
            _conv(d, 2 * n_feats, 4 * n_feats, 3),
            act,
            nn.Flatten(start_dim=2),
        )
        self.mlp = nn.Sequential(
            nn.Linear(4 * n_feats, 4 * n_feats), act, nn.Linear(4 * n_feats, 4 * n_feats), act
        )

    @property
    def ipr_dim(self) -> int:
        return int(self.mlp[-2].out_features)

    def _unshuffle(self, x: Tensor) -> Tensor:
        return x if self.downscale == 1 else pixelunshuffle(x, self.spatial_dims, self.downscale)

    def forward(self, lq: Tensor, gt: Tensor | None = None) -> Tensor:
        if self.use_target:
            if gt is None:
                raise ValueError("stage-1 CPEN (use_target=True) needs the ground truth gt")
            x = torch.cat([self._unshuffle(lq), self._unshuffle(gt)], 1)
        else:
            x = self._unshuffle(lq)
        return self.mlp(self.E(x).mean(-1))  # global average pool → (B, 4·n_feats)


class IPRDenoiser(nn.Module):
    """Stage-2 x0 denoiser: ``f(Z_t, D, t)`` = MLP(cat[D, t/(10·T), Z_t]) with LeakyReLU(0.1) after every layer."""

    def __init__(self, ipr_dim: int = 256, n_layers: int = 1, num_timesteps: int = 4):
        super().__init__()
        self.max_period = 10.0 * num_timesteps
        layers: list[nn.Module] = [nn.Linear(2 * ipr_dim + 1, ipr_dim), nn.LeakyReLU(0.1, inplace=True)]
        for _ in range(n_layers):
            layers += [nn.Linear(ipr_dim, ipr_dim), nn.LeakyReLU(0.1, inplace=True)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, z_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        t = t.to(z_t.dtype).reshape(-1, 1) / self.max_period
        return self.mlp(torch.cat([cond, t.expand(z_t.shape[0], 1), z_t], dim=1))


@dataclass
class DIRformerConfig:
    """Options of :class:`DIRformer` (upstream deblurring: 48, (3, 5, 6, 6), 4, (1, 2, 4, 8), 2.0, False,
    ``with_bias``); see its Args."""

    dim: int = 48
    num_blocks: tuple[int, ...] = (3, 5, 6, 6)
    num_refinement_blocks: int = 4
    heads: tuple[int, ...] = (1, 2, 4, 8)
    ffn_expansion_factor: float = 2.0
    bias: bool = False
    norm_type: Literal["with_bias", "bias_free"] = "with_bias"

    def __post_init__(self) -> None:
        self.num_blocks = tuple(int(n) for n in self.num_blocks)
        self.heads = tuple(int(h) for h in self.heads)
        if self.norm_type not in ("with_bias", "bias_free"):
            raise ValueError(f"norm_type={self.norm_type!r}; choose one of with_bias, bias_free")

    def build(self, spatial_dims: int, in_channels: int, ipr_dim: int) -> DIRformer:
        return DIRformer(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=in_channels, dim=self.dim,
            num_blocks=self.num_blocks, num_refinement_blocks=self.num_refinement_blocks, heads=self.heads,
            ffn_expansion_factor=self.ffn_expansion_factor, bias=self.bias, norm_type=self.norm_type,
            ipr_dim=ipr_dim,
        )  # fmt: skip


@dataclass
class CPENConfig:
    """Options of :class:`CPEN` (upstream: unshuffle 4, 64 features, 5 residual blocks); see its Args."""

    downscale: int = 4
    n_feats: int = 64
    n_encoder_res: int = 5

    @property
    def ipr_dim(self) -> int:
        """Length of the IPR vector, ``4·n_feats``."""
        return 4 * self.n_feats

    def build(self, spatial_dims: int, in_channels: int, use_target: bool) -> CPEN:
        return CPEN(spatial_dims, in_channels, use_target, self.downscale, self.n_feats, self.n_encoder_res)
