"""The content prior: how popular an item is likely to be, from its content alone.

Without events an item's behaviour features are zero, so every cold item got the same
bias and only a returning user's content similarity told them apart. The content prior
is a closed-form ridge regression, fitted once per version, from an item's content to
how popular the warm items (those with events) became, offset by ``q`` (the largest of
the warm items' fitted values) so that it orders items without events among themselves
but does not lift them above the bias such an item had before (0)::

    target_i = log(1 + positives of item i, halved every PRIOR_HALF_LIFE days)
    x_i      = [ z(normalise(v_i)) / sqrt(d),  z(a_i) / sqrt(fa) ]
    prior_i  = x_i . w - q,  w = argmin |X w - (t - mean t)|^2 + lam |w|^2

``z`` standardises every column over the warm items and each block (the semantic
vector, the attribute features) is scaled to the same total variance: the two blocks'
raw scales differ by an order of magnitude, and concatenated unscaled the larger one
drowns the other (measured in issue 22). ``lam`` is chosen on a log grid by exact
error on a seeded fifth of the warm items held out. Standardisation folds into the
weights, so the prior is ``b + normalise(V) @ wv + A @ wa``: any item that is encoded
gets it, including items added after the version was built.

In the score the prior enters the item bias with a weight ``beta`` and shrinks away as
the item's own events accrue: ``beta * prior_i * k / (n_i + k)`` with ``n_i`` the
item's positives so far (:meth:`dynstore.model.fusion.FusionModel.dynamic_bias`), so a new item
is ranked by what its content predicts and a warm one by its own counts.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> V = rng.normal(size=(200, 8)); A = rng.normal(size=(200, 2))
>>> target = np.log1p(np.exp(V[:, 0] + 0.1 * rng.normal(size=200)))
>>> p = ContentPrior.fit(V, A, target, np.arange(200) < 150)
>>> r = np.corrcoef(p.values(V, A)[150:], target[150:])[0, 1]   # items the fit never saw (centred)
>>> bool(r > 0.9)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynstore.model.histories import normalise
from dynstore.lazy import attempt_import

__all__ = ["ContentPrior", "PRIOR_HALF_LIFE", "ridge", "decayed_positives"]

#: half-life (days) of the positives the prior learns to predict: long, so it learns
#: what kind of item is liked, not last week's spike
PRIOR_HALF_LIFE = 365.0

#: ridge penalties tried (per unit of the standardised blocks)
LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0)

#: the prior is offset so that this quantile of the warm items' fitted values is 0 (1: the largest)
TOP_SHARE = 1.0

#: warm items the fit uses at most (a seeded sample above): the solve stays cheap
MAX_FIT_ITEMS = 100_000


def decayed_positives(item: np.ndarray, ts: np.ndarray, label: np.ndarray, n_items: int,
                      half_life_days: float = PRIOR_HALF_LIFE) -> np.ndarray:
    """``float64 [n_items]``: each item's positives, halved every ``half_life_days``
    before the newest event.

    >>> decayed_positives(np.array([0, 0, 1]), np.array([0, 86400, 86400]), np.array([1, 1, 1]), 2, 1.0).tolist()
    [1.5, 1.0]
    """
    pos = np.asarray(label) == 1
    ts = np.asarray(ts, np.float64)
    if not pos.any():
        return np.zeros(n_items)
    age = (ts.max() - ts[pos]) / 86400.0
    return np.bincount(np.asarray(item, np.int64)[pos], weights=np.power(0.5, age / half_life_days),
                       minlength=n_items).astype(np.float64)


def ridge(X: np.ndarray, y: np.ndarray, lams=LAMBDAS, seed: int = 0) -> tuple[np.ndarray, float, dict]:
    """Ridge regression of ``y`` on the (centred) columns of ``X`` in closed form, the
    penalty chosen among ``lams`` on a seeded fifth of the rows held out.

    Returns ``(w, lam, err)``: the weights (``X`` and ``y`` are centred inside; predict
    with ``mean(y) + (x - mean(X)) @ w``), the chosen penalty and the held-out mean
    squared error of each penalty. Costs two ``p x p`` Gram matrices and a ``p x p``
    solve per penalty (``p``: the columns, a few hundred).

    >>> X = np.array([[0.0], [1.0], [2.0], [3.0]]); y = 2 * X[:, 0]
    >>> w, lam, _ = ridge(X, y, lams=(1e-9,))
    >>> np.round(w, 6).tolist()
    [2.0]
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    err: dict = {}
    lams = tuple(lams)
    best = lams[0]
    if len(lams) > 1 and len(y) >= 10:
        val = np.random.default_rng(seed).random(len(y)) < 0.2
        w_of = _solver(X[~val], y[~val])
        mu_x, mu_y = X[~val].mean(0), y[~val].mean()
        for lam in lams:
            err[lam] = float(np.mean((mu_y + (X[val] - mu_x) @ w_of(lam) - y[val]) ** 2))
        best = min(lams, key=lambda lam: err[lam])
    return _solver(X, y)(best), float(best), err


