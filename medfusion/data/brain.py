"""Brain MR "patients" from the MNI152 template shipped with nilearn (optional dependency, offline).

Each patient is the ICBM152 2009 T1 template (2 mm) with its tissue maps, warped by a random smooth
displacement field (a few mm, diffeomorphic for the default strength) and multiplied by a smooth bias field
(e.g. Sled et al., IEEE TMI 17(1), 1998: MR intensity non-uniformity is a slow multiplicative field), plus
Rician noise. Labels come from the template's own probability maps: 0 background, 1 CSF
(brain mask minus GM and WM), 2 grey matter, 3 white matter (argmax of the three probabilities inside the mask).

``nilearn`` is an optional dependency (``pip install medfusion[data]``): :func:`available` says whether it is
installed, and :func:`brain_mr_phantom` raises ``ImportError`` naming the extra when it is not. Nothing is
downloaded: nilearn ships the 2 mm template and tissue maps inside its wheel.

Why hand-written: nilearn provides the images only; the random deformation / bias / noise "patient" model is the
few lines below (scipy), seeded like the CT phantoms.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from medfusion.data.phantoms import Phantom

BRAIN_LABELS: dict[int, str] = {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter"}


def available() -> bool:
    """True when nilearn (which ships the MNI152 template) is installed."""
    return importlib.util.find_spec("nilearn") is not None


@lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    if not available():
        raise ImportError(
            "brain MR phantoms need nilearn: pip install 'medfusion[data]' (or pip install nilearn)"
        )
    from nilearn import datasets

    t1 = np.asarray(datasets.load_mni152_template(resolution=2).dataobj, dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=2).dataobj) > 0
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    labels[~mask] = 0
    return t1, labels, (2.0, 2.0, 2.0)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Unit-SD Gaussian-smoothed white noise."""
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.normal(size=shape), sigma)
    return (f / (f.std() + 1e-12)).astype(np.float32)


def brain_mr_phantom(
    shape: Sequence[int] | None = None,
    *,
    seed: int,
    deformation_mm: float = 3.0,
    bias: float = 0.15,
    noise: float = 0.02,
) -> Phantom:
    """A seeded brain T1 "patient" (intensities ~[0, 1]) with a GM/WM/CSF label map.

    Args:
        shape: ``(H, W, D)`` to resample to, ``(H, W)`` for the central axial slice, or None for the native
            99 x 117 x 95 grid at 2 mm.
        seed: patient seed (deformation, bias field, noise).
        deformation_mm: SD of each displacement component (mm), smooth over ~20 mm.
        bias: SD of the log bias field (multiplicative, smooth over ~40 mm).
        noise: Rician noise SD relative to the template's intensity range.

    Returns:
        :class:`~medfusion.data.phantoms.Phantom` (``hu`` holds the normalised T1 intensity, not HU).
    """
    from scipy.ndimage import map_coordinates, zoom

    t1, labels, spacing = _template()
    if deformation_mm < 0 or bias < 0 or noise < 0:
        raise ValueError("deformation_mm, bias and noise must be >= 0")
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in t1.shape], indexing="ij")
    coords = [g + _smooth_field(rng, t1.shape, 10.0 / s) * deformation_mm / s for g, s in zip(grid, spacing)]
    image = map_coordinates(t1, coords, order=1, mode="nearest")
    lab = map_coordinates(labels, coords, order=0, mode="nearest").astype(np.uint8)
    image = image * np.exp(bias * _smooth_field(rng, t1.shape, 20.0 / spacing[0]))
    real = image + rng.normal(0.0, noise, size=image.shape)
    imag = rng.normal(0.0, noise, size=image.shape)
    image = np.sqrt(real**2 + imag**2).astype(np.float32)
    out_spacing: tuple[float, ...] = spacing
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"shape must be (H, W) or (H, W, D), got {shape!r}")
        if len(shape) == 2:
            k = image.shape[2] // 2
            image, lab = image[:, :, k], lab[:, :, k]
        factors = [n / m for n, m in zip(shape, image.shape)]
        image = zoom(image, factors, order=1)
        lab = zoom(lab, factors, order=0)
        out_spacing = tuple(s / f for s, f in zip(spacing, factors))
    return Phantom(
        hu=image.astype(np.float32), labels=lab.astype(np.uint8), spacing=tuple(float(s) for s in out_spacing)
    )
