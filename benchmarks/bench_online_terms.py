"""The online effect term by term: why 3 new likes move a list less with the user-kNN term,
and what variants of the personal terms do to it (Complete Journey, single split).

For each variant a real store is built, encoded and refreshed on ``bench_quality``'s
Complete Journey test split (the default 600-household sample), exactly as
``bench_quality``'s store row; its single-split NDCG@10 (overall and returning users) and
``bench_quality.online_effect`` (200 returning users, 3 new likes near an unseen item X,
no refresh) are measured. Around the online effect the score of the same 200 users is
split into its terms before and after the likes (serving state, ``dynstore.model.score``):
``rest`` (``x_u . w_i`` + bias + segment term), ``ii`` (``gamma`` x item-item) and ``knn``
(``delta`` x user-kNN). Printed per term (medians over the users): its top-10 range (top-1
minus top-10 of the term alone, the user's seen items excluded), and how much the likes
raised it on the user's best target (X or one of its 20 neighbours, the target whose
logit after is highest) against the gap that target had to close (10th logit after minus
its logit before). On the plain store the same is measured with ``delta`` set to 0 in
place (the lists the store served before the term, same refit otherwise).

Variants (``--variants``): ``plain`` (the product), ``knnrecent<h>`` (the query user's
positives weighted ``0.5 ** (rank / h)`` when finding neighbours, config
``user_knn_recency``; ``delta`` re-chosen by refresh with it), ``iirecent<h>`` (the
item-item history half-life forced to ``h``, ``gamma`` and ``delta`` re-chosen on it),
``knnscale<f>`` (``delta`` tried only at ``f`` times its calibration); see
``bench_personal_terms.variant``.

Run (from the repository root; ~45 s per variant on 2 cores, 139 s for three)::

    nice python benchmarks/bench_online_terms.py --variants plain knnrecent10 iirecent50
"""
import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

import bench_personal_terms as bpt  # noqa: E402
import dynstore.versions.refresh as refresh_mod  # noqa: E402
from dynstore.model.spec import ModelConfig  # noqa: E402
from dynstore.serving.recommend import all_items_lists, score_terms  # noqa: E402
from dynstore.serving.state import serving_state  # noqa: E402

ONLINE_EFFECT = bq.online_effect  # the benchmark's own measure, called as it is


def pick(store, split, n_users: int = 200, seed: int = bq.SEED):
    """The users and targets ``bench_quality.online_effect`` draws (the same seeded draws)."""
    from dynstore.serving.recommend import similar_items

    rng = np.random.default_rng(seed)
    pu, pi = split.positives()
    users = rng.choice(np.unique(pu), size=min(n_users, np.unique(pu).size), replace=False)
    seen = {int(u): set() for u in users}
    for u, i in zip(pu, pi):
        if int(u) in seen:
            seen[int(u)].add(int(i))
    warm = np.unique(pi)
    targets = {}
    for u in users:
        u = int(u)
        x = int(rng.choice([i for i in warm[rng.permutation(warm.size)[:50]] if int(i) not in seen[u]]))
        near = [int(r["item_id"]) for r in similar_items(store.catalog, x, 60) if int(r["item_id"]) not in seen[u]]
        targets[u] = {x, *near[3:23]}
    return [int(u) for u in users], targets


def terms(state, users: list) -> dict:
    """Each term of the users' logits ``[m, n]`` (serving state), seen items at -inf in ``total``."""
    model = state.model
    rows = state.user_rows(users)[0]
    hist = state.histories(rows)
    n = len(state.ids)
    X, B = score_terms(state, users)
    total = X @ state.Wf.T + B
    ii = model.item_item_bias(hist[0], hist[1], hist[2], n, hist[3])
    knn = model.user_knn_bias(hist[0], hist[1], hist[2], n, state.knn_pool(), rows, hist[3])
    ii = np.broadcast_to(np.asarray(ii, np.float32), total.shape)
    knn = np.broadcast_to(np.asarray(knn, np.float32), total.shape)
    pptr, pitem = state.positives(rows)
    seen = np.zeros(total.shape, bool)
    seen[np.repeat(np.arange(len(users)), np.diff(pptr)), pitem] = True
    return {"total": total, "ii": ii, "knn": knn, "rest": total - ii - knn, "seen": seen}


def top_range(M: np.ndarray, seen: np.ndarray) -> np.ndarray:
    M = np.where(seen, -np.inf, M)
    top = -np.sort(-np.partition(M, M.shape[1] - 10, axis=1)[:, -10:], axis=1)
    return top[:, 0] - top[:, 9]


def breakdown(before: dict, after: dict, users: list, targets: dict, state) -> dict:
    col = {i: c for c, i in enumerate(state.ids)}
    tcols = [np.array([col[t] for t in targets[u] if t in col], np.int64) for u in users]
    tenth = -np.sort(-np.where(after["seen"], -np.inf, after["total"]), axis=1)[:, 9]
    out = {"gap": [], "rest": [], "ii": [], "knn": []}
    for r, tc in enumerate(tcols):
        best = tc[np.argmax(after["total"][r, tc])]
        out["gap"].append(tenth[r] - before["total"][r, best])
        for t in ("rest", "ii", "knn"):
            out[t].append(after[t][r, best] - before[t][r, best])
    res = {k: float(np.median(v)) for k, v in out.items()}
    for t in ("total", "rest", "ii", "knn"):
        res[f"range {t}"] = float(np.median(top_range(after[t], after["seen"])))
    return res


