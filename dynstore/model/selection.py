"""Choosing the closed-form terms' weights with power: pooled forward-chained cuts.

One holdout of a few dozen users cannot show a 10 % gain (the paired standard error of
NDCG@10 per user is 0.02-0.03). So each weight is judged on several *forward-chained
cuts* pooled together: the newest events after the training data (the fit's holdout)
and ``CUT_FRACTIONS`` earlier cuts inside the training data -- each one trains the
closed-form terms on the events before it and tests on the events from it to the next
cut. Every user-period is one paired observation; the gain of a weight is the mean
per-user NDCG@10 difference against the weight 0, with its standard error and the
number of user-periods that judged it.

Each term is judged on the users it affects:

* the item-item weight ``gamma`` (:mod:`dynstore.model.itemitem`) on *returning* users (a
  positive before the cut) -- new users have no co-occurrence to use; its grid is
  ``GAMMA_STEPS`` times a calibration that puts the item-item scores on the scale of the
  rest of the score (the spread of the top-10 logits of the model without it), tried
  with each history half-life of ``RECENCIES`` (:func:`choose_gamma`);
* the content prior's weight ``beta`` (:mod:`dynstore.model.prior`) on *cold* items (no event
  before the cut; ranked among themselves), provided the ranking of all items loses no
  more than one standard error.

A weight other than 0 is kept only when its pooled gain exceeds ``z`` standard errors.
The learned parts of the model (trained on all the training data) are the same in
every arm, so the comparison is about the closed-form term alone; the terms themselves
are refitted on each cut's past only (an item-item fit on each cut keeps at most
``CUT_MAX_ITEMS`` items: the cost of the solve grows with their cube).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from dynstore.model.evaluation import holdout_positives, positives_log, seen_positives
from dynstore.model.histories import build_histories
from dynstore.model.itemitem import ItemItem
from dynstore.model.metrics import ndcg_per_user, top_k
from dynstore.model.spec import TrainingData
from dynstore.model.prior import PRIOR_HALF_LIFE, ContentPrior, decayed_positives
from dynstore.model.userknn import Pool

__all__ = ["Cut", "forward_cuts", "fit_closed_form", "choose_terms", "GAMMA_STEPS", "DELTA_STEPS", "RECENCIES", "BETAS", "pooled"]

#: earlier cuts, as quantiles of the training events' times
CUT_FRACTIONS = (0.6, 0.7, 0.8, 0.9)
#: item-item weights tried, in units of the calibration (0 is always tried)
GAMMA_STEPS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
#: half-lives (in positives, most recent first) of the item-item term's history weights
#: tried with every ``gamma``; 0 weighs the whole history alike
RECENCIES = (0.0, 50.0)
#: a history half-life whose best gain is within one standard error of the largest is
#: preferred, the shortest first: as good on the cuts, and new likes move the list more
#: (docs/model.md, "Can the kNN gain be kept without losing the online effect?")
RECENCY_TIE = True
#: user-kNN weights tried, in units of the calibration (0 is always tried)
DELTA_STEPS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
#: content prior weights tried (0 is always tried)
BETAS = (0.25, 0.5, 1.0, 2.0)
#: items an item-item fit on a cut keeps at most
CUT_MAX_ITEMS = 1500
#: holdout users a cut judges at most (a seeded sample above)
MAX_CUT_USERS = 1000
#: the item-item model's ridge penalty and its pull toward the text similarity
LAM, MU = 250.0, 250.0


@dataclass
class Cut:
    """One forward-chained period: the events before it and the positives after."""

    train: TrainingData
    holdout: tuple  # (user, item, label)


def forward_cuts(data: TrainingData, holdout: tuple, fractions=CUT_FRACTIONS) -> list[Cut]:
    """The fit's own (``data``, ``holdout``) and the earlier cuts inside ``data``."""
    cuts = []
    ts = np.asarray(data.ts)
    if ts.size:
        bounds = sorted({int(np.quantile(ts, f, method="lower")) for f in fractions})
        edges = bounds + [int(ts.max()) + 1]
        for a, b in zip(edges[:-1], edges[1:]):
            before, after = ts < a, (ts >= a) & (ts < b)
            if before.any() and (data.label[after] == 1).any():
                cuts.append(Cut(sub(data, before), (data.user[after], data.item[after], data.label[after])))
    cuts.append(Cut(data, tuple(np.asarray(x) for x in holdout)))
    return cuts


