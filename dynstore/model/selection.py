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
  more than one standard error;
* the new users' bias ``theta_new`` on *new* users (no positive before the cut,
  :func:`dynstore.model.score.new_users`): keep ``theta`` or the popularity rule on
  positives decayed with a half-life longer than the rule's (:func:`new_user_candidates`);
  users with a positive never see it, so no guard on them is needed. It is also judged
  on ``NEW_USER_FRACTIONS`` earlier periods (:func:`judge_new_users`).

A weight other than 0 is kept only when its pooled gain exceeds ``z`` standard errors.
The learned parts of the model (trained on all the training data) are the same in
every arm, so the comparison is about the closed-form term alone; the terms themselves
are refitted on each cut's past only (an item-item fit on each cut keeps at most
``CUT_MAX_ITEMS`` items: the cost of the solve grows with their cube).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from dynstore.model.dynamics import DAY, rule_half_life
from dynstore.model.evaluation import holdout_positives, positives_log, seen_positives
from dynstore.model.histories import build_histories
from dynstore.model.itemitem import ItemItem
from dynstore.model.metrics import ndcg_per_user, top_k
from dynstore.model.spec import TrainingData
from dynstore.model.prior import PRIOR_HALF_LIFE, ContentPrior, decayed_positives
from dynstore.model.score import new_users
from dynstore.model.userknn import Pool

__all__ = ["Cut", "forward_cuts", "fit_closed_form", "choose_terms", "GAMMA_STEPS", "DELTA_STEPS", "RECENCIES", "BETAS",
           "pooled", "new_user_candidates", "KEEP"]

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
#: the cold items' text-neighbour weights tried, in units of their calibration (0 is always
#: tried; on Complete Journey's rolling cuts the gain still grew at 32, docs/model.md)
ETA_STEPS = (1.0, 4.0, 16.0, 64.0)
#: the closed-form terms' weights (zero in a cut's base score: each is judged on the rest)
CLOSED = ("gamma", "beta", "delta", "eta")
#: the new users' bias left as everyone's (no ``theta_new``)
KEEP = "keep"
#: earlier cuts that judge the new users' bias alone (up to the first of ``CUT_FRACTIONS``):
#: it needs no closed-form refit and scores only a cut's new users, so it can afford more
#: periods -- and most users are new early in the data
NEW_USER_FRACTIONS = (0.2, 0.3, 0.4, 0.5)
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
    ts = np.asarray(data.ts)
    cuts = period_cuts(data, list(fractions) + [None]) if ts.size else []
    cuts.append(Cut(data, tuple(np.asarray(x) for x in holdout)))
    return cuts


def period_cuts(data: TrainingData, fractions: list) -> list[Cut]:
    """A cut at each quantile ``fractions[j]`` of ``data``'s event times, tested on the events
    up to the next one (None: the end of ``data``); periods without a positive are left out."""
    ts = np.asarray(data.ts)
    edges = sorted({int(ts.max()) + 1 if f is None else int(np.quantile(ts, f, method="lower")) for f in fractions})
    cuts = []
    for a, b in zip(edges[:-1], edges[1:]):
        before, after = ts < a, (ts >= a) & (ts < b)
        if before.any() and (data.label[after] == 1).any():
            cuts.append(Cut(sub(data, before), (data.user[after], data.item[after], data.label[after])))
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
    if "eta" in model.params:  # the text-neighbour term's columns: items without events
        model.cold_items = np.bincount(data.item, minlength=n)[:n] == 0
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
    saved = (model.prior, model.prior_item, model.item_item, model.cold_items)
    try:
        fit_closed_form(model, data, max_items=CUT_MAX_ITEMS)
        yield
    finally:
        model.prior, model.prior_item, model.item_item, model.cold_items = saved


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
    # new users' bias tried (name -> [items]): its difference from the model's own dynamic bias
    new_shift: dict = field(default_factory=dict)
    # the cold items' text-neighbour term at weight 1 ([users, items]; 0.0: none)
    cn: np.ndarray | float = 0.0


