"""Carry a displacement field from one voxel grid to another through world space (mm).

A field ``u`` lives on a grid with voxel-to-world affine ``A = [L | t]`` (world ``x = L p + t``) and is in
voxels of that grid, channel ``d`` along array axis ``d``, pull convention (:mod:`medfusion.fields.warp`).
Its physical (world, mm) displacement is ``d = L u`` (as :func:`medfusion.io.displacement.voxel_to_mm_lps`
before the RAS -> LPS flip). To move it to a second grid ``A' = [L' | t']`` (so that an
image and its label on different grids share one field in mm):

1. for each voxel ``p'`` of the new grid, ``x = L' p' + t'`` and ``p = L^+ (x - t)``;
2. ``u(p)`` by linear interpolation, border padding (the field is extended outside its grid);
3. ``d = L u(p)`` (mm) and ``u'(p') = L'^+ d`` (voxels of the new grid).

So warping an image on the new grid with ``u'`` (pull) moves it by the same millimetres as the original field
moves data on the first grid. ``L^+`` is the pseudo-inverse: it is the inverse for square affines and, for 2D
grids carrying a 4x4 affine (what MONAI ``LoadImage`` + ``EnsureChannelFirst`` give for 2D files, the third
axis ignored), the least-squares projection onto the slice plane, exact when both slices lie in one plane.
Affines are ``(D+1, D+1)`` or, for 2D, ``(4, 4)``; a leading batch axis of size 1 is accepted.

Hand-written because MONAI's resampling (``SpatialResample``) resamples *images*: a field must also have its
vectors re-expressed in the new grid's axes (step 3), which no library does for our voxel, array-axis convention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from medfusion.fields.warp import PaddingMode, identity_grid, sample_at


class VoxelMap(NamedTuple):
    """Affine map between two voxel grids: ``p_to = matrix @ p_from + offset`` (voxels, array-axis order)."""

    matrix: torch.Tensor  # (D, D), float64
    offset: torch.Tensor  # (D,), float64


def spatial_affine(affine: torch.Tensor, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a voxel-to-world affine into ``L`` (W, D) and ``t`` (W,), float64, world dimension ``W``.

    Accepts ``(D+1, D+1)`` or ``(4, 4)`` for ``D = 2`` (then ``W = 3``), optionally with a leading axis of size 1.
    """
    a = torch.as_tensor(affine).detach().to(device="cpu", dtype=torch.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    valid = {spatial_dims + 1, 4}
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] not in valid:
        raise ValueError(
            f"affine for {spatial_dims} spatial dims must be square of size {sorted(valid)}, "
            f"got shape {tuple(a.shape)}"
        )
    w = a.shape[0] - 1
    return a[:w, :spatial_dims], a[:w, w]


def voxel_map(from_affine: torch.Tensor, to_affine: torch.Tensor, spatial_dims: int) -> VoxelMap:
    """Voxel coordinates of grid ``from`` expressed in voxels of grid ``to`` (through world space)."""
    lf, tf = spatial_affine(from_affine, spatial_dims)
    lt, tt = spatial_affine(to_affine, spatial_dims)
    if lf.shape[0] != lt.shape[0]:  # a 3x3 and a 4x4 2D affine: embed the 3x3 one at z = 0
        if lf.shape[0] < lt.shape[0]:
            lf, tf = _pad_world(lf, tf, lt.shape[0])
        else:
            lt, tt = _pad_world(lt, tt, lf.shape[0])
    pinv = torch.linalg.pinv(lt)
    return VoxelMap(pinv @ lf, pinv @ (tf - tt))


def _pad_world(lin: torch.Tensor, t: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = w - lin.shape[0]
    return torch.cat([lin, lin.new_zeros(pad, lin.shape[1])]), torch.cat([t, t.new_zeros(pad)])


def same_grid(affine_a: torch.Tensor, affine_b: torch.Tensor, spatial_dims: int, atol: float = 1e-6) -> bool:
    """True when both grids have the same voxel-to-voxel map, identity to ``atol`` (voxels).

    For 2D grids with 4x4 affines the comparison is in-plane: two parallel slices at different heights count
    as one grid (the field is 2D and has no out-of-plane component).
    """
    m = voxel_map(affine_a, affine_b, spatial_dims)
    eye = torch.eye(spatial_dims, dtype=torch.float64)
    return bool(
        torch.allclose(m.matrix, eye, atol=atol)
        and torch.allclose(m.offset, m.offset.new_zeros(()), atol=atol)
    )


def resample_field(
    ddf: torch.Tensor,
    src_affine: torch.Tensor,
    dst_affine: torch.Tensor,
    dst_shape: tuple[int, ...] | torch.Size,
    padding_mode: PaddingMode = "border",
) -> torch.Tensor:
    """Carry ``ddf`` (B, D, *src_spatial), voxels of grid ``src_affine``, to grid ``dst_affine`` of ``dst_shape``.

    Returns (B, D, *dst_shape) in voxels of the destination grid, the same world (mm) displacement at each
    world point (steps 1-3 of the module docstring). Linear interpolation, ``padding_mode`` outside the source.
    """
    nd = ddf.shape[1]
    if ddf.ndim != nd + 2 or nd not in (2, 3):
        raise ValueError(f"ddf must be (B, D, *spatial) with D = 2 or 3, got shape {tuple(ddf.shape)}")
    dst_shape = tuple(int(s) for s in dst_shape)
    if len(dst_shape) != nd:
        raise ValueError(f"dst_shape must have {nd} entries for a {nd}D field, got {dst_shape}")
    # 1. destination voxels -> source voxels
    to_src = voxel_map(dst_affine, src_affine, nd)
    grid = identity_grid(dst_shape, device=ddf.device, dtype=torch.float64)[0].reshape(nd, -1)
    coords = to_src.matrix.to(ddf.device) @ grid + to_src.offset.to(ddf.device)[:, None]
    coords = coords.to(ddf.dtype).reshape(1, nd, *dst_shape).expand(ddf.shape[0], -1, *dst_shape)
    # 2. interpolate the source field there
    u = sample_at(ddf, coords, mode="bilinear", padding_mode=padding_mode)
    # 3. source voxels -> mm -> destination voxels (vectors: linear parts only)
    rot = voxel_map(src_affine, dst_affine, nd).matrix.to(device=ddf.device, dtype=ddf.dtype)
    return torch.einsum("ij,bj...->bi...", rot, u)
