"""The single-user int8 scan (issue 14): fbgemm's int8 product of a user vector with
every item, with a rigorous bound, so the prefilter keeps every possible top-k item."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dynstore.serving import precision as P

pytestmark = pytest.mark.skipif(P.quant_matrix(np.ones((2, 4), np.float32)) is None,
                                reason="torch without fbgemm's int8 kernel (the float16 scan serves there)")


def _exact(W, x):
    """The score as float64 sees it and as the float32 serving path computes it."""
    return W.astype(np.float64) @ x.astype(np.float64), W @ x


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 300), d=st.integers(1, 70), seed=st.integers(0, 2 ** 31),
       scale=st.sampled_from([1e-6, 1e-2, 1.0, 37.0, 1e4]), outliers=st.booleans(),
       sparse_x=st.booleans())
def test_bound_holds(n, d, seed, scale, outliers, sparse_x):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((n, d)) * scale).astype(np.float32)
    if outliers:  # a few huge entries and an all-zero row: the per-row scales must cope
        W[rng.integers(0, n, 3), rng.integers(0, d, 3)] *= 500.0
        W[0] = 0.0
    x = rng.standard_normal(d).astype(np.float32) * np.float32(rng.choice([1e-3, 1.0, 50.0]))
    if sparse_x:
        x[rng.random(d) < 0.7] = 0.0
    qm = P.quant_matrix(W)
    y, tol = P.quant_scan(qm, x)
    e64, e32 = _exact(W, x)
    assert y.shape == (n,) and y.dtype == np.float32
    assert np.all(np.abs(y - e64) <= tol)
    assert np.all(np.abs(y - e32) <= tol)


def test_bound_is_tight_enough_to_prefilter():
    """Isotropic random vectors (the hardest case: no popularity term, no clusters) keep
    about a hundred of 20,000 rows; the demo's MiniLM store keeps about 11 for k = 10."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((20_000, 384)).astype(np.float32)
    x = rng.standard_normal(384).astype(np.float32)
    y, tol = P.quant_scan(P.quant_matrix(W), x)
    exact = W @ x
    assert 0 < tol.max() < exact.std()
    L = np.sort(y - tol)[-10]
    kept = np.flatnonzero(y + tol >= L)
    assert set(np.argsort(-exact)[:10]) <= set(kept)
    assert 10 <= kept.size < 300
    # and the codes are really int8: the scan is not the float32 product in disguise
    assert np.abs(y - exact).max() > 1e-4 * np.abs(exact).max()


def test_not_finite_or_empty_matrix_is_refused():
    W = np.ones((3, 4), np.float32)
    W[1, 2] = np.nan
    assert P.quant_matrix(W) is None
    assert P.quant_matrix(np.zeros((0, 4), np.float32)) is None


def test_weight_codes_stay_within_seven_bits():
    """fbgemm's AVX2 kernel adds pairs of uint8 x int8 products in int16: codes beyond
    +-63 could saturate it silently, so the matrix is quantized to 7 bits. The worst case
    -- every weight at its largest code, every activation at 255 -- still scans right."""
    W = np.full((40, 64), 0.5, np.float32)
    W[::2] *= -1.0
    x = np.full(64, 3.0, np.float32)  # all at the top of the grid: codes of 255
    y, tol = P.quant_scan(P.quant_matrix(W), x)
    exact = W.astype(np.float64) @ x
    assert np.all(np.abs(y - exact) <= tol)
    np.testing.assert_allclose(y, exact, rtol=1e-5)  # saturation would lose ~half of each sum
    assert P.INT8_MAX_CODE == 63 and 2 * 255 * P.INT8_MAX_CODE < 2 ** 15


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.sampled_from([100, 5_000, 70_001]),
       st.sampled_from([0.0, 0.3]))
def test_kth_largest_bound_never_exceeds_the_kth_largest(seed, k, n, masked):
    """The prefilter's threshold is at most the k-th largest lower bound (so no row of
    the exact top-k is dropped), with -inf (seen items) and ties in the values; on a large
    catalogue with the top rows spread out it is the k-th largest itself."""
    from dynstore.serving.recommend import _kth_largest_bound

    rng = np.random.default_rng(seed)
    v = rng.standard_normal(n).astype(np.float32)
    if rng.random() < 0.3:
        v = np.round(v, 1)  # many ties
    v[rng.random(n) < masked] = -np.inf
    k = min(k, n)
    true = float(np.sort(v)[n - k])
    got = _kth_largest_bound(v, k)
    assert got <= true
    if n >= 16 * k * 64 and np.isfinite(true) and masked == 0.0:
        assert got >= float(np.sort(v)[n - 4 * k])  # tight: not a bound from far below


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 10, 79]), st.sampled_from([300, 20_000, 70_001]),
       st.booleans(), st.sampled_from([0.0, 0.01, 0.5]))
def test_candidates_are_the_rows_that_reach_the_kth_lower_bound(seed, k, n, clustered, seen):
    """The prefilter's rows are exactly those whose upper bound reaches the k-th largest
    lower bound -- however the best rows cluster (a catalogue whose newest rows lead) --
    and they hold the exact top-k of any scores within the bounds; seen rows (B = -inf)
    never come back."""
    from dynstore.serving.recommend import _candidates, _score_bounds

    rng = np.random.default_rng(seed)
    y = rng.standard_normal(n).astype(np.float32)
    if clustered:
        y = np.sort(y)  # the k best rows side by side, in the last blocks
    tol = (rng.random(n) * 0.05).astype(np.float32)
    B = (rng.standard_normal(n) * 0.1).astype(np.float32)
    B[rng.random(n) < seen] = -np.inf
    lo, hi = _score_bounds(y, tol, B)
    assert np.all(lo[np.isfinite(B)] <= (y + B)[np.isfinite(B)])
    ok = np.isfinite(B)
    if ok.sum() < k:
        assert _candidates(lo, hi, k) is None
        return
    L = np.sort(lo)[n - k]
    want = np.flatnonzero(hi >= L)
    got = _candidates(lo, hi, k)
    assert got.tolist() == want.tolist()
    assert not np.isin(np.flatnonzero(~ok), got).any()
    exact = np.where(ok, y.astype(np.float64) + B + (rng.random(n) * 2 - 1) * tol, -np.inf)
    assert set(np.argsort(-exact, kind="stable")[:k]) <= set(got.tolist())