def parts(model: Any, cut: Cut, new_thetas: dict | None = None) -> Parts:
    """The pieces of ``model``'s score on ``cut`` (with its closed-form terms as fitted);
    ``new_thetas``: the new users' biases to try (name -> ``theta_new``)."""
    train = cut.train
    n = train.V.shape[0]
    hu, hi = holdout_positives(*cut.holdout, None)
    users = np.unique(hu)
    if users.size > MAX_CUT_USERS:  # bounds the [users, items] matrices of a cut
        users = np.sort(np.random.default_rng(model.config.seed).choice(users, MAX_CUT_USERS, replace=False))
    order = np.argsort(hu, kind="stable")
    hu, hi = hu[order], hi[order]
    lo, up = np.searchsorted(hu, users, "left"), np.searchsorted(hu, users, "right")
    # every closed-form term off: gamma and beta are judged on the rest, delta after them
    with weights(model, **{k: 0.0 for k in CLOSED if k in model.params}):
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
    ptr, it, lab, _ = build_histories(users, train.user, train.item, train.label, train.ts)
    returning = ~new_users(ptr, lab)  # the rule serving uses
    return Parts(users, base, ii, prior, [hi[a:b] for a, b in zip(lo, up)],
                 seen_positives(positives_log(train), users), returning,
                 np.bincount(train.item, minlength=n) == 0,
                 new_shifts(model, train, new_thetas) if new_thetas and not returning.all() else {},
                 cold_neighbours(model, train, (ptr, it, lab)))


def cold_neighbours(model: Any, train: TrainingData, hist: tuple) -> np.ndarray | float:
    """The text-neighbour term of the cold items at weight 1 for a cut's users (histories
    ``hist``), on the item side as :func:`parts` scores it (0.0 without the term)."""
    if "eta" not in model.params or model.cold_items is None or hist[0].size < 2:
        return 0.0
    Wf, _ = model.item_side(train.V, train.A, None)
    with weights(model, eta=1.0):
        return model.cold_neighbour_bias(hist[0], hist[1], hist[2], Wf)


def new_shifts(model: Any, train: TrainingData, thetas: dict) -> dict:
    """name -> ``[items]``: what each ``theta_new`` of ``thetas`` changes in the dynamic bias
    (``(theta_new - theta) . f_i``, the features as of the end of ``train``; the content
    prior's shrinkage is the same in both and cancels)."""
    act = model.activity_of(train)
    F = act.items.features(np.arange(train.V.shape[0]), act.now())
    own = F @ model.params["theta"]
    return {k: (F @ th - own).astype(np.float32) for k, th in thetas.items()}


def new_user_candidates(model: Any, data: TrainingData) -> dict:
    """name (``pos@90d`` ...) -> ``theta_new``: the popularity rule on positives decayed with
    each of the spec's half-lives longer than the rule's (:func:`rule_half_life` of the
    span of ``data``; all time included). Empty without dynamic positives."""
    spec = model.dynamic
    if spec is None or "pos" not in spec.kinds or not np.asarray(data.ts).size:
        return {}
    rule = rule_half_life(spec, (float(np.max(data.ts)) - float(np.min(data.ts))) / DAY)
    longer = [h for h in spec.half_lives if h is None or (rule is not None and h > rule)]
    return {spec.names()[spec.index("pos", h)]: model.new_user_rule(h) for h in longer}


def ndcg(p: Parts, gamma: float, beta: float, rows: np.ndarray, cold_only: bool = False,
         recency: float = 0.0, shift: np.ndarray | None = None, eta: float = 0.0) -> np.ndarray:
    """Per-user NDCG@10 of the users ``rows`` (a mask) at these weights (the item-item
    scores of history half-life ``recency``); ``cold_only``: ranked among the cold items,
    judged on their cold positives; ``shift``: added to every item's score (a new users'
    bias tried, :func:`new_shifts`)."""
    S = p.base[rows].copy()
    if shift is not None:
        S += shift[None, :]
    if gamma:
        S += gamma * p.ii[recency][rows]
    if beta:
        S += beta * p.prior[None, :]
    if eta:
        S += np.float32(eta) * p.cn[rows]
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