def sub(data: TrainingData, rows: np.ndarray) -> TrainingData:
    """``data`` restricted to the events ``rows`` (a mask)."""
    return TrainingData(V=data.V, A=data.A, UA=data.UA, user=data.user[rows], item=data.item[rows],
                        ts=data.ts[rows], label=data.label[rows], UK=data.UK)


def fit_closed_form(model: Any, data: TrainingData, *, max_items: int | None = None) -> None:
    """Fit ``model``'s closed-form terms on ``data``: the content prior (when the model
    has a weight for it) and the text-regularised item-item model."""
    n = data.V.shape[0]
    if "beta" in model.params:
        target = np.log1p(decayed_positives(data.item, data.ts, data.label, n, PRIOR_HALF_LIFE))
        warm = np.bincount(data.item, minlength=n) > 0
        model.prior = ContentPrior.fit(data.V, data.A, target, warm, seed=model.config.seed)
        model.prior_item = model.prior.values(data.V, data.A)
    if model.config.item_item:
        # binary X, as the EASE peer's: weighting each cell by its age (the training's
        # time decay) cost returning users 9 % on Complete Journey and 43 % of the item-item
        # term's own NDCG on MovieLens (docs/model.md); recency enters through the users'
        # histories instead (ItemItem.scores)
        pos = data.label == 1
        model.item_item = ItemItem.fit(data.user[pos], data.item[pos], n, lam=LAM, mu=MU, V=data.V,
                                       **({} if max_items is None else {"max_items": max_items}))


@contextmanager
def closed_form_of(model: Any, data: TrainingData) -> Iterator[None]:
    """``model`` with its closed-form terms fitted on ``data`` (a cut's past), restored after."""
    saved = (model.prior, model.prior_item, model.item_item)
    try:
        fit_closed_form(model, data, max_items=CUT_MAX_ITEMS)
        yield
    finally:
        model.prior, model.prior_item, model.item_item = saved


@contextmanager
def weights(model: Any, **values: float) -> Iterator[None]:
    """``model.params[name] = value`` for each keyword while inside, restored after."""
    saved = {k: model.params[k].copy() for k in values}
    try:
        for k, v in values.items():
            model.params[k] = np.array([v], np.float32)
        yield
    finally:
        model.params.update(saved)


@dataclass
class Parts:
    """A cut's score split into the part without the closed-form terms and the terms at
    weight 1, for the users it judges: ``S = base + gamma * ii + beta * prior``."""

    users: np.ndarray      # the holdout users with a positive
    base: np.ndarray       # [users, items]
    ii: dict               # recency half-life -> [users, items] item-item scores at weight 1
    prior: np.ndarray | float  # [items]: the prior after shrinkage
    relevant: list         # holdout positives of each user
    seen: list             # training positives of each user (never recommended again)
    returning: np.ndarray  # bool per user: a positive before the cut
    cold: np.ndarray       # bool per item: no event before the cut


