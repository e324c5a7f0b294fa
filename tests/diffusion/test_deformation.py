"""DRDM forward process, losses and sampler: faithfulness to the paper (arXiv 2407.07295) and the official code."""

from __future__ import annotations

import pytest
import torch

from medfusion.diffusion.deformation import (
    DeformationDiffusion,
    augmentation_levels,
    control_to_image,
    multiscale_velocity,
    n_img,
    n_lab,
    recover,
    recovery_losses,
    recovery_schedule,
)
from medfusion.fields import displacement_scale, folding_fraction, invert_field, warp, warp_labels
from medfusion.fields.warp import identity_grid


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# schedule ---------------------------------------------------------------------------------
def test_schedule_exact_values():
    table = {0: (1, 0), 1: (1, 1), 2: (1, 1), 5: (5, 2), 10: (13, 3), 20: (32, 6), 30: (55, 7), 40: (80, 9)}
    table |= {48: (102, 10), 56: (124, 11), 64: (148, 12), 72: (173, 13), 79: (195, 13), 80: (198, 13)}
    t = torch.tensor(list(table))
    assert n_img(t).tolist() == [v[0] for v in table.values()]
    assert n_lab(t).tolist() == [v[1] for v in table.values()]
    assert n_img(10_000).item() == 200


# multi-scale sampler ----------------------------------------------------------------------
@pytest.mark.parametrize("nd, expected, batch", [(2, 2.56e-4, 64), (3, 2.16e-4, 4)])
def test_multiscale_velocity_std(nd, expected, batch):
    v = multiscale_velocity(batch, nd, sigma=4e-5, generator=gen(0))
    assert v.shape == (batch, nd, *([64] * nd))
    std = (v / 64).std().item()  # control voxels -> official fraction units
    assert abs(std - expected) / expected < 0.10


# forward geometry --------------------------------------------------------------------------
def test_forward_geometry_2d_consistent_scale():
    dd = DeformationDiffusion()
    means = []
    for t in (10, 48, 79):
        f = dd.fields(torch.full((3,), t), (128, 128), with_psi=False, generator=gen(t))
        scale, fold = displacement_scale(f.phi), folding_fraction(f.phi)
        means.append(scale.mean.mean().item())
        if t <= 48:
            assert fold.mean().item() < 1e-4
        if t == 79:
            assert 8 <= scale.mean.mean().item() <= 12
            assert 20 <= scale.max.mean().item() <= 27
            assert fold.mean().item() < 1e-3
    assert means == sorted(means)


def test_forward_geometry_3d_t20():
    f = DeformationDiffusion().fields(torch.tensor([20]), (32, 32, 32), with_psi=False, generator=gen(1))
    scale = displacement_scale(f.phi)
    assert 1.2 <= scale.mean.item() <= 3.0 and folding_fraction(f.phi).item() == 0.0  # spec: 2.0 / 6.2 / 0


@pytest.mark.slow
def test_forward_geometry_3d():
    # N = 32 makes the central crop equal to the control grid itself (scale is N-independent, §1.2 step D)
    f = DeformationDiffusion().fields(torch.tensor([79]), (32, 32, 32), with_psi=False, generator=gen(1))
    scale = displacement_scale(f.phi)
    assert 8 <= scale.mean.item() <= 12.5 and 20 <= scale.max.item() <= 28
    assert folding_fraction(f.phi).item() < 1e-3


def test_legacy_scale_doubles_2d_256():
    kw = dict(with_psi=False, generator=gen(2))
    t = torch.full((2,), 79)
    legacy = DeformationDiffusion(legacy_scale=True).fields(t, (256, 256), **kw).phi
    consistent = DeformationDiffusion().fields(t, (256, 256), with_psi=False, generator=gen(2)).phi
    assert torch.allclose(legacy, 2 * consistent, atol=1e-4)
    mean = displacement_scale(legacy).mean.mean().item()
    assert 14 <= mean <= 23  # spec: ~18% mean and ~35% folding at t = 79
    assert folding_fraction(legacy).mean().item() > 0.15


def test_control_to_image_equals_upsample_then_crop():
    u = torch.randn(1, 2, 16, 16, generator=gen(3))
    n = 24  # upsample 16 -> 48, keep [12, 36)
    up = torch.nn.functional.interpolate(u, size=(48, 48), mode="bilinear", align_corners=False)[
        ..., 12:36, 12:36
    ]
    ours = control_to_image(u, (n, n))
    assert torch.allclose(ours, up * (2 * n / 16), atol=1e-5)


