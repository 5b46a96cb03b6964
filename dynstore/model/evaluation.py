"""Evaluating a model on later events: Recall@k, NDCG@k and per-user AUC.

Users are ranked from their events in the training data, with the dynamic item
features as of the end of that data -- what serving would have shown just before the
held-out events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dynstore.model.histories import build_histories
from dynstore.model.metrics import ndcg_per_user, recall_at_k, top_k, user_auc
from dynstore.model.score import logits, score_terms
from dynstore.model.userknn import Pool
from dynstore.model.spec import TrainingData

__all__ = ["evaluate", "scorer"]


#: score cells (users x items) evaluated per batch: 64 MB of float32
EVAL_CELLS = 1 << 24


def scorer(model: Any, data: TrainingData,
           residuals: tuple[np.ndarray, np.ndarray] | None = None, *, reuse_vectors: bool = False) -> Callable:
    """``users -> logits [len(users), n_items]`` of ``model`` (a
    :class:`~dynstore.model.fusion.FusionModel`), as serving would have scored the users of
    ``data`` just after its last event: histories and dynamic features from ``data``'s
    events, item side computed once, every term through the score equation
    (:func:`dynstore.model.score.score_terms`, as serving).

    ``reuse_vectors`` fuses the item matrix into ``data.V`` (whose rows are then the
    fused vectors, not the semantic ones): one catalogue-sized matrix instead of two,
    for a caller that is done with ``data`` once it is scored."""
    n = data.V.shape[0]
    Wf, bias = model.item_side(data.V, data.A, residuals, out=data.V if reuse_vectors else None)
    act = model.activity_of(data)
    table, bias_new = None, None
    if act is not None:
        now = act.now()
        F = act.items.features(np.arange(n), now)
        if getattr(model, "theta_new", None) is not None:  # new users' own popularity column
            bias_new = bias + model.dynamic_bias(F, new_users=True)
        bias = bias + model.dynamic_bias(F)
        table = model.segment_table(act, np.arange(n), now)

    order = np.argsort(np.asarray(data.user, dtype=np.int64), kind="stable")  # once for every batch
    pools: list = []

    def pool() -> Pool:  # the user-kNN term's neighbours: every user's positives in data (once)
        if not pools:
            pools.append(Pool.of_events(data.user, data.item, data.label, data.UA.shape[0], n))
        return pools[0]

    def score(users: np.ndarray) -> np.ndarray:
        ptr, it, lab, ts = build_histories(users, data.user, data.item, data.label, data.ts, order)
        # the score equation as serving computes it (dynstore.model.score)
        X, B = score_terms(model, Wf, bias, data.UA[users], (ptr, it, lab, ts),
                           model.segment_bias(table, data.UK[users]), bias_new,
                           pool=pool, self_rows=np.asarray(users, np.int64))
        return logits(X, Wf, B)

    return score


def holdout_positives(holdout_user: np.ndarray, holdout_item: np.ndarray,
                      holdout_label: np.ndarray | None,
                      candidates: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(user, item)`` of the holdout's positives (all rows when ``holdout_label`` is
    None) among the ``candidates`` (a boolean item mask; None: all items)."""
    hu = np.asarray(holdout_user, dtype=np.int64)
    hi = np.asarray(holdout_item, dtype=np.int64)
    if holdout_label is not None:
        pos = np.asarray(holdout_label) == 1
        hu, hi = hu[pos], hi[pos]
    if candidates is not None:
        keep = candidates[hi]
        hu, hi = hu[keep], hi[keep]
    return hu, hi


def positives_log(train: TrainingData) -> tuple[np.ndarray, ...]:
    """``(user, item, label, ts, order)`` of ``train``'s positives, ``order`` their stable
    sort by user: taken once per evaluation, not once per batch of users."""
    tpos = train.label == 1
    user = np.asarray(train.user[tpos], dtype=np.int64)
    return user, train.item[tpos], train.label[tpos], train.ts[tpos], np.argsort(user, kind="stable")


def seen_positives(log: tuple[np.ndarray, ...], users: np.ndarray) -> list[np.ndarray]:
    """The training positives (a :func:`positives_log`) of each of ``users``."""
    sp, sit, _, _ = build_histories(users, *log)
    return [sit[sp[i] : sp[i + 1]] for i in range(users.size)]


def auc_exclusions(seen: list | None, candidates: np.ndarray | None, m: int) -> list | None:
    """Items that are no negatives of the AUC for each of ``m`` users: their training
    positives and the non-candidates."""
    if candidates is None:
        return seen
    others = np.flatnonzero(~candidates)
    return [np.r_[x, others] for x in (seen or [others[:0]] * m)]


