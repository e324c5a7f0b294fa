"""Image metrics against known values: PSNR of known noise, SSIM, noise SD, edge sharpness, texture, CCC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from medfusion.eval import image as E


def test_psnr_of_known_noise_and_identity(rng):
    ref = rng.uniform(-1, 1, size=(64, 64))
    noisy = ref + rng.normal(0, 0.1, size=ref.shape)
    mse = np.mean((noisy - ref) ** 2)
    assert E.psnr(noisy, ref, 2.0) == pytest.approx(10 * np.log10(4.0 / mse))
    assert E.psnr(noisy, ref, 2.0) == pytest.approx(20 * np.log10(2.0 / 0.1), abs=0.2)
    assert E.psnr(ref, ref, 2.0) == float("inf")
    assert E.psnr(torch.from_numpy(noisy), torch.from_numpy(ref), 2.0) == pytest.approx(
        E.psnr(noisy, ref, 2.0)
    )
    mask = np.zeros_like(ref, dtype=bool)
    mask[:10] = True
    assert E.psnr(noisy, ref, 2.0, mask=mask) != E.psnr(noisy, ref, 2.0)
    with pytest.raises(ValueError):
        E.psnr(noisy, ref[:10], 2.0)
    with pytest.raises(ValueError):
        E.psnr(noisy, ref, 0.0)


def test_ssim_identity_noise_and_3d(rng):
    ref = ndi.gaussian_filter(rng.normal(size=(48, 48)), 3)
    ref = (ref - ref.min()) / np.ptp(ref)
    assert E.ssim(ref, ref, 1.0) == pytest.approx(1.0)
    low = E.ssim(ref + rng.normal(0, 0.2, ref.shape), ref, 1.0)
    high = E.ssim(ref + rng.normal(0, 0.02, ref.shape), ref, 1.0)
    assert 0 < low < high < 1
    vol = rng.uniform(size=(16, 16, 16))
    assert E.ssim(vol, vol, 1.0) == pytest.approx(1.0)
    thin = rng.uniform(size=(16, 16, 3))
    noisy = thin + rng.normal(0, 0.1, thin.shape)
    assert E.ssim(noisy, thin, 1.0) == pytest.approx(
        np.mean([E.ssim(noisy[..., k], thin[..., k], 1.0) for k in range(3)])
    )
    with pytest.raises(ValueError, match="11"):
        E.ssim(thin[:8, :8, 0], thin[:8, :8, 0], 1.0)


def test_psnr_matches_monai_and_skimage(rng):
    from monai.metrics import PSNRMetric
    from skimage.metrics import peak_signal_noise_ratio

    ref = rng.uniform(-1000, 1000, size=(40, 36))
    x = np.clip(ref + rng.normal(0, 30, ref.shape), -1000, 1000)
    ours = E.psnr(x, ref, 2000.0)
    assert ours == pytest.approx(peak_signal_noise_ratio(ref, x, data_range=2000.0), abs=1e-4)
    monai = PSNRMetric(max_val=2000.0)(torch.tensor(x)[None, None], torch.tensor(ref)[None, None])
    assert ours == pytest.approx(float(monai.mean()), abs=1e-4)
    # the mask restricts the MSE to its pixels
    mask = np.zeros(ref.shape, bool)
    mask[5:20, 3:30] = True
    assert E.psnr(x, ref, 2000.0, mask=mask) == pytest.approx(
        peak_signal_noise_ratio(ref[mask], x[mask], data_range=2000.0), abs=1e-4
    )


@pytest.mark.parametrize("shape", [(48, 44), (24, 22, 20)])
def test_ssim_matches_monai_and_skimage(rng, shape):
    """Gaussian window sigma 1.5 (11 wide), K1 0.01, K2 0.03, population covariance: MONAI SSIMMetric's defaults."""
    from monai.metrics import SSIMMetric
    from skimage.metrics import structural_similarity

    ref = ndi.gaussian_filter(rng.normal(size=shape), 2)
    ref = (ref - ref.min()) / np.ptp(ref)
    x = ref + rng.normal(0, 0.05, ref.shape)
    ours = E.ssim(x, ref, 1.0)
    monai = SSIMMetric(spatial_dims=len(shape), data_range=1.0)(
        torch.tensor(x)[None, None], torch.tensor(ref)[None, None]
    )
    assert ours == pytest.approx(float(monai.mean()), abs=1e-4)
    sk = structural_similarity(x, ref, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ours == pytest.approx(sk, abs=1e-12)


def test_batch_mean_averages_per_image(rng):
    ref = torch.from_numpy(rng.uniform(-1, 1, size=(3, 1, 16, 16)))
    out = ref + 0.1 * torch.from_numpy(rng.normal(size=ref.shape))
    want = np.mean([E.psnr(out[i, 0], ref[i, 0], 2.0) for i in range(3)])
    assert E.batch_mean(E.psnr, out, ref, 2.0) == pytest.approx(want)
    assert E.batch_mean(E.ssim, ref, ref, 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        E.batch_mean(E.psnr, out[:2], ref, 2.0)


def test_noise_sd_recovers_known_sigma(rng):
    img = 40.0 + rng.normal(0, 12.0, size=(96, 96))
    mask = np.zeros(img.shape, bool)
    mask[20:80, 20:80] = True
    assert E.noise_sd(img, mask) == pytest.approx(12.0, rel=0.05)
    ramp = img + np.linspace(0, 300, 96)[None, :]  # a slow trend inflates the plain SD, not the detrended one
    assert E.noise_sd(ramp, mask) > 50
    assert E.noise_sd(ramp, mask, detrend_sigma=8) < 13
    with pytest.raises(ValueError):
        E.noise_sd(img, np.zeros_like(mask))


def test_edge_sharpness_orders_blur_and_measures_rise_distance():
    yy, xx = np.mgrid[:96, :96]
    disk = np.hypot(yy - 47.5, xx - 47.5) < 30
    step = np.where(disk, 100.0, 0.0)
    blurred = ndi.gaussian_filter(step, 2.0)
    p_step, p_blur = E.edge_profile(step, disk), E.edge_profile(blurred, disk, max_distance=12.0)
    assert p_step.contrast == pytest.approx(-100.0, abs=1.0)
    assert (
        E.edge_sharpness(step, disk)
        > E.edge_sharpness(blurred, disk)
        > E.edge_sharpness(ndi.gaussian_filter(step, 3.0), disk)
    )
    # Gaussian edge: 10-90% rise = 2 * 1.2816 * sigma
    assert p_blur.rise_10_90 == pytest.approx(2 * 1.2816 * 2.0, rel=0.15)
    assert p_step.rise_10_90 < 1.5


def test_ccc_known_values(rng):
    a = rng.normal(size=50)
    a -= a.mean()
    assert E.ccc(a, a) == 1.0
    assert E.ccc(np.ones(5), np.ones(5)) == 1.0
    assert E.ccc(a, -a) == pytest.approx(-1.0)
    # a constant shift lowers CCC below the (unchanged) Pearson correlation: 2 var / (2 var + d^2)
    v = a.var()
    assert E.ccc(a, a + 1.0) == pytest.approx(2 * v / (2 * v + 1.0))
    assert E.ccc([1.0, 2.0, np.nan, 4.0], [1.0, 2.0, 5.0, 4.0]) == 1.0
    with pytest.raises(ValueError):
        E.ccc([1.0], [1.0])


def test_texture_features_roi_glcm_and_feature_ccc(rng):
    img = rng.normal(40, 10, size=(64, 64))
    roi = np.zeros(img.shape, bool)
    roi[16:48, 16:48] = True
    f = E.texture_features(img, roi)
    assert set(E.FIRST_ORDER) <= set(f) and {f"glcm_{p}" for p in E.GLCM_PROPS} <= set(f)
    assert f["mean"] == pytest.approx(img[roi].mean())
    assert f["glcm_energy"] == pytest.approx(np.sqrt(f["glcm_ASM"]), rel=0.01)  # averaged over angles
    # pixels outside the ROI do not change the features
    other = img.copy()
    other[~roi] = 900.0
    assert E.texture_features(other, roi) == pytest.approx(f)
    # a constant ROI has zero GLCM contrast and full uniformity
    flat = E.texture_features(np.full((32, 32), 40.0), np.ones((32, 32), bool))
    assert flat["glcm_contrast"] == 0.0 and flat["uniformity"] == pytest.approx(1.0)
    # smoother texture: lower GLCM contrast, higher homogeneity
    smooth = E.texture_features(ndi.gaussian_filter(img, 1.5), roi)
    assert smooth["glcm_contrast"] < f["glcm_contrast"] and smooth["glcm_homogeneity"] > f["glcm_homogeneity"]
    # 3D works (accumulates axial-slice GLCMs)
    vol = rng.normal(40, 10, size=(16, 16, 4))
    assert np.isfinite(E.texture_features(vol, np.ones(vol.shape, bool))["glcm_correlation"])
    # feature CCC: identical acquisitions -> 1; a repeat with small noise stays high
    images = [rng.normal(40 + 5 * k, 5 + 3 * k, size=(32, 32)) for k in range(6)]
    rois = [np.ones((32, 32), bool)] * 6
    same = E.feature_ccc(images, images, rois)
    assert all(v == 1.0 for v in same.values())
    repeat = E.feature_ccc(images, [x + rng.normal(0, 1, x.shape) for x in images], rois)
    assert repeat["mean"] > 0.95
    summary = E.summarize_ccc(repeat, 0.9)
    assert summary.n_features == len(repeat) and 0 <= summary.fraction_above <= 1
    with pytest.raises(ValueError):
        E.texture_features(img, roi, window=(10, 0))
