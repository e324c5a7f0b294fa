"""DiffIR networks: block parity with plain Restormer, official parameter count, 2D/3D shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medfusion.nets.diffir import CPEN, DGFN, DMTA, DIRformer, Downsample, IPRDenoiser, Upsample


def _identity_modulation(kernel: torch.nn.Linear, c: int) -> torch.Tensor:
    """Set W so that W·e0 = [1…1, 0…0], i.e. k1 ≡ 1 and k2 ≡ 0; return z = e0."""
    with torch.no_grad():
        kernel.weight.zero_()
        kernel.weight[:c, 0] = 1.0
    z = torch.zeros(2, kernel.in_features)
    z[:, 0] = 1.0
    return z


def _plain_mdta(m: DMTA, x: torch.Tensor) -> torch.Tensor:
    """Unmodulated Restormer MDTA written with functional 2D ops."""
    b, c, h, w = x.shape
    qkv = F.conv2d(x, m.qkv.weight, m.qkv.bias)
    qkv = F.conv2d(qkv, m.qkv_dwconv.weight, m.qkv_dwconv.bias, padding=1, groups=3 * c)
    q, k, v = qkv.chunk(3, 1)
    heads = m.num_heads
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    a = torch.softmax(q @ k.transpose(-2, -1) * m.temperature, -1)
    return F.conv2d((a @ v).reshape(b, c, h, w), m.project_out.weight, m.project_out.bias)


def _plain_gdfn(m: DGFN, x: torch.Tensor) -> torch.Tensor:
    y = F.conv2d(x, m.project_in.weight, m.project_in.bias)
    y = F.conv2d(y, m.dwconv.weight, m.dwconv.bias, padding=1, groups=y.shape[1])
    y1, y2 = y.chunk(2, 1)
    return F.conv2d(F.gelu(y1) * y2, m.project_out.weight, m.project_out.bias)


def test_unit_modulation_equals_restormer_blocks():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    attn = DMTA(2, 8, num_heads=2, bias=True)
    torch.nn.init.normal_(attn.temperature, 1.0, 0.3)
    ffn = DGFN(2, 8, 2.0, bias=True)
    z = _identity_modulation(attn.kernel, 8)
    _identity_modulation(ffn.kernel, 8)
    torch.testing.assert_close(attn(x, z), _plain_mdta(attn, x))
    torch.testing.assert_close(ffn(x, z), _plain_gdfn(ffn, x))
    # and a non-trivial modulation changes the output
    assert not torch.allclose(attn(x, torch.randn(2, 256)), _plain_mdta(attn, x))


def test_official_deblur_parameter_count():
    g = DIRformer(2, 3, 3, 48, (3, 5, 6, 6), 4, (1, 2, 4, 8), 2.0, False, "with_bias")
    c2 = CPEN(2, 3, use_target=False, downscale=4, n_feats=64, n_encoder_res=5)
    den = IPRDenoiser(256, 1, 4)
    n = sum(p.numel() for m in (g, c2, den) for p in m.parameters())
    assert n == 26_911_934  # DiffIR_S2 deblurring, official log (issue #57)
    assert sum(p.numel() for p in den.parameters()) == 197_376


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_shapes_and_gradients(spatial_dims, size):
    torch.manual_seed(0)
    shape = (2, 1) + (size,) * spatial_dims
    lq, gt = torch.randn(shape), torch.randn(shape)
    cpen1 = CPEN(spatial_dims, 1, use_target=True, downscale=2, n_feats=16, n_encoder_res=1)
    cpen2 = CPEN(spatial_dims, 1, use_target=False, downscale=2, n_feats=16, n_encoder_res=1)
    net = DIRformer(
        spatial_dims,
        1,
        1,
        dim=8,
        num_blocks=(1, 1, 1, 1),
        num_refinement_blocks=1,
        heads=(1, 1, 2, 2),
        ipr_dim=64,
    )
    z = cpen1(lq, gt)
    assert z.shape == (2, 64) and cpen2(lq).shape == (2, 64)
    out = net(lq, z)
    assert out.shape == lq.shape
    out.abs().mean().backward()
    assert all(p.grad is not None for p in cpen1.parameters())
    den = IPRDenoiser(64, 1, 4)
    assert den(torch.randn(2, 64), z.detach(), torch.tensor([3, 3])).shape == (2, 64)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_down_up_widths(spatial_dims):
    x = torch.randn(1, 8, *(8,) * spatial_dims)
    y = Downsample(spatial_dims, 8)(x)
    assert y.shape == (1, 16, *(4,) * spatial_dims)
    assert Upsample(spatial_dims, 16)(y).shape == x.shape


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="gt"):
        CPEN(2, 1, use_target=True, downscale=2, n_feats=8, n_encoder_res=0)(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="spatial_dims"):
        DIRformer(spatial_dims=1)
    with pytest.raises(ValueError, match="bias_free"):
        DIRformer(norm_type="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_channels"):
        DIRformer(in_channels=2, out_channels=1)


def test_option_groups_build_the_networks_they_describe():
    from medfusion.nets.diffir import CPENConfig, DIRformerConfig

    net = DIRformerConfig(dim=8, num_blocks=[1, 1, 1, 1], heads=[1, 1, 2, 2]).build(2, 1, ipr_dim=32)
    direct = DIRformer(2, 1, 1, dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2), ipr_dim=32)
    assert [p.shape for p in net.parameters()] == [p.shape for p in direct.parameters()]
    cfg = CPENConfig(downscale=2, n_feats=8, n_encoder_res=1)
    cpen = cfg.build(3, 1, use_target=False)
    assert cfg.ipr_dim == 32 and cpen(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 32)
    with pytest.raises(ValueError, match="norm_type='layer'; choose one of with_bias, bias_free"):
        DIRformerConfig(norm_type="layer")  # type: ignore[arg-type]
