"""Sliding-window inference with one shared noise field (medfusion.models.sliding) and DiffusionCT's ``restore``.

Oracles: a window that covers the whole input is whole-volume inference; Gaussian blending of a pointwise map is
exact; for a local operator (3-voxel box filter, receptive-field radius 1) with 50% overlap the blended result stays
within 1% of the signal's SD of whole-volume inference on average (stated tolerance, measured 0.6%: the error lives
on the window borders, where the Gaussian weights are small); windows that return their noise crop reassemble the
shared field exactly, so overlapping windows saw the same noise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medfusion.models.base import Restorer
from medfusion.models.diffusion_ct import DenoiserConfig, DiffusionCT, DiffusionCTAutoencoder, SamplingConfig
from medfusion.models.export import export_model
from medfusion.models.sliding import aligned_overlap, sliding_windows


def _smooth_volume(shape=(2, 1, 32, 32, 24), seed=0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool3d(x, 5, 1, 2) * 3


def _box(w: torch.Tensor, noise) -> torch.Tensor:
    return F.avg_pool3d(F.pad(w, (1,) * 6, mode="replicate"), 3, 1)


def test_one_window_covering_the_volume_is_whole_volume_inference():
    x = _smooth_volume()
    torch.testing.assert_close(sliding_windows(x, (32, 32, 24), _box, multiple=8), _box(x, None), rtol=0, atol=1e-6)
    # a window larger than the volume is cut to it
    torch.testing.assert_close(sliding_windows(x, (64, 64, 64), _box, multiple=8), _box(x, None), rtol=0, atol=1e-6)


def test_overlapping_windows_blend_exactly_for_a_pointwise_map_and_closely_for_a_local_one():
    x = _smooth_volume()
    pointwise = lambda w, noise: torch.tanh(2 * w)  # noqa: E731
    y = sliding_windows(x, (16, 16, 16), pointwise, multiple=8, overlap=0.5, sw_batch_size=3)
    torch.testing.assert_close(y, torch.tanh(2 * x), rtol=0, atol=1e-6)
    y = sliding_windows(x, (16, 16, 16), _box, multiple=8, overlap=0.5)
    err = (y - _box(x, None)).abs()
    assert err.mean() < 0.01 * x.std()
    assert err.max() > 0  # the windows really were smaller than the volume


def test_windows_get_crops_of_one_shared_noise_field():
    """Each window returns its noise crop upsampled to the image grid: the blend reproduces the field exactly, which
    it could not if two overlapping windows had been given different noise."""
    x = torch.zeros(2, 1, 32, 32, 16)
    f = 4
    field = torch.randn(2, 3, 8, 8, 4, generator=torch.Generator().manual_seed(1))

    def echo(w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        up = noise[:, :1]
        for axis in (2, 3, 4):
            up = up.repeat_interleave(f, dim=axis)
        assert up.shape == w.shape
        return up

    y = sliding_windows(x, (16, 16, 8), echo, multiple=8, overlap=0.5, field=field, factor=f)
    expect = field[:, :1]
    for axis in (2, 3, 4):
        expect = expect.repeat_interleave(f, dim=axis)
    torch.testing.assert_close(y, expect, rtol=0, atol=1e-6)


def test_aligned_overlap_steps_are_multiples_and_bad_windows_raise():
    for roi, overlap in zip((16, 24, 40), aligned_overlap((16, 24, 40), 8, 0.25)):
        step = int(roi * (1 - overlap))  # MONAI's window step
        assert step % 8 == 0 and 0 < step <= roi
    x = torch.zeros(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        sliding_windows(x, (12, 16, 16), _box, multiple=8)
    with pytest.raises(ValueError, match="3 values"):
        sliding_windows(x, (16, 16), _box, multiple=8)
    with pytest.raises(ValueError, match="overlap"):
        sliding_windows(x, (8, 8, 8), _box, multiple=8, overlap=1.0)


# ------------------------------------------------------------------------------------------- DiffusionCT.restore
@pytest.fixture(scope="module")
def model3d(tmp_path_factory) -> DiffusionCT:
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(spatial_dims=3, channels=(8, 16), latent_channels=2, norm_num_groups=4)
    path = tmp_path_factory.mktemp("ae3d") / "stage1"
    export_model(ae, path)
    model = DiffusionCT(
        autoencoder=str(path), mode="translate", residual=False, ema_decay=None,
        denoiser=DenoiserConfig(channels=(8, 16), attention_levels=(False, False), num_head_channels=8, norm_num_groups=4),
        sampling=SamplingConfig(num_steps=2, strength=0.5, sampler="ddim"),
    )  # fmt: skip
    return model.eval()


def test_diffusion_ct_restore_one_window_equals_whole_volume(model3d):
    """One window over the volume draws the same noise field first, so the sample is the whole-volume one."""
    assert isinstance(model3d, Restorer) and model3d.divisible_by == 4
    x = _smooth_volume((1, 1, 16, 16, 16)).clamp(-1, 1)
    whole = model3d.restore(x, generator=torch.Generator().manual_seed(3))
    one = model3d.restore(x, generator=torch.Generator().manual_seed(3), roi_size=(16, 16, 16))
    torch.testing.assert_close(one, whole, rtol=0, atol=1e-5)
    windows = model3d.restore(x, generator=torch.Generator().manual_seed(3), roi_size=(8, 8, 8), overlap=0.5)
    assert windows.shape == x.shape and torch.isfinite(windows).all()
    again = model3d.restore(x, generator=torch.Generator().manual_seed(3), roi_size=(8, 8, 8), overlap=0.5)
    torch.testing.assert_close(windows, again, rtol=0, atol=0)  # seeded: reproducible