def per_user(before_state, after_state, users: list, targets: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per user: did the top-10 change, is X or a neighbour in it after the likes."""
    b = all_items_lists(before_state, users, bq.K)
    a = all_items_lists(after_state, users, bq.K)
    changed = np.array([{r["item_id"] for r in x} != {r["item_id"] for r in y} for x, y in zip(a, b)], float)
    hit = np.array([bool(targets[u] & {r["item_id"] for r in x}) for u, x in zip(users, a)], float)
    return changed, hit


def online(store, split, users: list, targets: dict) -> dict:
    before_state = serving_state(store.catalog)
    before = terms(before_state, users)
    out = ONLINE_EFFECT(store, split)
    after_state = serving_state(store.catalog)
    after = terms(after_state, users)
    out["terms"] = breakdown(before, after, users, targets, after_state)
    out["per_user"] = per_user(before_state, after_state, users, targets)
    if float(after_state.model.params.get("delta", np.zeros(1))[0]) > 0:  # the same store, delta 0 in place
        saved = {id(s.model): (s.model, s.model.params["delta"].copy()) for s in (before_state, after_state)}
        for m, _ in saved.values():
            m.params["delta"] = np.zeros(1, np.float32)
        changed, hit = per_user(before_state, after_state, users, targets)
        out["delta 0 in place"] = {
            "top10_changed": float(changed.mean()), "similar_in_top10": float(hit.mean()),
            "terms": breakdown(terms(before_state, users), terms(after_state, users), users, targets, after_state)}
        for m, d in saved.values():
            m.params["delta"] = d
    return out


def run_variant(name: str, test, cat, data) -> dict:
    config, constants = bpt.variant(name)
    saved = refresh_mod.ModelConfig, bq.online_effect
    refresh_mod.ModelConfig = functools.partial(ModelConfig, **config)
    result: dict = {}

    def analyse(store, split):
        users, targets = pick(store, split)
        result.update(online(store, split, users, targets))
        return {k: v for k, v in result.items() if not isinstance(v, dict)}

    bq.online_effect = analyse
    try:
        stats, full = {}, {}
        with bpt.patched(constants):
            score = bq.fit_dynstore_store(test, cat, stats=stats, data=data, full=full, online={})
        ev = bq.evaluate_scorer(score, test, cat.n_items)
    finally:
        refresh_mod.ModelConfig, bq.online_effect = saved
    sel = find(full, "selection") or {}
    return {"eval": ev, "online": result, "selection": sel, "stats": stats}


def find(d, key: str):
    """The first value of ``key`` in nested dicts ``d``."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            f = find(v, key)
            if f is not None:
                return f
    return None


def paired(a: np.ndarray, b: np.ndarray) -> str:
    d = a - b
    return f"{d.mean():+.4f} ±{d.std(ddof=1) / np.sqrt(d.size):.4f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=["plain", "knnrecent10", "iirecent50"])
    ap.add_argument("--households", default=str(bq.CJ_HOUSEHOLDS))
    args = ap.parse_args(argv)
    cat, events, items, users, _ = bq.build_cj(bq._size(args.households), bq.CJ_PRODUCTS, bq.SEED)
    test = bq.temporal_split(events, cat.n_items, seed=bq.SEED)
    cat_t = bq.for_split(cat, test)
    data = bq.cj_store_input(items, users)(test, cat_t)
    res = {}
    for name in args.variants:
        t0 = time.time()
        res[name] = run_variant(name, test, cat_t, data)
        o = res[name]["online"]
        print(f"\n== {name} ({time.time() - t0:.0f}s) selection: "
              f"{ {k: v.get('chosen') for k, v in res[name]['selection'].items() if isinstance(v, dict)} }")
        print(f"online: top-10 changed {o['top10_changed']:.1%} ±{o['top10_changed_se']:.1%}, X or a neighbour "
              f"{o['similar_in_top10']:.1%} ±{o['similar_in_top10_se']:.1%} (before {o['similar_in_top10_before']:.1%})")
        print("terms (medians): " + ", ".join(f"{k} {v:.3f}" for k, v in o["terms"].items()))
        if "delta 0 in place" in o:
            z = o["delta 0 in place"]
            print(f"delta 0 in place: top-10 changed {z['top10_changed']:.1%}, X or a neighbour {z['similar_in_top10']:.1%}; "
                  "terms " + ", ".join(f"{k} {v:.3f}" for k, v in z["terms"].items()))
    ref = next(iter(res))
    for name, r in res.items():
        cells = []
        for seg in ("overall", "returning users"):
            a = np.asarray(r["eval"][seg]["per_user"]["ndcg"])
            b = np.asarray(res[ref]["eval"][seg]["per_user"]["ndcg"])
            cells.append(f"{seg} {a.mean():.4f} ({paired(a, b)} vs {ref})")
        print(f"single split {name}: " + "; ".join(cells))
        ch, hit = r["online"]["per_user"]
        ch0, hit0 = res[ref]["online"]["per_user"]
        print(f"online {name}: top-10 changed {ch.mean():.1%} ({paired(ch, ch0)} vs {ref}), "
              f"X or a neighbour {hit.mean():.1%} ({paired(hit, hit0)} vs {ref})")


if __name__ == "__main__":
    main()