def parts(model: Any, cut: Cut) -> Parts:
    """The pieces of ``model``'s score on ``cut`` (with its closed-form terms as fitted)."""
    train = cut.train
    n = train.V.shape[0]
    hu, hi = holdout_positives(*cut.holdout, None)
    users = np.unique(hu)
    if users.size > MAX_CUT_USERS:  # bounds the [users, items] matrices of a cut
        users = np.sort(np.random.default_rng(model.config.seed).choice(users, MAX_CUT_USERS, replace=False))
    order = np.argsort(hu, kind="stable")
    hu, hi = hu[order], hi[order]
    lo, up = np.searchsorted(hu, users, "left"), np.searchsorted(hu, users, "right")
    with weights(model, **{k: 0.0 for k in ("gamma", "beta") if k in model.params}):
        base = model.score(train, users) if users.size else np.zeros((0, n), np.float32)
    ii: dict = {}
    if model.item_item is not None and "gamma" in model.params:
        ptr, it, lab, ts = build_histories(users, train.user, train.item, train.label, train.ts)
        saved = model.config.item_item_recency
        try:
            for h in RECENCIES:
                model.config.item_item_recency = h
                with weights(model, gamma=1.0):
                    ii[h] = model.item_item_bias(ptr, it, lab, n, ts)
        finally:
            model.config.item_item_recency = saved
    prior: np.ndarray | float = 0.0
    if model.prior is not None and model.prior_item is not None:
        npos = np.bincount(train.item[train.label == 1], minlength=n).astype(np.float64)
        k = model.config.prior_k
        prior = (model.prior_item * (k / (npos + k))).astype(np.float32)
    pos_users = np.unique(train.user[train.label == 1])
    return Parts(users, base, ii, prior, [hi[a:b] for a, b in zip(lo, up)],
                 seen_positives(positives_log(train), users), np.isin(users, pos_users),
                 np.bincount(train.item, minlength=n) == 0)


def ndcg(p: Parts, gamma: float, beta: float, rows: np.ndarray, cold_only: bool = False,
         recency: float = 0.0) -> np.ndarray:
    """Per-user NDCG@10 of the users ``rows`` (a mask) at these weights (the item-item
    scores of history half-life ``recency``); ``cold_only``: ranked among the cold items,
    judged on their cold positives."""
    S = p.base[rows].copy()
    if gamma:
        S += gamma * p.ii[recency][rows]
    if beta:
        S += beta * p.prior[None, :]
    rel = [r for r, keep in zip(p.relevant, rows) if keep]
    seen = [x for x, keep in zip(p.seen, rows) if keep]
    if cold_only:
        S[:, ~p.cold] = -np.inf
        rel = [r[p.cold[r]] for r in rel]
    return ndcg_per_user(top_k(S, 10, seen), rel, 10)


def calibration(p: Parts, recency: float = 0.0) -> float:
    """The item-item scores' scale against the rest of the score: median over the
    returning users of the spread of the top-10 logits without the term, over that of the
    item-item scores (of history half-life ``recency``)."""
    rows = np.flatnonzero(p.returning)[:500]
    n = p.base.shape[1]
    if not rows.size or np.ndim(p.ii.get(recency)) != 2 or n <= 10:
        return 1.0

    def spread(M: np.ndarray) -> float:
        top = np.sort(np.partition(M, n - 10, axis=1)[:, n - 10:], axis=1)
        return float(np.median(top[:, -1] - top[:, 0]))

    s_ii = spread(p.ii[recency][rows])
    return spread(p.base[rows]) / s_ii if s_ii > 0 else 1.0


def pooled(diffs: list[np.ndarray]) -> tuple[float, float, int]:
    """Mean, standard error and count of the pooled per-user differences."""
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    if d.size < 2:
        return (float(d.mean()) if d.size else 0.0), float("nan"), int(d.size)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)), int(d.size)


def _num(x: float) -> float | None:
    return round(float(x), 5) if np.isfinite(x) else None


def report(grid: dict, chosen: float, z: float, cuts: int, **extra: Any) -> dict:
    """What a choice records: the chosen value, its gain over 0 with the standard error
    and the users (user-periods) that judged it, the cuts, and every value tried."""
    n = next(iter(grid.values()))[2] if grid else 0
    g = grid.get(chosen, (0.0, 0.0, n))
    tried = max(grid, key=lambda v: grid[v][0]) if grid else None
    return {"chosen": chosen, "gain": _num(g[0]), "se": _num(g[1]), "users": g[2], "cuts": cuts, "z": z,
            # with nothing chosen, the gain above is 0: the best value tried says how close it came
            "best_tried": None if tried is None else {"value": tried, "gain": _num(grid[tried][0]),
                                                      "se": _num(grid[tried][1])},
            "grid": {str(k): {"gain": _num(v[0]), "se": _num(v[1])} for k, v in grid.items()}, **extra}


def best(grid: dict, z: float) -> float:
    """The value with the largest gain among those clearly better than 0 (0 if none)."""
    fine = [v for v, (g, se, n) in grid.items() if n > 1 and np.isfinite(se) and g > z * se and g > 0]
    return max(fine, key=lambda v: (grid[v][0], -v)) if fine else 0.0


