"""Image-quality and texture (radiomic) metrics of one image against a reference, without Lightning.

The one definition of each metric used by models (validation), apps and benchmarks:

* :func:`psnr` and :func:`ssim` (fidelity to a reference scan). SSIM follows Wang et al. 2004 (IEEE TIP 13(4),
  eq. 13) with scikit-image's ``structural_similarity``: an 11 x 11 (x 11) Gaussian window of sigma 1.5 (truncated
  at 3.5 sigma), K1 = 0.01, K2 = 0.03, population (1/N) covariances, the mean over the pixels whose window lies
  inside the image. These are MONAI ``SSIMMetric``'s defaults; the two agree to float32 rounding (~1e-5);
* :func:`batch_mean`: the mean of a metric over the ``(B, C)`` images of two ``(B, C, *spatial)`` tensors, as a
  model's validation step reports it;
* :func:`noise_sd` (SD in a uniform region), :func:`edge_profile` / :func:`edge_sharpness` (an MTF-like measure
  from the edge-spread function averaged around a known boundary, as in the circular-edge method of
  Richard et al., Med Phys 39(7), 2012);
* :func:`texture_features` (first-order statistics and grey-level co-occurrence features, Haralick et al. 1973,
  via ``skimage.feature.graycomatrix`` / ``graycoprops``, on a fixed HU window and quantisation) and
  :func:`ccc` / :func:`feature_ccc` (Lin's concordance correlation coefficient, Biometrics 45(1), 1989, eq. 2a),
  the reproducibility measure of CT radiomics studies (e.g. Choe et al., Radiology 2019).

Inputs are numpy arrays or torch tensors (converted with ``.detach().cpu()``, computed in float64); images are
single-channel ``(H, W)`` or ``(H, W, D)``. MONAI has PSNR and SSIM but no noise, edge, GLCM-in-ROI or CCC
metrics, and pyradiomics does not install on Python 3.11; scikit-image supplies the GLCM and SSIM kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

GLCM_PROPS: tuple[str, ...] = ("contrast", "dissimilarity", "homogeneity", "ASM", "energy", "correlation")
FIRST_ORDER: tuple[str, ...] = (
    "mean",
    "std",
    "skewness",
    "kurtosis",
    "p10",
    "p90",
    "iqr",
    "entropy",
    "uniformity",
)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _mask(mask, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(_np(mask) > 0.5) if mask is not None else np.ones(shape, dtype=bool)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match image shape {shape}")
    return m


def psnr(x, ref, data_range: float, mask=None) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB (``inf`` for identical images).

    The intensities are used as given: clip both images to the window of interest first (e.g. HU to
    [-1000, 1000] with ``data_range=2000``, or model outputs to [-1, 1] with ``data_range=2``), so that values
    outside the window neither count as error nor exceed the peak.

    Args:
        x, ref: images of the same shape, any number of axes (numpy or torch).
        data_range: peak-to-peak range of the intensity scale, ``high - low`` of the window (> 0).
        mask: optional region (same shape, nonzero = inside); the MSE is the mean squared error over its pixels
            only (the whole image when None).
    """
    x, ref = _np(x), _np(ref)
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {ref.shape}")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    m = _mask(mask, x.shape)
    mse = float(np.mean((x[m] - ref[m]) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def ssim(x, ref, data_range: float) -> float:
    """Mean structural similarity (Wang et al. 2004, eq. 13) of a 2D or 3D image (settings: module docstring).

    ``data_range`` is the window's ``high - low`` (clip to the window first, as for :func:`psnr`). A volume with
    fewer than 11 slices gets the mean of its axial-slice SSIMs (the 3D window would not fit).
    """
    from skimage.metrics import structural_similarity

    x, ref = _np(x), _np(ref)
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {ref.shape}")
    if x.ndim not in (2, 3):
        raise ValueError(f"ssim needs a single-channel (H, W) or (H, W, D) image, got shape {x.shape}")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    if min(x.shape[:2]) < 11:
        raise ValueError(
            f"ssim needs at least 11 pixels in-plane (11x11 Gaussian window), got shape {x.shape}"
        )
    kwargs = dict(
        data_range=data_range, gaussian_weights=True, sigma=1.5, truncate=3.5, K1=0.01, K2=0.03,
        use_sample_covariance=False,
    )  # fmt: skip
    if x.ndim == 3 and x.shape[2] < 11:  # thin volume: mean of the axial-slice SSIMs
        return float(
            np.mean([structural_similarity(x[..., k], ref[..., k], **kwargs) for k in range(x.shape[2])])
        )
    return float(structural_similarity(x, ref, **kwargs))


def batch_mean(metric: Callable[..., float], x, ref, data_range: float) -> float:
    """Mean of ``metric(x[b, c], ref[b, c], data_range)`` over the images of ``(B, C, *spatial)`` tensors.

    E.g. ``batch_mean(psnr, out.clamp(-1, 1), target, 2.0)`` in a validation step on [-1, 1] images.
    """
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if len(x.shape) < 4:
        raise ValueError(f"batch_mean needs (B, C, *spatial) with 2 or 3 spatial axes, got {tuple(x.shape)}")
    a, b = _np(x), _np(ref)
    vals = [metric(a[i, c], b[i, c], data_range) for i in range(a.shape[0]) for c in range(a.shape[1])]
    return float(np.mean(vals))


def noise_sd(img, mask, *, detrend_sigma: float | None = None) -> float:
    """Standard deviation of ``img`` inside ``mask`` (a uniform region, e.g. an eroded organ label).

    Args:
        img: ``(H, W)`` or ``(H, W, D)`` image (HU).
        mask: region of interest (nonzero = inside); erode label masks first so edges do not count.
        detrend_sigma: if given, first subtract a Gaussian-smoothed copy (sigma in pixels) to remove slow
            anatomical variation; this also removes the correlated part of the noise, so compare values only
            at the same setting.
    """
    x = _np(img)
    m = _mask(mask, x.shape)
    if m.sum() < 2:
        raise ValueError("noise_sd needs a mask with at least 2 pixels")
    if detrend_sigma is not None:
        from scipy.ndimage import gaussian_filter

        x = x - gaussian_filter(x, detrend_sigma)
    return float(np.std(x[m]))


class EdgeProfile(NamedTuple):
    """Edge-spread function averaged along a boundary.

    Attributes:
        distance: ``(B,)`` signed distance to the boundary in pixels (negative inside the mask).
        esf: ``(B,)`` mean intensity at that distance.
        contrast: outside minus inside plateau (intensity units).
        rise_10_90: distance (pixels) over which the normalised ESF rises from 10% to 90%; smaller is sharper.
        max_slope: maximum slope of the normalised ESF (1/pixel) = peak of the line-spread function; larger is sharper.
    """

    distance: np.ndarray
    esf: np.ndarray
    contrast: float
    rise_10_90: float
    max_slope: float


def edge_profile(img, mask, *, max_distance: float = 4.0, bin_width: float = 0.5) -> EdgeProfile:
    """Edge-spread function of ``img`` across the boundary of ``mask``, binned by signed Euclidean distance.

    The boundary lies half a pixel outside the last mask pixel; every pixel within ``max_distance`` of it
    contributes, so the ESF is averaged over the whole contour (oversampled for curved edges).
    """
    from scipy.ndimage import distance_transform_edt

    x = _np(img)
    m = _mask(mask, x.shape)
    if m.all() or not m.any():
        raise ValueError("edge_profile needs a mask with both inside and outside pixels")
    signed = np.where(m, -(distance_transform_edt(m) - 0.5), distance_transform_edt(~m) - 0.5)
    sel = np.abs(signed) <= max_distance
    edges = np.arange(-max_distance, max_distance + bin_width / 2, bin_width)
    n_bins = len(edges) - 1
    idx = np.clip(np.digitize(signed[sel], edges) - 1, 0, n_bins - 1)
    sums = np.bincount(idx, weights=x[sel], minlength=n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    ok = counts > 0
    centres = (edges[:-1] + bin_width / 2)[ok]
    esf = sums[ok] / counts[ok]
    inside = esf[centres < -max_distance / 2].mean() if np.any(centres < -max_distance / 2) else esf[0]
    outside = esf[centres > max_distance / 2].mean() if np.any(centres > max_distance / 2) else esf[-1]
    contrast = float(outside - inside)
    if contrast == 0 or len(esf) < 3:
        return EdgeProfile(centres, esf, contrast, float("nan"), float("nan"))
    norm = (esf - inside) / contrast
    slope = np.diff(norm) / np.diff(centres)
    max_slope = float(slope.max())

    steep = int(np.argmax(slope))  # the edge: crossings are searched outwards from the steepest step

    def crossing(level: float) -> float:
        below = np.nonzero(norm[: steep + 1] < level)[0]  # last point under the level before the edge
        i = below[-1] + 1 if below.size else 0
        while i < len(norm) - 1 and norm[i] < level:
            i += 1
        if i == 0:
            return float(centres[0])
        f = (level - norm[i - 1]) / (norm[i] - norm[i - 1])
        return float(centres[i - 1] + f * (centres[i] - centres[i - 1]))

    return EdgeProfile(centres, esf, contrast, crossing(0.9) - crossing(0.1), max_slope)


def edge_sharpness(img, mask, **kwargs) -> float:
    """Peak of the line-spread function across the boundary of ``mask`` (1/pixel): higher = sharper.

    ``mask`` is a binary structure whose boundary is a known edge (e.g. ``labels > 0`` for the body outline or a
    lung label). See :func:`edge_profile` for the full ESF and the 10-90% rise distance.
    """
    return edge_profile(img, mask, **kwargs).max_slope


def quantize(img, window: tuple[float, float], levels: int) -> np.ndarray:
    """Map ``img`` to integer grey levels ``0..levels-1`` over the fixed ``window`` (values outside are clipped)."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must be (low, high) with high > low, got {window!r}")
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    x = _np(img)
    q = np.floor((np.clip(x, lo, hi) - lo) / (hi - lo) * levels)
    return np.clip(q, 0, levels - 1).astype(np.int64)


def texture_features(
    img,
    roi_mask,
    *,
    window: tuple[float, float] = (-200.0, 300.0),
    levels: int = 32,
    distances: Sequence[int] = (1,),
) -> dict[str, float]:
    """First-order and GLCM texture features of ``img`` inside ``roi_mask``.

    First order (on the HU values in the ROI): mean, std, skewness, excess kurtosis, 10th / 90th percentile,
    interquartile range, and the entropy (bits) and uniformity of the quantised histogram. GLCM (Haralick 1973):
    contrast, dissimilarity, homogeneity, ASM, energy, correlation of the symmetric co-occurrence matrix over
    angles 0, 45, 90, 135 degrees and ``distances`` (pixels), counting only pairs with both pixels in the ROI.
    3D images accumulate the in-plane matrices of all axial slices (``[..., k]``).

    Args:
        img: ``(H, W)`` or ``(H, W, D)`` image in HU.
        roi_mask: same shape; nonzero = inside.
        window: fixed HU window for the quantisation (the same for every image compared).
        levels: number of grey levels.
        distances: GLCM pixel offsets.

    Returns:
        ``{"mean": ..., ..., "glcm_contrast": ..., ...}``; NaN values if the ROI has no pixel pairs.
    """
    from scipy import stats
    from skimage.feature import graycomatrix, graycoprops

    x = _np(img)
    m = _mask(roi_mask, x.shape)
    if x.ndim not in (2, 3):
        raise ValueError(f"texture_features needs (H, W) or (H, W, D), got shape {x.shape}")
    if m.sum() < 2:
        raise ValueError("texture_features needs an ROI with at least 2 pixels")
    v = x[m]
    q = quantize(x, window, levels)
    hist = np.bincount(q[m], minlength=levels) / m.sum()
    nz = hist[hist > 0]
    p10, p25, p75, p90 = np.percentile(v, [10, 25, 75, 90])
    feats: dict[str, float] = {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "skewness": float(stats.skew(v)) if v.std() > 0 else 0.0,
        "kurtosis": float(stats.kurtosis(v)) if v.std() > 0 else 0.0,
        "p10": float(p10),
        "p90": float(p90),
        "iqr": float(p75 - p25),
        "entropy": float(-(nz * np.log2(nz)).sum()),
        "uniformity": float((hist**2).sum()),
    }
    # ROI-restricted GLCM: pixels outside the ROI get an extra grey level whose row/column is dropped
    qm = np.where(m, q, levels).astype(np.uint16)
    slices = [qm] if qm.ndim == 2 else [qm[..., k] for k in range(qm.shape[-1]) if m[..., k].any()]
    angles = [0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    glcm = np.zeros((levels, levels, len(distances), len(angles)), dtype=np.float64)
    for s in slices:
        glcm += graycomatrix(s, list(distances), angles, levels=levels + 1, symmetric=True)[:levels, :levels]
    totals = glcm.sum(axis=(0, 1), keepdims=True)
    if np.any(totals == 0):
        feats.update({f"glcm_{p}": float("nan") for p in GLCM_PROPS})
        return feats
    glcm /= totals
    for prop in GLCM_PROPS:
        feats[f"glcm_{prop}"] = float(np.nanmean(graycoprops(glcm, prop)))
    return feats


def ccc(a, b) -> float:
    """Lin's concordance correlation coefficient ``2 cov(a,b) / (var a + var b + (mean a - mean b)^2)``.

    Population (1/n) moments (Lin 1989, eq. 2a); pairs with a non-finite value are dropped. Identical inputs give
    1 (also when constant); different constant inputs give 0.
    """
    a, b = _np(a).ravel(), _np(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"ccc needs equally long inputs, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2:
        raise ValueError("ccc needs at least 2 finite pairs")
    if np.array_equal(a, b):
        return 1.0
    ma, mb = a.mean(), b.mean()
    cov = np.mean((a - ma) * (b - mb))
    denom = a.var() + b.var() + (ma - mb) ** 2
    return float(2.0 * cov / denom) if denom > 0 else 0.0


def feature_ccc(
    images_a: Sequence,
    images_b: Sequence,
    rois: Sequence,
    **texture_kwargs,
) -> dict[str, float]:
    """CCC per texture feature between two acquisitions of the same cases.

    Args:
        images_a, images_b: per-case images (same anatomy, e.g. standard scan and its repeat / another protocol).
        rois: per-case ROI masks (the same ROI for a and b).
        **texture_kwargs: passed to :func:`texture_features` (``window``, ``levels``, ``distances``).

    Returns:
        ``{feature name: CCC across cases}``.
    """
    if not (len(images_a) == len(images_b) == len(rois)):
        raise ValueError(f"need as many images and ROIs: {len(images_a)}, {len(images_b)}, {len(rois)}")
    if len(rois) < 2:
        raise ValueError("feature_ccc needs at least 2 cases")
    fa = [texture_features(x, r, **texture_kwargs) for x, r in zip(images_a, rois)]
    fb = [texture_features(x, r, **texture_kwargs) for x, r in zip(images_b, rois)]
    return {k: ccc([f[k] for f in fa], [f[k] for f in fb]) for k in fa[0]}


class CCCSummary(NamedTuple):
    """Summary of per-feature CCCs: median, mean, fraction of features with CCC >= threshold, feature count."""

    median: float
    mean: float
    fraction_above: float
    n_features: int


def summarize_ccc(cccs: Mapping[str, float], threshold: float = 0.9) -> CCCSummary:
    """Median / mean CCC and the fraction of features at or above ``threshold`` (NaNs ignored)."""
    v = np.array([c for c in cccs.values() if np.isfinite(c)], dtype=float)
    if v.size == 0:
        return CCCSummary(float("nan"), float("nan"), float("nan"), 0)
    return CCCSummary(float(np.median(v)), float(v.mean()), float((v >= threshold).mean()), int(v.size))
