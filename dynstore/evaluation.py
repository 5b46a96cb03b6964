"""Evaluating a model on later events: Recall@k, NDCG@k and per-user AUC.

Users are ranked from their events in the training data, with the dynamic item
features as of the end of that data -- what serving would have shown just before the
held-out events.
"""

from __future__ import annotations

import numpy as np

from .histories import build_histories
from .metrics import ndcg_per_user, recall_at_k, top_k, user_auc

__all__ = ["evaluate"]


#: score cells (users x items) evaluated per batch: 64 MB of float32
EVAL_CELLS = 1 << 24


def evaluate(
    model,
    train,
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
        scores, which early stopping does not need.
    """
    hu = np.asarray(holdout_user, dtype=np.int64)
    hi = np.asarray(holdout_item, dtype=np.int64)
    if holdout_label is not None:
        pos = np.asarray(holdout_label) == 1
        hu, hi = hu[pos], hi[pos]
    n_items = train.V.shape[0]
    if candidates is not None:
        cand = np.asarray(candidates, dtype=bool)
        keep = cand[hi]
        hu, hi = hu[keep], hi[keep]
    users = np.unique(hu)
    if residuals is None and model.residuals is not None and len(model.residuals[1]) == n_items:
        residuals = model.residuals
    scorer = model.scorer(train, residuals)
    order = np.argsort(hu, kind="stable")
    hu_s, hi_s = hu[order], hi[order]
    ranked_all, rel_all, auc_vals = [], [], []
    tpos = train.label == 1
    # a batch's score matrix (and the AUC's sort of it) is users x items: bound its cells,
    # or a million-item catalogue would take gigabytes per batch
    step = max(1, min(batch_users, EVAL_CELLS // max(n_items, 1)))
    for s in range(0, users.size, step):
        ub = users[s : s + step]
        S = scorer(ub)
        if candidates is not None:
            S[:, ~cand] = -np.inf
        seen = None
        if exclude_seen:
            sp, sit, _, _ = build_histories(ub, train.user[tpos], train.item[tpos],
                                            train.label[tpos], train.ts[tpos])
            seen = [sit[sp[i] : sp[i + 1]] for i in range(ub.size)]
        lo = np.searchsorted(hu_s, ub, "left")
        up = np.searchsorted(hu_s, ub, "right")
        rel = [hi_s[a:b_] for a, b_ in zip(lo, up)]
        ranked_all.append(top_k(S, k, seen))
        rel_all += rel
        if with_auc:
            excl = seen
            if candidates is not None:  # non-candidates are not negatives for the AUC either
                others = np.flatnonzero(~cand)
                excl = [np.r_[x, others] for x in (seen or [others[:0]] * ub.size)]
            auc_vals.append((user_auc(S, rel, excl), ub.size))
    if not users.size:
        return {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"), "auc": float("nan"),
                "n_users": 0, **({"ndcg_per_user": np.zeros(0)} if per_user else {})}
    ranked = np.concatenate(ranked_all)
    a = sum(v * n for v, n in auc_vals) / sum(n for _, n in auc_vals) if auc_vals else float("nan")
    nd = ndcg_per_user(ranked, rel_all, k)
    return {
        f"recall@{k}": recall_at_k(ranked, rel_all, k),
        f"ndcg@{k}": float(nd.mean()),
        "auc": float(a),
        "n_users": int(users.size),
        **({"ndcg_per_user": nd} if per_user else {}),
    }