class Grid:
    """Per-user NDCG differences against weight 0, per value tried, pooled over cuts."""

    def __init__(self, values):
        self.diffs: dict = {v: [] for v in values}

    def add(self, value: float, d: np.ndarray) -> None:
        self.diffs[value].append(d)

    def pooled(self) -> dict:
        return {v: pooled(d) for v, d in self.diffs.items()}


def judge_cut(p: Parts, gammas: dict, betas: Grid, guard: Grid) -> None:
    """Add one cut's per-user differences: ``gamma`` (a :class:`Grid` per history
    half-life) on its returning users, ``beta`` on its cold items and, as a guard, on all
    items."""
    if p.ii and p.returning.any():
        base = ndcg(p, 0.0, 0.0, p.returning)
        for h, grid in gammas.items():
            for v in grid.diffs:
                grid.add(v, ndcg(p, v, 0.0, p.returning, recency=h) - base)
    if np.ndim(p.prior) == 1 and p.users.size:
        every = np.ones(p.users.size, bool)
        base_cold, base_all = ndcg(p, 0.0, 0.0, every, True), ndcg(p, 0.0, 0.0, every)
        for v in betas.diffs:
            betas.add(v, ndcg(p, 0.0, v, every, True) - base_cold)
            guard.add(v, ndcg(p, 0.0, v, every) - base_all)


def choose_terms(model: Any, data: TrainingData, holdout: tuple, z: float) -> dict:
    """Fit the closed-form terms on ``data`` and choose their weights on the pooled cuts
    (one cut's score matrices at a time); returns what each choice records (see
    :func:`report`): ``gamma`` on returning users, ``prior`` on cold items."""
    fit_closed_form(model, data)
    cuts = forward_cuts(data, holdout)
    last = parts(model, cuts[-1])  # the fit's own cut: its terms are the model's
    scale = {h: calibration(last, h) for h in RECENCIES}
    gammas = {h: Grid([round(scale[h] * s, 6) for s in GAMMA_STEPS]) for h in RECENCIES}
    betas, guard = Grid(BETAS), Grid(BETAS)
    judge_cut(last, gammas, betas, guard)
    del last
    fitted = []  # each earlier cut's closed-form terms, for the user-kNN pass
    for cut in cuts[:-1]:
        with closed_form_of(model, cut.train):
            judge_cut(parts(model, cut), gammas, betas, guard)
            fitted.append((model.prior, model.prior_item, model.item_item))
    out = {}
    if "gamma" in model.params and model.item_item is not None:
        out.update(choose_gamma(model, {h: g.pooled() for h, g in gammas.items()}, scale, z, len(cuts)))
    if "beta" in model.params and model.prior is not None:
        grid, g_all = betas.pooled(), guard.pooled()
        # cold items must not push warm ones out of the lists: on all items, no loss beyond
        # one standard error (stricter than the gain's z: the lists of every user are at stake)
        safe = {v: g for v, g in grid.items() if not (np.isfinite(g_all[v][1]) and g_all[v][0] < -g_all[v][1])}
        chosen = best(safe, z)
        model.params["beta"] = np.array([chosen], np.float32)
        g = g_all.get(chosen, (0.0, 0.0, 0))
        out["prior"] = report(grid, chosen, z, len(cuts), judged_on="cold items",
                              all_items={"gain": _num(g[0]), "se": _num(g[1]), "users": g[2]})
    if "delta" in model.params:
        out["user_knn"] = choose_delta(model, cuts, fitted, z)
    return out