def _solver(X: np.ndarray, y: np.ndarray):
    """``lam -> w``: the ridge weights of the centred ``X``, ``y`` for any penalty."""
    torch = attempt_import("torch")
    Xc = X - X.mean(0)
    G, b = Xc.T @ Xc, Xc.T @ (y - y.mean())
    # torch's solver: numpy's multi-threaded BLAS is slow on small systems of a busy machine
    Gt, bt = torch.from_numpy(G), torch.from_numpy(b[:, None])
    eye = torch.eye(G.shape[0], dtype=torch.float64)
    return lambda lam: torch.linalg.solve(Gt + lam * eye, bt)[:, 0].numpy()


@dataclass
class ContentPrior:
    """``prior = b + normalise(V) @ wv + A @ wa`` (see the module docstring)."""

    wv: np.ndarray  # float32 [d]
    wa: np.ndarray  # float32 [fa]
    b: float
    lam: float = 0.0
    n_fit: int = 0

    @classmethod
    def fit(cls, V: np.ndarray, A: np.ndarray, target: np.ndarray, warm: np.ndarray,
            *, lams=LAMBDAS, seed: int = 0) -> "ContentPrior":
        """Ridge from the standardised blocks ``[normalise(V), A]`` of the ``warm`` items
        (a boolean mask) to their ``target``, offset so that the ``TOP_SHARE`` quantile
        of the warm items' fitted values is 0; with fewer than 3 warm items, 0."""
        V = normalise(np.asarray(V, np.float32))
        A = np.asarray(A, np.float32).reshape(V.shape[0], -1)
        rows = np.flatnonzero(np.asarray(warm, bool))
        t = np.asarray(target, np.float64)
        if rows.size > MAX_FIT_ITEMS:
            rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_FIT_ITEMS, replace=False))
        if rows.size < 3:
            b = 0.0
            return cls(np.zeros(V.shape[1], np.float32), np.zeros(A.shape[1], np.float32), b, 0.0, int(rows.size))
        blocks, scales = [], []
        for M in (V[rows], A[rows]):
            M = M.astype(np.float64)
            mu, sd = M.mean(0), M.std(0)
            sd = np.where(sd > 1e-12, sd, np.inf)  # a constant column carries nothing
            scale = 1.0 / (sd * np.sqrt(max(M.shape[1], 1)))
            blocks.append((M - mu) * scale)
            scales.append((mu, scale))
        X = np.concatenate(blocks, axis=1)
        w, lam, _ = ridge(X, t[rows], lams, seed)
        d = V.shape[1]
        (mv, sv), (ma, sa) = scales
        wv, wa = w[:d] * sv, w[d:] * sa
        # offset so that the highest fitted value of a warm item is 0, the bias an item
        # without events had before: cold items are ordered among themselves by what
        # their content predicts but not lifted above warm ones (centred on the mean, the
        # lift cost new users' lists 0.004 NDCG@10 on MovieLens' rolling cuts)
        fitted = V[rows] @ wv + A[rows] @ wa
        b = float(-np.quantile(fitted, TOP_SHARE))
        return cls(wv.astype(np.float32), wa.astype(np.float32), b, lam, int(rows.size))

    def values(self, V: np.ndarray, A: np.ndarray) -> np.ndarray:
        """``float32 [n]``: the prior of each item (rows of ``V`` and ``A``)."""
        V = normalise(np.asarray(V, np.float32))
        A = np.asarray(A, np.float32).reshape(V.shape[0], -1)
        return (self.b + V @ self.wv + A @ self.wa).astype(np.float32)

    def tensors(self, prefix: str = "cp_") -> dict[str, np.ndarray]:
        return {f"{prefix}wv": self.wv.astype(np.float32), f"{prefix}wa": self.wa.astype(np.float32),
                f"{prefix}b": np.array([self.b], np.float32)}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str = "cp_") -> "ContentPrior | None":
        if f"{prefix}wv" not in tensors:
            return None
        return cls(np.asarray(tensors[f"{prefix}wv"], np.float32), np.asarray(tensors[f"{prefix}wa"], np.float32),
                   float(np.ravel(tensors[f"{prefix}b"])[0]))
