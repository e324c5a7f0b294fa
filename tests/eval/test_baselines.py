"""Classical baselines: the least-squares linear filter recovers a known kernel; the Gaussian sigma is tuned."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from medfusion.eval.baselines import (
    GaussianBaseline,
    LinearFilterBaseline,
    apply_linear_filter,
    fit_linear_filter,
    tune_gaussian_sigma,
)


def _blur(img: np.ndarray, kernel_ft: np.ndarray) -> np.ndarray:
    return np.real(np.fft.ifft2(np.fft.fft2(img) * kernel_ft))


def test_linear_filter_recovers_a_known_kernel_and_denoises_held_out_slices():
    rng = np.random.default_rng(0)
    f = np.fft.fftfreq(32)
    mtf = np.exp(-(f[:, None] ** 2 + f[None, :] ** 2) / (2 * 0.15**2))  # smooth kernel: source = blurred target
    targets = [rng.normal(0, 200, (32, 32)) for _ in range(6)]
    h = fit_linear_filter([(_blur(t, mtf), t) for t in targets])
    np.testing.assert_allclose(h * mtf, 1.0, atol=1e-6)  # the inverse of the blur at every frequency

    def pair():  # noisy sources (independent noise)
        t = _blur(rng.normal(0, 300, (32, 32)), mtf)
        return t + rng.normal(0, 100, t.shape), t

    h = fit_linear_filter([pair() for _ in range(40)])
    test = [pair() for _ in range(10)]
    mse_id = np.mean([np.mean((s - t) ** 2) for s, t in test])
    mse_lin = np.mean([np.mean((apply_linear_filter(s[..., None], h)[..., 0] - t) ** 2) for s, t in test])
    assert mse_lin < 0.5 * mse_id  # beats identity on slices it was not fitted on
    out = apply_linear_filter(test[0][0][..., None].astype(np.float32), h)
    assert out.shape == (32, 32, 1) and out.dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        apply_linear_filter(np.zeros((16, 16)), h)


def test_linear_filter_baseline_per_protocol():
    rng = np.random.default_rng(1)
    pairs = {"sharp": [(rng.normal(size=(16, 16)), rng.normal(size=(16, 16))) for _ in range(3)],
             "mixed": [(np.zeros((16, 16)), np.zeros((16, 16))), (np.zeros((8, 8)), np.zeros((8, 8)))]}  # fmt: skip
    base = LinearFilterBaseline.fit(pairs)
    assert set(base.filters) == {"sharp"}  # slices of different shapes get no filter
    src = pairs["sharp"][0][0].astype(np.float32)
    np.testing.assert_allclose(base(src, "sharp"), apply_linear_filter(src, base.filters["sharp"]))
    with pytest.raises(ValueError, match="mixed"):
        base(src, "mixed")


def test_linear_filter_on_stacks_of_slices_is_the_slice_filter():
    """A volume (H, W, K) is K axial slices: fitted on stacks, the filter equals the one fitted on their slices, and
    a stack is filtered slice by slice."""
    rng = np.random.default_rng(3)
    stacks = [(rng.normal(size=(16, 12, 3)), rng.normal(size=(16, 12, 3))) for _ in range(2)]
    base = LinearFilterBaseline.fit({"mr_4x": stacks, "other": [(np.zeros((16, 12, 2)), np.zeros((8, 8, 2)))]})
    assert set(base.filters) == {"mr_4x"}  # slices of two shapes get none
    h = fit_linear_filter([(a[..., k], b[..., k]) for a, b in stacks for k in range(3)])
    np.testing.assert_allclose(base.filters["mr_4x"], h)
    src = stacks[0][0].astype(np.float32)
    out = base(src, "mr_4x")
    assert out.shape == src.shape and out.dtype == np.float32
    for k in range(3):
        np.testing.assert_allclose(out[..., k], apply_linear_filter(src[..., k], h), atol=1e-5)


def test_gaussian_sigma_tuned_on_validation_pairs():
    rng = np.random.default_rng(2)
    clean = [ndi.gaussian_filter(rng.normal(0, 300, (48, 48)), 4) for _ in range(4)]
    noisy = [(c + rng.normal(0, 50, c.shape), c) for c in clean]
    assert tune_gaussian_sigma(noisy) > 0  # noise: smoothing pays
    assert tune_gaussian_sigma([(c, c) for c in clean]) == 0.0  # already the target: identity
    base = GaussianBaseline.fit({"low_dose": noisy})
    out = base(noisy[0][0], "low_dose")
    assert out.dtype == np.float32 and np.mean((out - clean[0]) ** 2) < np.mean((noisy[0][0] - clean[0]) ** 2)
    np.testing.assert_allclose(base(noisy[0][0], "unknown"), noisy[0][0].astype(np.float32))


def test_noise_power_spectrum_of_white_and_correlated_noise():
    from medfusion.eval.baselines import NoiseTexture, noise_power_spectrum

    rng = np.random.default_rng(0)
    imgs = [40.0 + rng.normal(0, 10.0, (64, 64)) for _ in range(4)]
    rois = [np.ones((64, 64), bool)] * 4
    nps = noise_power_spectrum(imgs, rois, patch=16)
    assert nps.mean() == pytest.approx(100.0 * 15 / 16, rel=0.1)  # variance (patch means removed: 1 - 1/N)
    assert nps[1:, 1:].std() / nps[1:, 1:].mean() < 0.4  # white: flat
    # smoothed noise: low frequencies carry the power, and sampled noise reproduces SD and spectrum
    smooth = [ndi.gaussian_filter(rng.normal(0, 30.0, (64, 64)), 1.5) for _ in range(8)]
    tex = NoiseTexture.fit(smooth, [np.ones((64, 64), bool)] * 8)
    assert tex.nps[0, 1] > 5 * tex.nps[8, 8]
    draw = tex.sample((128, 128), np.random.default_rng(1))
    assert draw.std() == pytest.approx(np.mean([s.std() for s in smooth]), rel=0.15)
    again = noise_power_spectrum([draw], [np.ones((128, 128), bool)])
    assert again[0, 1] > 5 * again[8, 8]
    np.testing.assert_array_equal(draw, tex.sample((128, 128), np.random.default_rng(1)))  # seeded
    assert tex.sample((32, 32, 3), np.random.default_rng(0)).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="patch"):
        noise_power_spectrum(imgs[:1], [np.zeros((64, 64), bool)])