class Etas:
    """The text-neighbour weight's grids, one per content prior weight ``b`` tried (0
    included): ``eta = step * scale[b]`` on top of ``b * prior``, judged on cold items
    (``cold``) and, as a guard, on all items (``every``), against ``eta = 0``."""

    def __init__(self, p: "Parts"):
        self.scale = {b: cold_calibration(p, b) for b in (0.0,) + BETAS}
        self.cold = {b: Grid([round(sc * s, 6) for s in ETA_STEPS]) for b, sc in self.scale.items()}
        self.every = {b: Grid(list(g.diffs)) for b, g in self.cold.items()}

    def judge(self, p: "Parts") -> None:
        """One cut's differences, as :func:`ndcg` would give them, computed on what the term
        can change: the cold columns (cold items ranked among themselves) and, on all items,
        the users whose list holds a cold item (the term only lowers cold items: the others'
        lists stay as they are, difference 0)."""
        cold = np.flatnonzero(p.cold)
        col = np.full(p.cold.size, -1, np.int64)
        col[cold] = np.arange(cold.size)
        seen_c = [col[x][col[x] >= 0] for x in p.seen]
        rel_c = [col[r][col[r] >= 0] for r in p.relevant]
        has = np.array([r.size > 0 for r in p.relevant], bool)
        at = np.cumsum(has) - 1  # a user's place among those judged on all items
        cn_c = p.cn[:, cold]
        for b in self.scale:
            S = p.base + (np.float32(b) * p.prior[None, :] if b and np.ndim(p.prior) == 1 else 0.0)
            ranked = top_k(S, 10, p.seen)
            hit = ((ranked >= 0) & p.cold[np.maximum(ranked, 0)]).any(1)
            rows = np.flatnonzero(hit)
            seen_h, rel_h = [p.seen[r] for r in rows], [p.relevant[r] for r in rows]
            base_h = ndcg_per_user(ranked[rows], rel_h, 10)
            Sc = S[:, cold]
            base_cold = ndcg_per_user(top_k(Sc, 10, seen_c), rel_c, 10)
            for v in self.cold[b].diffs:
                self.cold[b].add(v, ndcg_per_user(top_k(Sc + np.float32(v) * cn_c, 10, seen_c), rel_c, 10) - base_cold)
                d = np.zeros(int(has.sum()))
                if rows.size:
                    new = ndcg_per_user(top_k(S[rows] + np.float32(v) * p.cn[rows], 10, seen_h), rel_h, 10)
                    d[at[rows[has[rows]]]] = new - base_h
                self.every[b].add(v, d)


def cold_calibration(p: "Parts", beta: float) -> float:
    """The text-neighbour term's scale against the rest of the cold items' score (with the
    prior at ``beta``): median over the users with a positive of the spread of their top-10
    cold logits, over the per-user standard deviation of the term (1 where it varies)."""
    cold = np.flatnonzero(p.cold)
    rows = np.flatnonzero(p.returning)[:500]
    if np.ndim(p.cn) != 2 or cold.size <= 10 or not rows.size:
        return 1.0
    S = p.base[np.ix_(rows, cold)] + (beta * p.prior[cold][None, :] if np.ndim(p.prior) == 1 else 0.0)
    top = np.sort(np.partition(S, cold.size - 10, axis=1)[:, cold.size - 10:], axis=1)
    sd = float(np.median(p.cn[np.ix_(rows, cold)].std(1)))
    return float(np.median(top[:, -1] - top[:, 0])) / sd if sd > 0 else 1.0


def guarded(grid: dict, g_all: dict, z: float) -> float:
    """The best clear gain (:func:`best`) among the values that lose nothing on all items
    beyond one standard error (stricter than the gain's z: every user's list is at stake)."""
    safe = {v: g for v, g in grid.items() if not (np.isfinite(g_all[v][1]) and g_all[v][0] < -g_all[v][1])}
    return best(safe, z)


def judge_cut(p: Parts, gammas: dict, betas: Grid, guard: Grid, news: Grid | None = None,
              etas: Etas | None = None) -> None:
    """Add one cut's per-user differences: ``gamma`` (a :class:`Grid` per history
    half-life) on its returning users, ``beta`` on its cold items and, as a guard, on all
    items, the new users' biases (``news``) on its new users, the text-neighbour weight
    (``etas``) as ``beta``."""
    if news is not None and p.new_shift:
        new = ~p.returning
        base = ndcg(p, 0.0, 0.0, new)
        for name in news.diffs:
            news.add(name, ndcg(p, 0.0, 0.0, new, shift=p.new_shift[name]) - base)
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
        if etas is not None and np.ndim(p.cn) == 2:
            etas.judge(p)


