"""Classical image-domain baselines for CT standardization, fitted per protocol on training / validation pairs.

A learned standardizer (DiffusionCT, Selim et al., arXiv 2310.05237) should beat what a filter can do:

* :class:`GaussianBaseline`: a Gaussian low-pass per protocol whose sigma (pixels) is the candidate with the
  lowest mean squared error against the standard scans of the validation pairs (0 = identity);
* :class:`LinearFilterBaseline`: the least-squares linear shift-invariant filter per protocol,
  ``H(f) = sum_i S_i(f) conj(X_i(f)) / sum_i |X_i(f)|^2`` over the training pairs (X source, S standard scan,
  2D Fourier transforms of slices clipped to the HU window). It is the best linear shift-invariant map in the
  MSE sense, the fitted counterpart of filtering-based CT kernel conversion (one transfer function per kernel
  pair, usually derived from measured MTFs).

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


@dataclass
class LinearFilterBaseline:
    """Per-protocol least-squares filters; protocols whose training slices differ in shape get none."""

    filters: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def fit(cls, pairs: Mapping[str, Sequence[Pair]]) -> LinearFilterBaseline:
        """One filter per protocol whose training pairs are 2D slices of one shape."""
        filters = {}
        for proto, ps in pairs.items():
            shapes = {np.squeeze(a).shape for pair in ps for a in pair}
            if len(shapes) == 1 and len(next(iter(shapes))) == 2:
                filters[proto] = fit_linear_filter(ps)
        return cls(filters)

    def __call__(self, src: np.ndarray, protocol: str) -> np.ndarray:
        if protocol not in self.filters:
            raise ValueError(f"no linear filter for protocol {protocol!r}; fitted: {sorted(self.filters)}")
        return apply_linear_filter(np.asarray(src, dtype=np.float32), self.filters[protocol])