def knn_parts(model: Any, cut: Cut) -> tuple[np.ndarray, np.ndarray, list, list, np.ndarray]:
    """``(base, knn, relevant, seen, returning)`` of a cut's returning users: the score with
    every other term at its chosen weight and the user-kNN term at weight 1 (neighbours:
    the cut's past)."""
    train = cut.train
    n = train.V.shape[0]
    hu, hi = holdout_positives(*cut.holdout, None)
    users = np.unique(hu)
    users = users[np.isin(users, train.user[train.label == 1])]  # returning users only
    if users.size > MAX_CUT_USERS:
        users = np.sort(np.random.default_rng(model.config.seed).choice(users, MAX_CUT_USERS, replace=False))
    order = np.argsort(hu, kind="stable")
    hu, hi = hu[order], hi[order]
    lo, up = np.searchsorted(hu, users, "left"), np.searchsorted(hu, users, "right")
    with weights(model, delta=0.0):
        base = model.score(train, users) if users.size else np.zeros((0, n), np.float32)
    ptr, it, lab, ts = build_histories(users, train.user, train.item, train.label, train.ts)
    pool = Pool.of_events(train.user, train.item, train.label, train.UA.shape[0], n)
    with weights(model, delta=1.0):
        knn = model.user_knn_bias(ptr, it, lab, n, pool, users, ts)
    return base, np.asarray(knn, np.float32), [hi[a:b] for a, b in zip(lo, up)], \
        seen_positives(positives_log(train), users), users


def choose_delta(model: Any, cuts: list, fitted: list, z: float) -> dict:
    """Set the user-kNN weight ``delta``, judged on returning users over the pooled cuts on
    top of every other term at its chosen weight (each earlier cut with its own closed-form
    terms, ``fitted``); its grid is ``DELTA_STEPS`` times the calibration ``gamma`` uses."""
    grid, scale = None, 1.0
    saved = (model.prior, model.prior_item, model.item_item)
    try:
        for cut, terms in [(cuts[-1], saved)] + list(zip(cuts[:-1], fitted)):
            model.prior, model.prior_item, model.item_item = terms
            base, knn, rel, seen, _ = knn_parts(model, cut)
            if not base.shape[0]:
                continue
            if grid is None:  # the fit's own cut (first) calibrates
                p = Parts(np.zeros(0), base, {0.0: knn}, 0.0, rel, seen, np.ones(base.shape[0], bool), np.zeros(0))
                scale = calibration(p)
                grid = Grid([round(scale * s, 6) for s in DELTA_STEPS])
            zero = ndcg_per_user(top_k(base, 10, seen), rel, 10)
            for v in grid.diffs:
                grid.add(v, ndcg_per_user(top_k(base + np.float32(v) * knn, 10, seen), rel, 10) - zero)
    finally:
        model.prior, model.prior_item, model.item_item = saved
    pooled_grid = grid.pooled() if grid is not None else {}
    chosen = best(pooled_grid, z)
    model.params["delta"] = np.array([chosen], np.float32)
    return report(pooled_grid, chosen, z, len(cuts), calibration=round(scale, 6), neighbours=model.config.user_knn,
                  judged_on="returning users")


def choose_gamma(model: Any, grids: dict, scale: dict, z: float, cuts: int) -> dict:
    """Set ``gamma`` and the history half-life ``item_item_recency``: the half-life whose
    best clear gain (see :func:`best`) is largest -- or, with :data:`RECENCY_TIE`, the
    shortest one within one standard error of that gain -- and its best weight. Records
    ``gamma`` as :func:`report` does (the chosen half-life's grid) and ``recency``: each
    half-life's best gain over weight 0."""
    chosen = {h: best(g, z) for h, g in grids.items()}
    gain = {h: (g[chosen[h]] if chosen[h] else (0.0, 0.0, next(iter(g.values()))[2])) for h, g in grids.items()}
    h = max(RECENCIES, key=lambda r: (gain[r][0], -r))
    close = [r for r in RECENCIES if r > 0 and chosen[r] and gain[r][0] >= gain[h][0] - gain[h][1]]
    if RECENCY_TIE and close:  # as good within one SE, and more responsive to new likes
        h = min(close)
    model.params["gamma"] = np.array([chosen[h]], np.float32)
    model.config.item_item_recency = float(h) if chosen[h] else 0.0
    return {"gamma": report(grids[h], chosen[h], z, cuts, calibration=round(scale[h], 6),
                            judged_on="returning users"),
            "recency": report(gain, model.config.item_item_recency, z, cuts, unit="positives (half-life)",
                              judged_on="returning users, each at its best gamma")}