@dataclass
class Ranked:
    """Top-k lists, relevant items and AUC parts of the users ranked so far."""

    ranked: list = field(default_factory=list)    # [batch users, k] arrays
    relevant: list = field(default_factory=list)  # one item array per user
    auc: list = field(default_factory=list)       # (mean AUC, users) per batch


def rank_batch(out: Ranked, S: np.ndarray, users: np.ndarray, hu_s: np.ndarray,
               hi_s: np.ndarray, k: int, seen: list | None, candidates: np.ndarray | None,
               with_auc: bool) -> None:
    """Add the top-k lists of ``users`` (scores ``S``) and their holdout positives
    (``hi_s`` by ``hu_s``, sorted by user) to ``out``."""
    if candidates is not None:
        S[:, ~candidates] = -np.inf
    lo = np.searchsorted(hu_s, users, "left")
    up = np.searchsorted(hu_s, users, "right")
    rel = [hi_s[a:b] for a, b in zip(lo, up)]
    out.ranked.append(top_k(S, k, seen))
    out.relevant += rel
    if with_auc:
        out.auc.append((user_auc(S, rel, auc_exclusions(seen, candidates, users.size)), users.size))


def summarise(out: Ranked, n_users: int, k: int, per_user: bool) -> dict:
    """The metrics of :func:`evaluate` from what :func:`rank_batch` collected."""
    if not n_users:
        return {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"), "auc": float("nan"),
                "n_users": 0, **({"ndcg_per_user": np.zeros(0)} if per_user else {})}
    ranked = np.concatenate(out.ranked)
    a = (sum(v * n for v, n in out.auc) / sum(n for _, n in out.auc)) if out.auc else float("nan")
    nd = ndcg_per_user(ranked, out.relevant, k)
    return {
        f"recall@{k}": recall_at_k(ranked, out.relevant, k),
        f"ndcg@{k}": float(nd.mean()),
        "auc": float(a),
        "n_users": int(n_users),
        **({"ndcg_per_user": nd} if per_user else {}),
    }


def evaluate(
    model: Any,
    train: TrainingData,
    holdout_user: np.ndarray,
    holdout_item: np.ndarray,
    holdout_label: np.ndarray | None = None,
    *,
    residuals: tuple[np.ndarray, np.ndarray] | None = None,
    k: int = 10,
    exclude_seen: bool = True,
    candidates: np.ndarray | None = None,
    batch_users: int = 1024,
    per_user: bool = False,
    with_auc: bool = True,
    reuse_vectors: bool = False,
) -> dict:
    """Recall@k, NDCG@k and per-user AUC of ``model`` on a holdout.

    Users are ranked from their events in ``train`` (all items, or the boolean
    ``candidates`` mask); ``exclude_seen`` removes their training positives from the
    candidates. Relevant items are the holdout positives (``holdout_label == 1``, all rows
    when None). ``residuals`` default to ``model.residuals`` when those match ``train``.

    Returns
    -------
    dict
        ``{"recall@k", "ndcg@k", "auc", "n_users"}`` (means over users with a relevant item);
        with ``per_user`` also ``"ndcg_per_user"`` (an array, users in ascending order).
        ``with_auc=False`` skips the AUC (``nan``): it costs a sort of every user's
        scores, which early stopping does not need. ``reuse_vectors`` overwrites
        ``train.V`` with the fused item matrix (see :func:`scorer`): for a caller
        that scores ``train`` once and drops it.
    """
    cand = None if candidates is None else np.asarray(candidates, dtype=bool)
    hu, hi = holdout_positives(holdout_user, holdout_item, holdout_label, cand)
    n_items = train.V.shape[0]
    users = np.unique(hu)
    if residuals is None and model.residuals is not None and len(model.residuals[1]) == n_items:
        residuals = model.residuals
    score = scorer(model, train, residuals, reuse_vectors=reuse_vectors)
    order = np.argsort(hu, kind="stable")
    hu_s, hi_s = hu[order], hi[order]
    log = positives_log(train) if exclude_seen else None
    out = Ranked()
    # a batch's score matrix (and the AUC's sort of it) is users x items: bound its cells,
    # or a million-item catalogue would take gigabytes per batch
    step = max(1, min(batch_users, EVAL_CELLS // max(n_items, 1)))
    for s in range(0, users.size, step):
        ub = users[s : s + step]
        seen = seen_positives(log, ub) if exclude_seen else None
        rank_batch(out, score(ub), ub, hu_s, hi_s, k, seen, cand, with_auc)
    return summarise(out, users.size, k, per_user)