# composition and inverse -------------------------------------------------------------------
def test_psi_inverse_and_loss_sanity_values():
    dd = DeformationDiffusion()
    f = dd.fields(torch.tensor([48, 0]), (64, 64), generator=gen(4))
    psi = f.psi[:1]
    assert psi.abs().max() > 0.1
    assert torch.equal(f.psi[1:], torch.zeros_like(f.psi[1:]))  # psi_0 == 0
    w = invert_field(psi, iterations=30)
    c = warp(w, psi, padding_mode="border")
    assert ((c + psi).norm() / psi.norm()).item() < 0.02
    good = recovery_losses(w, psi)
    assert good.dist.item() < 1e-3 and good.ang.item() < -0.999
    zero = recovery_losses(torch.zeros_like(psi), psi)
    assert abs(zero.dist.item() - 1.0) < 0.02 and zero.ang.item() == 0.0


# regulariser: a true Jacobian penalty ------------------------------------------------------
def test_jacobian_penalty_sees_reflection():
    shape = (16, 16)
    x = identity_grid(shape)
    r = torch.zeros(1, 2, *shape)
    r[:, 1] = -2 * (x[:, 1] - 7.5)  # x1 -> -x1: det = -1 everywhere
    loss = recovery_losses(r, torch.zeros_like(r))
    assert loss.jacobian.item() == pytest.approx(1.0, abs=1e-4)


# sampler mechanics -------------------------------------------------------------------------
def test_recovery_schedules():
    assert recovery_schedule(48) == list(range(47, -1, -1))
    assert recovery_schedule(48, legacy=True) == list(range(79, -1, -1))
    s = recovery_schedule(48, steps=8)
    assert len(s) == 8 and s[0] == 47 and s[-1] == 0 and s == sorted(s, reverse=True)
    cmr = augmentation_levels(32, 48, 2)
    assert cmr[:5] == [48, 50, 50, 52, 52] and cmr[-3:] == [78, 78, 80] and len(cmr) == 32
    lct = augmentation_levels(32, 64, 1)
    assert lct[:3] == [64, 65, 65] and lct[-1] == 80
    with pytest.raises(ValueError, match="t_start"):
        recovery_schedule(0)


def _disc_image_and_label(n=32):
    x = identity_grid((n, n))[0]
    d2 = (x[0] - n / 2) ** 2 + (x[1] - n / 2) ** 2
    label = ((d2 < 64).long() * 2 + (d2 < 16).long() * 3)[None, None]
    return label.float() / 5, label


def test_recover_rewarps_originals_and_is_deterministic():
    img, lab = _disc_image_and_label()
    f = DeformationDiffusion().fields(torch.tensor([40]), (32, 32), with_psi=False, generator=gen(5))
    seen = []

    def model(x, t):  # a constant small shift: phi accumulates, the image is one warp of the original
        seen.append(x)
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        out[:, 0] = 0.25
        return out

    res = recover(model, img, f.phi, recovery_schedule(40, steps=4), label=lab, label_mode="onehot")
    assert torch.allclose(seen[0], warp(img, f.phi))
    assert torch.allclose(res.image, warp(img, res.ddf), atol=1e-6)  # one interpolation of I_0
    assert torch.equal(res.label, warp_labels(lab, res.ddf, mode="onehot"))
    assert set(res.label.unique().tolist()) <= {0, 2, 5}
    assert torch.equal(res.random_ddf, f.phi)
    # from the identity, phi accumulates the 4 constant shifts of 0.25 voxel along axis 0
    acc = recover(model, img, torch.zeros_like(f.phi), recovery_schedule(40, steps=4)).ddf
    assert torch.allclose(acc[:, 0], torch.ones(1, 32, 32)) and acc[:, 1].abs().max() == 0
    again = recover(model, img, f.phi, recovery_schedule(40, steps=4), label=lab, label_mode="onehot")
    assert torch.equal(again.ddf, res.ddf)


def test_forward_is_seeded_and_q_sample_shapes():
    dd = DeformationDiffusion(ctl_size=32)
    img = torch.rand(2, 1, 16, 16, 16)
    a = dd.q_sample(img, torch.tensor([3, 7]), generator=gen(6))
    b = dd.q_sample(img, torch.tensor([3, 7]), generator=gen(6))
    assert torch.equal(a.image, b.image) and a.image.shape == img.shape
    assert a.fields.phi.shape == (2, 3, 16, 16, 16) and a.fields.n_img.tolist() == [2, 8]
    with pytest.raises(ValueError, match="levels"):
        dd.fields(torch.tensor([81]), (16, 16))
    with pytest.raises(ValueError, match="spatial_dims"):
        multiscale_velocity(1, 4)
