"""The baselines a user would actually deploy, for ``bench_quality.py``.

Every ``fit_*`` takes the training events of a :class:`bench_quality.Split` and returns
a scorer ``users -> scores [len(users), n_items]`` (higher is better; the benchmark
removes each user's training positives before ranking).

* :func:`fit_recent_popularity` -- positives per item in the last ``window_days`` before
  the end of training (``None`` = all time), ties broken by all-time positives. On
  temporal splits this is the rule to beat: what was liked lately is liked next.
* :func:`fit_ease` -- EASE (Steck 2019), the closed-form item-item model, on the binary
  user x item matrix of training positives; users without a training positive get
  recent popularity (EASE has nothing to say about them).
* :func:`fit_lightfm` -- LightFM with WARP loss and the user and item attributes as
  features (strings one-hot / multi-hot, numerics and timestamps in quantile buckets)
  beside identity features, so cold items and new users are scored from attributes.

Hyper-parameters (window, lambda, LightFM's size and epochs) are chosen by the
benchmark on its validation slice, never on the test period.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Scorer = Callable[[np.ndarray], np.ndarray]

DAY = 86400
POPULARITY_WINDOWS: list[float | None] = [7, 14, 30, 60, 90, 180, 365, None]
EASE_LAMBDAS = [10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0]
LIGHTFM_GRID = [
    {"no_components": c, "epochs": e} for c in (32, 64) for e in (10, 30)
]


def recent_counts(item: np.ndarray, ts: np.ndarray, label: np.ndarray, n_items: int,
                  window_days: float | None) -> np.ndarray:
    """Positives per item in the ``window_days`` before the newest event, plus a
    tie-break by all-time positives (smaller than one recent positive)."""
    pos = label == 1
    total = np.bincount(item[pos], minlength=n_items).astype(np.float64)
    if window_days is None:
        return total
    end = ts.max(initial=0)
    recent = pos & (ts > end - window_days * DAY)
    counts = np.bincount(item[recent], minlength=n_items).astype(np.float64)
    return counts + total / (total.max(initial=0) + 1.0)


def fit_recent_popularity(split, n_items: int, window_days: float | None = 30) -> Scorer:
    score = recent_counts(split.item, split.ts, split.label, n_items, window_days)
    return lambda users: np.broadcast_to(score, (len(users), n_items))


def fit_ease(split, n_items: int, lam: float = 500.0,
             window_days: float | None = 30) -> Scorer:
    """EASE on training positives; new users get recent popularity (``window_days``)."""
    import scipy.sparse as sp

    pu, pi = split.positives()
    n_users = int(max(pu.max(initial=0), split.test_user.max(initial=0))) + 1
    warm = np.unique(pi)  # items without a positive have an all-zero column: leave them out
    col = np.full(n_items, -1, np.int64)
    col[warm] = np.arange(warm.size)
    X = sp.csr_matrix((np.ones(pu.size, np.float64), (pu, col[pi])), shape=(n_users, warm.size))
    X.sum_duplicates()
    X.data[:] = 1.0
    G = (X.T @ X).toarray()
    G[np.diag_indices_from(G)] += lam
    P = np.linalg.inv(G)
    B = P / (-np.diag(P))
    B[np.diag_indices_from(B)] = 0.0
    B = B.astype(np.float32)
    has_hist = np.asarray(X.sum(axis=1)).ravel() > 0
    pop = recent_counts(split.item, split.ts, split.label, n_items, window_days)

    def score(users):
        users = np.asarray(users)
        S = np.broadcast_to(pop, (len(users), n_items)).astype(np.float32).copy()
        ret = has_hist[users]
        if ret.any():
            Xu = X[users[ret]].toarray().astype(np.float32)
            sw = Xu @ B
            # returning users: EASE over warm items; items without positives last
            S[ret] = -1e9
            S[np.ix_(np.flatnonzero(ret), warm)] = sw
        return S

    return score


@dataclass
class Columns:
    """Which attribute columns LightFM gets, by kind (``multi``: '|'-separated lists)."""

    categorical: tuple[str, ...] = ()
    multi: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()  # numbers and timestamps, in quantile buckets


def indicator_features(frame, cols: Columns, n_rows: int, buckets: int = 10):
    """Identity plus attribute indicators, each row normalised to sum 1 (LightFM's
    convention), as a CSR matrix ``[n_rows, n_rows + n_attribute_values]``."""
    import polars as pl
    import scipy.sparse as sp

    rows, cols_, names = [np.arange(n_rows)], [np.arange(n_rows)], n_rows
    if frame is not None:
        assert frame.height == n_rows
        for c in cols.categorical:
            v = frame[c].cast(pl.String).fill_null("<null>").to_list()
            vocab = {x: n for n, x in enumerate(sorted(set(v)))}
            rows.append(np.arange(n_rows))
            cols_.append(names + np.array([vocab[x] for x in v]))
            names += len(vocab)
        for c in cols.multi:
            parts = [[t.strip() for t in (x or "").split("|") if t.strip()] for x in frame[c].to_list()]
            vocab = {x: n for n, x in enumerate(sorted({t for p in parts for t in p}))}
            r = [i for i, p in enumerate(parts) for _ in p]
            k = [vocab[t] for p in parts for t in p]
            rows.append(np.array(r, np.int64))
            cols_.append(names + np.array(k, np.int64))
            names += len(vocab)
        for c in cols.numeric:
            s = frame[c]
            if s.dtype.is_temporal():
                s = s.cast(pl.Datetime("us")).cast(pl.Int64)
            x = s.cast(pl.Float64).to_numpy()
            ok = np.isfinite(x)
            edges = np.unique(np.quantile(x[ok], np.linspace(0, 1, buckets + 1)[1:-1])) if ok.any() else []
            b = np.where(ok, np.searchsorted(edges, np.where(ok, x, 0), side="right"), len(edges) + 1)
            rows.append(np.arange(n_rows))
            cols_.append(names + b)
            names += len(edges) + 2
    r = np.concatenate(rows)
    c = np.concatenate(cols_)
    M = sp.csr_matrix((np.ones(r.size, np.float32), (r, c)), shape=(n_rows, names))
    M.sum_duplicates()
    M.data[:] = 1.0
    norm = np.asarray(M.sum(axis=1)).ravel()
    return sp.diags(1.0 / np.maximum(norm, 1.0)).astype(np.float32) @ M


def fit_lightfm(split, n_items: int, n_users: int, item_features, user_features,
                no_components: int = 64, epochs: int = 30, seed: int = 0) -> Scorer:
    """LightFM (WARP) on training positives with identity + attribute features."""
    import scipy.sparse as sp
    from lightfm import LightFM

    pu, pi = split.positives()
    M = sp.coo_matrix((np.ones(pu.size, np.float32), (pu, pi)), shape=(n_users, n_items)).tocsr()
    M.sum_duplicates()
    M.data[:] = 1.0
    model = LightFM(loss="warp", no_components=no_components, learning_rate=0.05,
                    random_state=np.random.RandomState(seed))
    model.fit(M.tocoo(), user_features=user_features, item_features=item_features,
              epochs=epochs, num_threads=2)
    ib, ie = model.get_item_representations(item_features)
    ub, ue = model.get_user_representations(user_features)

    def score(users):
        users = np.asarray(users)
        return (ue[users] @ ie.T + ib[None, :] + ub[users, None]).astype(np.float32)

    return score
