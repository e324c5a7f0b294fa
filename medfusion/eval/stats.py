"""Patient-level (cluster) bootstrap confidence intervals for evaluation tables.

Cases of one patient (its scans under several protocols, several samples of one model) are not independent, so the
unit that is resampled is the patient: each bootstrap replicate draws ``P`` patients with replacement and keeps
every row of each drawn patient (the cluster bootstrap, Davison & Hinkley, *Bootstrap Methods and their
Application*, 1997, section 3.8; Field & Welsh, JRSS B 69(3), 2007). The interval is the percentile interval of the
replicates (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13).

* :func:`resample_counts`: the ``(B, P)`` matrix of how often each patient is drawn in each replicate; one seed,
  one matrix, shared by every method and metric of an evaluation (so that intervals of different methods come
  from the same replicates, and a paired difference is resampled as a pair);
* :func:`cluster_mean`: the mean over rows and its interval;
* :func:`median_ccc` (and :func:`median_ccc_replicates`, :func:`mean_estimate`): the median over features of Lin's CCC across patients (texture reproducibility) and its
  interval, resampling patients (rows of the feature matrices).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

LEVEL = 0.95


class Estimate(NamedTuple):
    """A statistic with its percentile bootstrap interval.

    Attributes:
        mean: the statistic on the data (a mean over rows, or a median CCC).
        low, high: the ``level`` percentile interval of the bootstrap replicates (NaN when undefined).
        n: rows (finite values) behind ``mean``.
        n_patients: patients behind ``mean`` (the resampled unit).
    """

    mean: float
    low: float
    high: float
    n: int
    n_patients: int

    def as_dict(self) -> dict[str, float | int | list[float]]:
        """``{"mean", "ci": [low, high], "n", "n_patients"}`` (JSON-ready)."""
        return {"mean": self.mean, "ci": [self.low, self.high], "n": self.n, "n_patients": self.n_patients}


def resample_counts(n_patients: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_patients)`` int counts: how often each patient is drawn in each replicate (seeded)."""
    if n_patients < 1:
        raise ValueError(f"the bootstrap needs at least one patient, got {n_patients}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    idx = np.random.default_rng(seed).integers(0, n_patients, size=(n_boot, n_patients))
    counts = np.zeros((n_boot, n_patients), dtype=np.int64)
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1)
    return counts


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    reps = replicates[np.isfinite(replicates)]
    if reps.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(reps, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _finite_rows(values, patients) -> tuple[np.ndarray, np.ndarray]:
    """``(values, patients)`` as arrays, rows with a non-finite value left out."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(patients, dtype=np.int64)
    if v.shape != g.shape:
        raise ValueError(f"values and patients differ in shape: {v.shape} vs {g.shape}")
    keep = np.isfinite(v)
    return v[keep], g[keep]


def cluster_mean(
    values: Sequence[float] | np.ndarray,
    patients: Sequence[int] | np.ndarray,
    counts: np.ndarray,
    level: float = LEVEL,
) -> Estimate:
    """Mean of ``values`` over rows and its patient-bootstrap interval.

    Args:
        values: ``(N,)`` one value per row; non-finite values are left out (of the mean and of ``n``).
        patients: ``(N,)`` patient index of each row, ``0 <= p < P``.
        counts: :func:`resample_counts` ``(B, P)``.
        level: interval coverage (0.95).
    """
    v, g = _finite_rows(values, patients)
    n_pat = counts.shape[1]
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0)
    if g.min() < 0 or g.max() >= n_pat:
        raise ValueError(f"patient indices must lie in [0, {n_pat}), got [{g.min()}, {g.max()}]")
    sums = np.bincount(g, weights=v, minlength=n_pat)
    rows = np.bincount(g, minlength=n_pat).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = (counts @ sums) / (counts @ rows)  # replicates that drew no row of this statistic are NaN
    lo, hi = _interval(reps, level)
    return Estimate(float(v.mean()), lo, hi, int(v.size), int(np.count_nonzero(rows)))


def _ccc_columns(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Lin's CCC (population moments, :func:`medfusion.eval.image.ccc`) of each column of ``(P, F)`` ``a`` and
    ``b``, rows weighted by each row of ``w`` ``(B, P)``; returns ``(B, F)``. Identical columns give 1."""
    w = w / w.sum(axis=1, keepdims=True)
    ma, mb = w @ a, w @ b
    va = np.maximum(w @ a**2 - ma**2, 0.0)
    vb = np.maximum(w @ b**2 - mb**2, 0.0)
    cov = w @ (a * b) - ma * mb
    den = va + vb + (ma - mb) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, 2.0 * cov / den, 0.0)
    same = np.all(a == b, axis=0)  # identical columns agree perfectly, also when constant
    return np.where(same[None, :], 1.0, out)


