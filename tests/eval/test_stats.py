"""Patient-level bootstrap: oracles (means, a constant, the CCC of :mod:`medfusion.eval.image`), seeding, coverage."""

from __future__ import annotations

import numpy as np
import pytest

from medfusion.eval import stats as S
from medfusion.eval.image import ccc


def test_resample_counts_shape_total_and_seed():
    c = S.resample_counts(7, 50, seed=3)
    assert c.shape == (50, 7) and np.all(c.sum(axis=1) == 7)
    np.testing.assert_array_equal(c, S.resample_counts(7, 50, seed=3))
    assert not np.array_equal(c, S.resample_counts(7, 50, seed=4))
    with pytest.raises(ValueError, match="patient"):
        S.resample_counts(0, 10, 0)


def test_cluster_mean_is_the_row_mean_and_resamples_whole_patients():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(10), 3)  # three rows (protocols) per patient
    values = rng.normal(5.0, 1.0, 30) + np.repeat(rng.normal(0, 2.0, 10), 3)
    counts = S.resample_counts(10, 2000, seed=0)
    est = S.cluster_mean(values, patients, counts)
    assert est.mean == pytest.approx(values.mean()) and est.n == 30 and est.n_patients == 10
    assert est.low < est.mean < est.high
    # oracle: a replicate is the mean of the rows of the drawn patients, with repeats
    idx = np.repeat(np.arange(10), counts[0])
    rows = np.concatenate([values[patients == p] for p in idx])
    reps = (counts @ np.bincount(patients, weights=values)) / (counts @ np.bincount(patients))
    assert reps[0] == pytest.approx(rows.mean())
    assert (est.low, est.high) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])))
    # rows of one patient move together: the interval is wider than an i.i.d.-rows bootstrap would make it
    iid = S.cluster_mean(values, np.arange(30), S.resample_counts(30, 2000, seed=0))
    assert est.high - est.low > iid.high - iid.low


def test_cluster_mean_constant_nan_and_bad_input():
    counts = S.resample_counts(4, 100, seed=1)
    est = S.cluster_mean([2.0, 2.0, 2.0, 2.0, np.nan], [0, 1, 2, 3, 3], counts)
    assert est == S.Estimate(2.0, 2.0, 2.0, 4, 4)
    empty = S.cluster_mean([np.nan], [0], counts)
    assert np.isnan(empty.mean) and empty.n == 0
    with pytest.raises(ValueError, match="patient indices"):
        S.cluster_mean([1.0], [4], counts)


def test_coverage_of_the_interval_is_near_nominal():
    """Patients drawn from a known population: the 95% interval holds the true mean in about 95% of studies."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(200):
        vals = rng.normal(0.0, 1.0, 30)
        est = S.cluster_mean(vals, np.arange(30), S.resample_counts(30, 400, seed=int(rng.integers(1 << 30))))
        hits += est.low <= 0.0 <= est.high
    assert 0.88 <= hits / 200 <= 0.99


def test_median_ccc_matches_image_ccc_and_has_an_interval():
    rng = np.random.default_rng(2)
    a = rng.normal(0, 1, (12, 5))
    b = a + rng.normal(0, 0.5, (12, 5))
    counts = S.resample_counts(12, 500, seed=0)
    est = S.median_ccc(a, b, counts)
    assert est.mean == pytest.approx(np.median([ccc(a[:, f], b[:, f]) for f in range(5)]))
    assert est.low <= est.mean <= est.high and est.n == 5 and est.n_patients == 12
    assert S.median_ccc(a, a, counts) == S.Estimate(1.0, 1.0, 1.0, 5, 12)
    few = S.median_ccc(a[:1], b[:1], S.resample_counts(1, 10, 0))
    assert np.isnan(few.mean)
    # a mean of statistics from the same replicates
    s1, r1, _ = S.median_ccc_replicates(a, b, counts)
    s2, r2, _ = S.median_ccc_replicates(a, a, counts)
    m = S.mean_estimate([(s1, r1), (s2, r2)], 5, 12)
    assert m.mean == pytest.approx((s1 + 1.0) / 2) and m.low <= m.mean <= m.high
