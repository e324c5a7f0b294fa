"""Classical image-domain baselines for CT standardization, fitted per protocol on training / validation pairs.

A learned standardizer (DiffusionCT, Selim et al., arXiv 2310.05237) should beat what a filter can do:

* :class:`GaussianBaseline`: a Gaussian low-pass per protocol whose sigma (pixels) is the candidate with the
  lowest mean squared error against the standard scans of the validation pairs (0 = identity);
* :class:`LinearFilterBaseline`: the least-squares linear shift-invariant filter per protocol,
  ``H(f) = sum_i S_i(f) conj(X_i(f)) / sum_i |X_i(f)|^2`` over the training pairs (X source, S standard scan,
  2D Fourier transforms of slices clipped to the HU window). It is the best linear shift-invariant map in the
  MSE sense, the fitted counterpart of filtering-based CT kernel conversion (one transfer function per kernel
  pair, usually derived from measured MTFs);
* :class:`NoiseTexture`: the noise power spectrum (NPS) of the standard protocol, measured in uniform regions of
  training scans (:func:`noise_power_spectrum`: mean-subtracted square patches, ``NPS = |DFT|^2 / N``, the ROI
  method of ICRU Report 87, 2012, and Boedeker et al., Phys Med Biol 52(14), 2007), and noise drawn with that
  spectrum (:meth:`NoiseTexture.sample`: white Gaussian noise shaped by ``sqrt(NPS)`` in the Fourier domain).
  Added to a supervised restorer's output it gives a baseline that has the standard scan's noise texture by
  construction, the fair opponent of a generative model's texture claims.

Both take HU arrays and return float32 HU of the same shape; pure numpy / scipy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Pair = tuple[np.ndarray, np.ndarray]  # (source HU, standard-scan HU), same shape
DEFAULT_SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)


def tune_gaussian_sigma(pairs: Sequence[Pair], sigmas: Sequence[float] = DEFAULT_SIGMAS) -> float:
    """The sigma (pixels, 0 = identity) of ``sigmas`` whose Gaussian filter of the sources has the lowest MSE."""
    from scipy.ndimage import gaussian_filter

    if not pairs:
        raise ValueError("tune_gaussian_sigma needs at least one (source, target) pair")
    mse = [np.mean([np.mean((gaussian_filter(s, sg) - r) ** 2) for s, r in pairs]) for sg in sigmas]
    return float(sigmas[int(np.argmin(mse))])


@dataclass
class GaussianBaseline:
    """Per-protocol Gaussian filter; ``sigmas[protocol]`` in pixels (an unknown protocol is left unfiltered)."""

    sigmas: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, pairs: Mapping[str, Sequence[Pair]], candidates: Sequence[float] = DEFAULT_SIGMAS):
        """Tune one sigma per protocol on its validation ``pairs``."""
        return cls({p: tune_gaussian_sigma(v, candidates) for p, v in pairs.items()})

    def __call__(self, src: np.ndarray, protocol: str) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        return np.asarray(gaussian_filter(src, self.sigmas.get(protocol, 0.0)), dtype=np.float32)


def fit_linear_filter(pairs: Sequence[Pair], window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """Least-squares transfer function ``H`` (complex, slice-shaped) mapping sources to targets (module docstring).

    Every slice must have the same 2D shape (trailing singleton axes are squeezed).
    """
    num: np.ndarray | float = 0.0
    den: np.ndarray | float = 0.0
    for src, ref in pairs:
        spec = np.fft.fft2(np.clip(np.squeeze(src), *window))
        num = num + np.fft.fft2(np.clip(np.squeeze(ref), *window)) * np.conj(spec)
        den = den + np.abs(spec) ** 2
    if isinstance(num, float):
        raise ValueError("fit_linear_filter needs at least one (source, target) pair")
    return num / np.maximum(den, 1e-12)


def apply_linear_filter(
    src: np.ndarray, h: np.ndarray, window: tuple[float, float] = (-1000.0, 1000.0)
) -> np.ndarray:
    """Apply :func:`fit_linear_filter`'s ``H`` to one slice (trailing singleton axes and the dtype are kept)."""
    x = np.clip(np.squeeze(src), *window)
    if x.shape != h.shape:
        raise ValueError(f"slice shape {x.shape} differs from the filter's {h.shape}")
    return np.real(np.fft.ifft2(np.fft.fft2(x) * h)).reshape(src.shape).astype(src.dtype)


def axial_slices(img: np.ndarray) -> list[np.ndarray]:
    """The 2D axial slices of ``img`` (trailing singleton axes squeezed): ``[img]`` for a slice, ``img[..., k]`` for
    a stack of slices ``(H, W, K)``; nothing for other ranks."""
    a = np.squeeze(img)
    if a.ndim == 2:
        return [a]
    return [a[..., k] for k in range(a.shape[-1])] if a.ndim == 3 else []