def median_ccc_replicates(a: np.ndarray, b: np.ndarray, counts: np.ndarray) -> tuple[float, np.ndarray, int]:
    """``(median CCC on the data, (B,) replicates, features used)`` of :func:`median_ccc` (NaN below 2 patients)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"median_ccc needs two (patients, features) arrays of one shape, got {a.shape}, {b.shape}"
        )
    if a.shape[0] != counts.shape[1]:
        raise ValueError(f"{a.shape[0]} patients but the resampling matrix has {counts.shape[1]}")
    cols = np.all(np.isfinite(a) & np.isfinite(b), axis=0)
    a, b = a[:, cols], b[:, cols]
    if a.shape[0] < 2 or a.shape[1] == 0:
        return float("nan"), np.full(counts.shape[0], np.nan), int(a.shape[1])
    # centred per feature (CCC is shift-invariant when both are shifted alike) so the moments keep their digits
    centre = a.mean(axis=0)
    a, b = a - centre, b - centre
    stat = float(np.median(_ccc_columns(a, b, np.ones((1, a.shape[0])))[0]))
    reps = np.median(_ccc_columns(a, b, counts.astype(np.float64)), axis=1)
    reps[np.count_nonzero(counts, axis=1) < 2] = np.nan  # one distinct patient: no spread to agree on
    return stat, reps, int(a.shape[1])


def median_ccc(a: np.ndarray, b: np.ndarray, counts: np.ndarray, level: float = LEVEL) -> Estimate:
    """Median over features of Lin's CCC between ``a`` and ``b`` across patients, with its bootstrap interval.

    Args:
        a, b: ``(P, F)`` one feature vector per patient (method output and reference scan); features with a
            non-finite value are left out. ``n`` of the result counts the features used.
        counts: :func:`resample_counts` ``(B, P)``; a replicate is the CCC of the patients it draws, each
            weighted by how often it was drawn.
    """
    stat, reps, n_feat = median_ccc_replicates(a, b, counts)
    return Estimate(stat, *_interval(reps, level), n_feat, int(np.asarray(a).shape[0]))


def cluster_statistic(
    values: Sequence[float] | np.ndarray,
    patients: Sequence[int] | np.ndarray,
    counts: np.ndarray,
    statistic,
    level: float = LEVEL,
) -> Estimate:
    """Any statistic of the rows (``statistic(values) -> float``, e.g. an SD or a percentile) and its
    patient-bootstrap interval: each replicate repeats every row of a patient as often as the patient is drawn."""
    v, g = _finite_rows(values, patients)
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0)
    if g.min() < 0 or g.max() >= counts.shape[1]:
        raise ValueError(f"patient indices must lie in [0, {counts.shape[1]}), got [{g.min()}, {g.max()}]")
    reps = np.array(
        [statistic(np.repeat(v, c[g])) if c[g].sum() else np.nan for c in counts], dtype=np.float64
    )
    lo, hi = _interval(reps, level)
    return Estimate(float(statistic(v)), lo, hi, int(v.size), int(np.unique(g).size))


def mean_estimate(
    parts: Sequence[tuple[float, np.ndarray]], n: int, n_patients: int, level: float = LEVEL
) -> Estimate:
    """The mean of several statistics (``(value, (B,) replicates)`` each, from the same resampling matrix) with
    the interval of the mean replicate (e.g. a texture CCC averaged over protocols or samples)."""
    if not parts:
        raise ValueError("mean_estimate needs at least one statistic")
    value = float(np.mean([p[0] for p in parts]))
    reps = np.mean(np.stack([p[1] for p in parts]), axis=0)
    return Estimate(value, *_interval(reps, level), n, n_patients)