def choose_terms(model: Any, data: TrainingData, holdout: tuple, z: float) -> dict:
    """Fit the closed-form terms on ``data`` and choose their weights on the pooled cuts
    (one cut's score matrices at a time); returns what each choice records (see
    :func:`report`): ``gamma`` on returning users, ``prior`` on cold items."""
    fit_closed_form(model, data)
    model.theta_new = None  # judged afresh: the cuts' base is everyone's bias
    thetas = new_user_candidates(model, data)
    cuts = forward_cuts(data, holdout)
    last = parts(model, cuts[-1], thetas)  # the fit's own cut: its terms are the model's
    scale = {h: calibration(last, h) for h in RECENCIES}
    gammas = {h: Grid([round(scale[h] * s, 6) for s in GAMMA_STEPS]) for h in RECENCIES}
    betas, guard, news = Grid(BETAS), Grid(BETAS), Grid(thetas)
    etas = Etas(last) if np.ndim(last.cn) == 2 else None
    judge_cut(last, gammas, betas, guard, news, etas)
    newest = {k: pooled(list(d)) for k, d in news.diffs.items()}  # the fit's own cut alone
    del last
    fitted = []  # each earlier cut's closed-form terms, for the user-kNN pass
    for cut in cuts[:-1]:
        with closed_form_of(model, cut.train):
            judge_cut(parts(model, cut, thetas), gammas, betas, guard, news, etas)
            fitted.append((model.prior, model.prior_item, model.item_item, model.cold_items))
    out = {}
    if "gamma" in model.params and model.item_item is not None:
        out.update(choose_gamma(model, {h: g.pooled() for h, g in gammas.items()}, scale, z, len(cuts)))
    if "beta" in model.params and model.prior is not None:
        grid, g_all = betas.pooled(), guard.pooled()
        # cold items must not push warm ones out of the lists (:func:`guarded`)
        chosen = guarded(grid, g_all, z)
        model.params["beta"] = np.array([chosen], np.float32)
        g = g_all.get(chosen, (0.0, 0.0, 0))
        out["prior"] = report(grid, chosen, z, len(cuts), judged_on="cold items",
                              all_items={"gain": _num(g[0]), "se": _num(g[1]), "users": g[2]})
    if "eta" in model.params:
        out["cold_neighbours"] = choose_eta(model, etas, z, len(cuts))
    if "delta" in model.params:
        out["user_knn"] = choose_delta(model, cuts, fitted, z) if knn_affordable(model, data) else \
            skip_delta(model, data, z, len(cuts))
    if thetas:
        early = period_cuts(data, list(NEW_USER_FRACTIONS) + [CUT_FRACTIONS[0]])
        for cut in early:
            judge_new_users(model, cut, thetas, news)
        out["new_users"] = choose_new_users(model, news.pooled(), thetas, z, len(cuts) + len(early), newest)
    return out


def choose_eta(model: Any, etas: Etas | None, z: float, cuts: int) -> dict:
    """Set the text-neighbour weight ``eta`` on top of the chosen ``beta``: judged on cold
    items over the pooled cuts, guarded on all items (:func:`guarded`); 0 without cold items."""
    if etas is None:
        model.params["eta"] = np.zeros(1, np.float32)
        return report({}, 0.0, z, cuts, judged_on="cold items", skipped="no cold items or no user with a positive")
    b = float(model.params["beta"][0]) if "beta" in model.params else 0.0
    b = min(etas.scale, key=lambda x: abs(x - b))
    grid, g_all = etas.cold[b].pooled(), etas.every[b].pooled()
    chosen = guarded(grid, g_all, z)
    model.params["eta"] = np.array([chosen], np.float32)
    g = g_all.get(chosen, (0.0, 0.0, 0))
    return report(grid, chosen, z, cuts, judged_on="cold items", calibration=round(etas.scale[b], 6), beta=b,
                  all_items={"gain": _num(g[0]), "se": _num(g[1]), "users": g[2]})


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


def knn_users(data: TrainingData) -> int:
    """Users with a positive in ``data``: the user-kNN term's pool."""
    return int(np.unique(data.user[data.label == 1]).size)