@dataclass
class LinearFilterBaseline:
    """Per-protocol least-squares filters on axial slices (volumes are filtered slice by slice); protocols whose
    training slices differ in shape get none."""

    filters: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def fit(cls, pairs: Mapping[str, Sequence[Pair]]) -> LinearFilterBaseline:
        """One filter per protocol whose training pairs are 2D slices, or stacks of them, all of one slice shape."""
        filters = {}
        for proto, ps in pairs.items():
            sliced = [sl for a, b in ps for sl in zip(axial_slices(a), axial_slices(b))]
            shapes = {x.shape for pair in sliced for x in pair}
            if sliced and len(shapes) == 1 and all(np.squeeze(a).ndim in (2, 3) for pair in ps for a in pair):
                filters[proto] = fit_linear_filter(sliced)
        return cls(filters)

    def __call__(self, src: np.ndarray, protocol: str) -> np.ndarray:
        if protocol not in self.filters:
            raise ValueError(f"no linear filter for protocol {protocol!r}; fitted: {sorted(self.filters)}")
        src = np.asarray(src, dtype=np.float32)
        h = self.filters[protocol]
        if np.squeeze(src).ndim not in (2, 3):
            raise ValueError(f"linear filter: expected a slice or a stack of slices, got shape {src.shape}")
        if np.squeeze(src).ndim == 2:
            return apply_linear_filter(src, h)
        out = np.stack([apply_linear_filter(x, h) for x in axial_slices(src)], axis=-1)
        return out.reshape(src.shape)


def noise_power_spectrum(images: Sequence[np.ndarray], rois: Sequence[np.ndarray], patch: int = 16) -> np.ndarray:
    """2D noise power spectrum ``(patch, patch)`` (HU^2, unshifted DFT order) of uniform regions of ``images``.

    Every ``patch x patch`` square (stride ``patch // 2``) lying wholly inside an ROI of an axial slice is
    mean-subtracted and contributes ``|DFT|^2 / patch^2``; the NPS is their mean, so its mean over frequencies is
    the noise variance (Parseval). Images are ``(H, W)`` or ``(H, W, D)`` (slices along the last axis).
    """
    acc, n = np.zeros((patch, patch)), 0
    for img, roi in zip(images, rois, strict=True):
        img, roi = np.asarray(img, dtype=np.float64), np.asarray(roi, dtype=bool)
        if img.shape != roi.shape:
            raise ValueError(f"image shape {img.shape} differs from its ROI's {roi.shape}")
        slices = [(img, roi)] if img.ndim == 2 else [(img[..., k], roi[..., k]) for k in range(img.shape[-1])]
        for x, m in slices:
            step = max(1, patch // 2)
            for i in range(0, x.shape[0] - patch + 1, step):
                for j in range(0, x.shape[1] - patch + 1, step):
                    if m[i : i + patch, j : j + patch].all():
                        p = x[i : i + patch, j : j + patch]
                        acc += np.abs(np.fft.fft2(p - p.mean())) ** 2 / patch**2
                        n += 1
    if n == 0:
        raise ValueError(f"no {patch} x {patch} patch lies inside any ROI; use a smaller patch or larger ROIs")
    return acc / n


@dataclass
class NoiseTexture:
    """Noise with a measured NPS (module docstring); ``nps`` as :func:`noise_power_spectrum` returns it."""

    nps: np.ndarray

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], rois: Sequence[np.ndarray], patch: int = 16) -> NoiseTexture:
        """The NPS of the (standard-protocol) ``images`` in their uniform ``rois``."""
        return cls(noise_power_spectrum(images, rois, patch))

    def _nps_on(self, shape: tuple[int, int]) -> np.ndarray:
        """The NPS resampled (linear, in cycles/pixel) onto the DFT grid of an ``shape`` slice."""
        from scipy.interpolate import RegularGridInterpolator

        p = self.nps.shape[0]
        f = np.fft.fftshift(np.fft.fftfreq(p))
        grid = RegularGridInterpolator((f, f), np.fft.fftshift(self.nps), bounds_error=False, fill_value=None)
        fy, fx = np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]), indexing="ij")
        return np.maximum(grid(np.stack([fy, fx], axis=-1)), 0.0)

    def sample(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """Noise (HU, float32) of ``shape`` ``(H, W)`` or ``(H, W, D)`` whose axial slices have the NPS."""
        if len(shape) not in (2, 3):
            raise ValueError(f"shape must be (H, W) or (H, W, D), got {shape}")
        amp = np.sqrt(self._nps_on((shape[0], shape[1])))
        white = rng.standard_normal(shape)
        spec = np.fft.fft2(white, axes=(0, 1)) * (amp if len(shape) == 2 else amp[..., None])
        return np.real(np.fft.ifft2(spec, axes=(0, 1))).astype(np.float32)
