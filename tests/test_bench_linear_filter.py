"""The DiffusionCT bench's classical baseline: the least-squares linear shift-invariant filter per protocol."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "diffusion_ct.py"
    spec = importlib.util.spec_from_file_location("bench_diffusion_ct", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blur(img: np.ndarray, kernel_ft: np.ndarray) -> np.ndarray:
    return np.real(np.fft.ifft2(np.fft.fft2(img) * kernel_ft))


def test_linear_filter_recovers_a_known_kernel_and_denoises_held_out_slices():
    bench = _bench()
    rng = np.random.default_rng(0)
    f = np.fft.fftfreq(32)
    # a smooth kernel: source = blurred target
    mtf = np.exp(-(f[:, None] ** 2 + f[None, :] ** 2) / (2 * 0.15**2))
    targets = [rng.normal(0, 200, (32, 32)) for _ in range(6)]
    h = bench.fit_linear_filter([(_blur(t, mtf), t) for t in targets])
    np.testing.assert_allclose(h * mtf, 1.0, atol=1e-6)  # the inverse of the blur at every frequency

    # noisy sources (independent noise): the fitted filter beats identity on slices it was not fitted on
    def pair():
        t = _blur(rng.normal(0, 300, (32, 32)), mtf)
        return t + rng.normal(0, 100, t.shape), t

    h = bench.fit_linear_filter([pair() for _ in range(40)])
    test = [pair() for _ in range(10)]
    mse_id = np.mean([np.mean((s - t) ** 2) for s, t in test])
    mse_lin = np.mean(
        [np.mean((bench.apply_linear_filter(s[..., None], h)[..., 0] - t) ** 2) for s, t in test]
    )
    assert mse_lin < 0.5 * mse_id
    out = bench.apply_linear_filter(test[0][0][..., None].astype(np.float32), h)
    assert out.shape == (32, 32, 1) and out.dtype == np.float32
