"""medfusion.fields.world: carrying a voxel field to another grid keeps its world (mm) displacement."""

from __future__ import annotations

import pytest
import torch

from medfusion.fields import identity_grid
from medfusion.fields.world import resample_field, same_grid, spatial_affine, voxel_map


def affine(lin, origin, size=None):
    nd = len(origin)
    size = size or nd + 1
    a = torch.eye(size, dtype=torch.float64)
    a[:nd, :nd] = torch.as_tensor(lin, dtype=torch.float64)
    a[:nd, size - 1] = torch.as_tensor(origin, dtype=torch.float64)
    return a


def world(aff, coords):
    """World points (W, ...) of voxel coords (D, ...)."""
    lin, t = spatial_affine(aff, coords.shape[0])
    return torch.einsum("wd,d...->w...", lin, coords.double()) + t.view(-1, *[1] * (coords.ndim - 1))


@pytest.mark.parametrize("size", [3, 4])
def test_constant_translation_keeps_its_millimetres(size):
    src = affine([[1.0, 0], [0, 1.0]], [0.0, 0.0], size)
    dst = affine([[-2.0, 0], [0, 0.5]], [40.0, -7.0], size)  # flipped, anisotropic, shifted
    u = torch.tensor([2.0, -3.0]).view(1, 2, 1, 1).expand(1, 2, 8, 6).contiguous()
    out = resample_field(u, src, dst, (5, 9))
    assert out.shape == (1, 2, 5, 9)
    expected = torch.tensor([-1.0, -6.0]).view(1, 2, 1, 1)  # (2 mm / -2, -3 mm / 0.5)
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)


def test_smooth_field_mm_agree_at_every_world_point_3d():
    torch.manual_seed(0)
    src = affine([[0, 1.5, 0], [1.0, 0, 0], [0, 0, 2.0]], [3.0, -2.0, 1.0])  # axes permuted
    dst = affine([[1.2, 0, 0], [0, 0.9, 0], [0, 0, -1.1]], [1.0, 1.0, 9.0])
    shape = (10, 11, 9)
    g = identity_grid(shape, dtype=torch.float64)[0]
    u = torch.stack([0.3 * g[1] - 0.1 * g[2], 0.2 * g[0] + 1.0, torch.full_like(g[0], 0.4)])[
        None
    ]  # linear in p
    out = resample_field(u, src, dst, (8, 8, 8))
    # world displacement at world point x, from both grids
    pd = identity_grid((8, 8, 8), dtype=torch.float64)[0]
    x = world(dst, pd)
    m = voxel_map(dst, src, 3)
    ps = torch.einsum("ij,j...->i...", m.matrix, pd) + m.offset.view(3, 1, 1, 1)
    assert torch.allclose(world(src, ps), x, atol=1e-9)
    u_at = torch.stack([0.3 * ps[1] - 0.1 * ps[2], 0.2 * ps[0] + 1.0, torch.full_like(ps[0], 0.4)])
    inside = ((ps >= 0) & (ps <= torch.tensor(shape, dtype=torch.float64).view(3, 1, 1, 1) - 1)).all(0)
    assert inside.float().mean() > 0.3
    lin_s, _ = spatial_affine(src, 3)
    lin_d, _ = spatial_affine(dst, 3)
    mm_src = torch.einsum("wd,d...->w...", lin_s, u_at)
    mm_dst = torch.einsum("wd,d...->w...", lin_d, out[0].double())
    assert torch.allclose(mm_src[:, inside], mm_dst[:, inside], atol=1e-4)


def test_same_grid_and_identity_resampling():
    a4 = affine([[1.0, 0], [0, 2.0]], [5.0, 1.0], 4)
    a3 = affine([[1.0, 0], [0, 2.0]], [5.0, 1.0], 3)
    assert same_grid(a4, a3, 2) and same_grid(a4[None], a4, 2)
    assert not same_grid(a4, affine([[1.0, 0], [0, 2.0]], [5.5, 1.0], 4), 2)
    u = torch.randn(1, 2, 6, 7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(resample_field(u, a4, a3, (6, 7)), u, atol=1e-5)


def test_bad_inputs_raise():
    u = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="affine"):
        resample_field(u, torch.eye(5), torch.eye(3), (4, 4))
    with pytest.raises(ValueError, match="dst_shape"):
        resample_field(u, torch.eye(3), torch.eye(3), (4, 4, 4))
    with pytest.raises(ValueError, match="ddf must be"):
        resample_field(torch.zeros(1, 3, 2, 2), torch.eye(4), torch.eye(4), (2, 2))
    with pytest.raises(ValueError, match="square"):
        spatial_affine(torch.eye(3), 3)  # a 3D grid needs a 4x4 affine
