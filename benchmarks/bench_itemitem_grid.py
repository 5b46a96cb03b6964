"""The item-item term's variants on the quality benchmark's rolling cuts, returning users.

For each of ``bench_quality``'s five rolling cuts: the rule (``fit_dynstore(rule=True)``)
plus ``g`` times the standardised scores of an item-item fit (``ItemItem.fit`` keyword
arguments per variant; ``decay``: weight each X cell by its age with the training's
half-life (``true``) or this many days, ``false``: binary X; ``hist_n``: weight a user's
positives ``0.5 ** (rank / hist_n)``, most recent first; ``hist_h``: ``0.5 ** (age days /
hist_h)``), for each ``g`` of a fixed grid, against the EASE peer at the benchmark's
validated lambda. Prints NDCG@10 pooled over the returning user-periods, its ratio to EASE
and the paired difference ± SE. The weight is the best in hindsight (an upper bound for
what refresh's pooled selection can choose): it compares the variants, not the served store.

Run (from the repository root; data as for bench_quality)::

    python benchmarks/bench_itemitem_grid.py cj '{"old": {"lam": 250, "mu": 250}, "binary": {"lam": 250, "mu": 250, "decay": false}}'
    python benchmarks/bench_itemitem_grid.py ml '{"h50": {"lam": 250, "mu": 250, "decay": false, "hist_n": 50}}'
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as ssp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
import peers  # noqa: E402

from dynstore.model.itemitem import ItemItem  # noqa: E402
from dynstore.model.metrics import ndcg_per_user, top_k  # noqa: E402

GAMMAS = [0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]


def item_item_scores(ii, ptr, hit, hts, rows, now, n, hist_h=None, hist_n=None):
    if hist_h is None and hist_n is None:
        return ii.scores(ptr, hit, n)
    B = ssp.csr_matrix((ii.val, ii.col, ii.ptr), shape=(n, n))
    if hist_h is not None:
        w = np.power(0.5, (now - hts) / 86400 / hist_h)
    else:
        order = np.lexsort((-hts, rows))
        rank = np.empty(rows.size, np.int64)
        rank[order] = np.arange(rows.size) - ptr[rows[order]]
        w = np.power(0.5, rank / hist_n)
    S = np.asarray((ssp.csr_matrix((w, (rows, hit)), shape=(ptr.size - 1, n)) @ B).todense(), np.float32)
    rms = np.sqrt((S ** 2).mean(1, keepdims=True))
    return np.divide(S, rms, out=np.zeros_like(S), where=rms > 0)


def main(ds: str, variants: dict) -> None:
    if ds == "cj":
        cat, events, *_ = bq.build_cj(600, 2000, 0)
        lam_peer = 2500.0
    else:
        cat, events, *_ = bq.build(Path("/work/shared/data/ml-latest-small") if len(sys.argv) < 4 else Path(sys.argv[3]))
        lam_peer = 500.0
    test = bq.temporal_split(events, cat.n_items, seed=0)
    n = cat.n_items
    res: dict = {}
    for c in bq.ROLLING_CUTS:
        t0 = time.time()
        sp = bq.rolling_split(test, n, c)
        csp = bq.for_split(cat, sp)
        pu, pi = sp.positives()
        ru = np.unique(sp.test_user)
        ru = ru[np.isin(ru, pu)]  # returning users
        seen, rel = bq.seen_and_relevant(sp, ru, pu, pi)

        def ndcg(S):
            return ndcg_per_user(top_k(np.asarray(S, np.float64), 10, seen), rel, 10)

        res.setdefault("EASE", []).append(ndcg(peers.fit_ease(sp, n, lam_peer, 365)(ru)))
        base = bq.fit_dynstore(sp, csp, {"rule": True})(ru)
        res.setdefault("rule", []).append(ndcg(base))
        pos = sp.label == 1
        ptr, hit, _, hts = bq.build_histories(ru, pu, pi, np.ones(pu.size, np.int8), sp.ts[pos])
        rows = np.repeat(np.arange(ru.size), np.diff(ptr))
        span = (sp.ts.max() - sp.ts.min()) / 86400
        for name, kw in variants.items():
            kw = dict(kw)
            decay, hh, hn = kw.pop("decay", True), kw.pop("hist_h", None), kw.pop("hist_n", None)
            w = None
            if decay:
                h = bq.time_decay_days(span) if decay is True else decay
                ts = sp.ts[pos].astype(float)
                w = np.power(0.5, (ts.max() - ts) / 86400 / h)
            ii = ItemItem.fit(sp.user[pos], sp.item[pos], n, V=csp.V, weight=w, **kw)
            S = item_item_scores(ii, ptr, hit, hts, rows, sp.ts.max(), n, hh, hn)
            for g in GAMMAS:
                res.setdefault(f"{name} g{g}", []).append(ndcg(base + g * S))
        print(f"cut {c} {time.time() - t0:.0f}s", flush=True)
    b = np.concatenate(res["EASE"])
    print(f"returning user-periods {b.size}; NDCG@10, ratio to EASE, paired difference to EASE ± SE")
    for k, v in res.items():
        x = np.concatenate(v)
        d = x - b
        print(f"{k:30s} {x.mean():.4f}  {x.mean() / b.mean():.3f}x  {d.mean():+.4f} ±{d.std(ddof=1) / np.sqrt(d.size):.4f}")


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