def knn_affordable(model: Any, data: TrainingData) -> bool:
    """Whether refresh tries the user-kNN term: its pool has at most
    ``config.user_knn_max_users`` users (its cost grows with users x users)."""
    return knn_users(data) <= model.config.user_knn_max_users


def skip_delta(model: Any, data: TrainingData, z: float, cuts: int) -> dict:
    """``delta`` left at 0, not tried: the pool is above ``config.user_knn_max_users``."""
    model.params["delta"] = np.zeros(1, np.float32)
    return report({}, 0.0, z, cuts, neighbours=model.config.user_knn, judged_on="returning users",
                  skipped=f"{knn_users(data)} users with a positive > user_knn_max_users "
                          f"{model.config.user_knn_max_users}")


def choose_delta(model: Any, cuts: list, fitted: list, z: float) -> dict:
    """Set the user-kNN weight ``delta``, judged on returning users over the pooled cuts on
    top of every other term at its chosen weight (each earlier cut with its own closed-form
    terms, ``fitted``); its grid is ``DELTA_STEPS`` times the calibration ``gamma`` uses."""
    grid, scale = None, 1.0
    saved = (model.prior, model.prior_item, model.item_item, model.cold_items)
    try:
        for cut, terms in [(cuts[-1], saved)] + list(zip(cuts[:-1], fitted)):
            model.prior, model.prior_item, model.item_item, model.cold_items = terms
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
        model.prior, model.prior_item, model.item_item, model.cold_items = saved
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


def judge_new_users(model: Any, cut: Cut, thetas: dict, news: Grid) -> None:
    """Add one cut's per-user differences of each new users' bias (:func:`new_shifts`) on its
    new users alone, scored as in :func:`parts` (closed-form terms at weight 0: the item-item
    term is zero without positives)."""
    train = cut.train
    hu, hi = holdout_positives(*cut.holdout, None)
    users = np.unique(hu)
    ptr, _, lab, _ = build_histories(users, train.user, train.item, train.label, train.ts)
    users = users[new_users(ptr, lab)]
    if users.size > MAX_CUT_USERS:
        users = np.sort(np.random.default_rng(model.config.seed).choice(users, MAX_CUT_USERS, replace=False))
    if not users.size:
        return
    with weights(model, **{k: 0.0 for k in ("gamma", "beta") if k in model.params}):
        base = model.score(train, users)
    order = np.argsort(hu, kind="stable")
    hu, hi = hu[order], hi[order]
    lo, up = np.searchsorted(hu, users, "left"), np.searchsorted(hu, users, "right")
    relevant, none = [hi[a:b] for a, b in zip(lo, up)], [hi[:0]] * users.size  # no positive seen
    ref = ndcg_per_user(top_k(base, 10, none), relevant, 10)
    for name, shift in new_shifts(model, train, thetas).items():
        news.add(name, ndcg_per_user(top_k(base + shift[None, :], 10, none), relevant, 10) - ref)


def choose_new_users(model: Any, grid: dict, thetas: dict, z: float, cuts: int, newest: dict) -> dict:
    """Set ``theta_new``: the candidate (:func:`new_user_candidates`) with the largest pooled
    gain on new users among those clearly better than keeping ``theta`` (gain above ``z``
    standard errors), else None (``chosen`` ``"keep"``). Records it as :func:`report`
    does, with the newest cut's figures alone (``newest``: the fit's holdout, which the
    verdict judges too). No guard on the newest cut: it holds few new users (5-10 on
    Complete Journey), and guards on it blocked choices there (docs/model.md)."""
    fine = [v for v, (g, se, n) in grid.items() if n > 1 and np.isfinite(se) and g > z * se and g > 0]
    chosen = max(fine, key=lambda v: grid[v][0]) if fine else KEEP
    model.theta_new = None if chosen == KEEP else thetas[chosen].copy()
    shown = chosen if chosen != KEEP else max(grid, key=lambda v: grid[v][0])
    g = newest[shown]
    return report(grid, chosen, z, cuts, judged_on="new users (no positive before the cut)",
                  newest_cut={"value": shown, "gain": _num(g[0]), "se": _num(g[1]), "users": g[2]})
