"""Candidate second personal terms on top of what refresh fits, Complete Journey's rolling cuts.

For each of ``bench_quality``'s five rolling cuts (the default 600-household sample):
the model as refresh fits it (``bench_quality.fit_dynstore``: rule + learned weights +
item-item term at the ``gamma`` chosen on its pooled cuts + content prior) gives the base
logits; ONE candidate term at a time is added as ``w * c * T`` where ``T`` is the term
(standardised per user by its root-mean-square, as the item-item term is), ``c`` the
calibration refresh uses for ``gamma`` (median spread of the top-10 base logits over that
of the term, on the returning users) and ``w`` a small grid. Candidates (cheapest first):

* ``attr:<col>`` -- attribute affinity: ``log(share + 0.01)``, the user's share of
  training positives whose ``col`` (department, category, brand, product type) is the
  item's; ``attr:all`` sums the four;
* ``uknn<k>`` -- user-kNN: cosine similarity on the binary user x item matrix of
  positives, the ``k`` most similar users' positives summed by similarity (ties with the
  ``k``-th kept); ``uknn50 recent<h>`` (``--only uknnr``, not in the default run): the
  query user's positives weighted ``0.5 ** (rank / h)``, newest first; ``uknn50 idf`` /
  ``shrink10`` (``--only uknnv``): items weighted ``log(users / df)`` in the similarity,
  or the cosine's denominator shrunk by 10;
* ``rp3b<beta>`` -- RP3beta: the 3-step random walk user-item-user-item, item popularity
  penalised by ``deg ** beta``, the 200 largest weights per item kept;
* ``seq<L>`` -- short-term sequential: how often an item was bought within the next 10
  first purchases after each of the user's last ``L`` purchases (cosine-normalised).

Prints, per candidate and weight, NDCG@10 pooled over the returning user-periods and over
all user-periods, the paired gain over the base ± SE, and the ratio to EASE (the peer at
the benchmark's validated lambda). The weight is the best in hindsight: an upper bound on
what a pooled selection in refresh could choose. The base includes the user-kNN term as
refresh chooses it (``dynstore.model.userknn``); ``--user-knn 0`` measures on the store
before it, ``--before`` adds that model as a paired row.

Run (from the repository root; 1.5-4 min on 2 cores)::

    nice python benchmarks/bench_personal_terms.py
    nice python benchmarks/bench_personal_terms.py --only attr uknn --cuts 2
    nice python benchmarks/bench_personal_terms.py --user-knn 0     # on the store before the user-kNN term
    nice python benchmarks/bench_personal_terms.py --only uknn --before   # the term as refresh chooses it
    nice python benchmarks/bench_personal_terms.py --only --variants plain knnrecent30 iirecent50 --ref plain
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as ssp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
import peers  # noqa: E402

import dynstore.model.selection as selection  # noqa: E402
from dynstore.model.histories import build_histories  # noqa: E402
from dynstore.model.metrics import ndcg_per_user, top_k  # noqa: E402

WEIGHTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
ATTRS = {"department": "department", "category": "category", "brand": "brand", "type": "title"}
EASE_LAM = 2500.0


def standardise(S: np.ndarray) -> np.ndarray:
    S = np.asarray(S, np.float32)
    rms = np.sqrt((S ** 2).mean(1, keepdims=True))
    return np.divide(S, rms, out=np.zeros_like(S), where=rms > 0)


def spread(M: np.ndarray) -> float:
    n = M.shape[1]
    top = np.sort(np.partition(M, n - 10, axis=1)[:, n - 10:], axis=1)
    return float(np.median(top[:, -1] - top[:, 0]))


def codes(items, col: str) -> np.ndarray:
    """Integer code per item of attribute ``col`` (-1: null)."""
    vals = items[col].to_list()
    table: dict = {}
    return np.array([-1 if v is None else table.setdefault(v, len(table)) for v in vals], np.int64)


def binary_matrix(pu, pi, n_users, n):
    X = ssp.csr_matrix((np.ones(pu.size, np.float32), (pu, pi)), shape=(n_users, n))
    X.sum_duplicates()
    X.data[:] = 1.0
    return X


def attr_term(Xu: ssp.csr_matrix, code: np.ndarray) -> np.ndarray:
    """log(share + 0.01) of each item's attribute value among the user's positives."""
    ok = code >= 0
    nv = int(code.max()) + 1
    M = ssp.csr_matrix((np.ones(ok.sum(), np.float32), (np.flatnonzero(ok), code[ok])), shape=(code.size, nv))
    C = np.asarray((Xu @ M).todense(), np.float32)  # [m, values]
    share = C / np.maximum(C.sum(1, keepdims=True), 1.0)
    T = np.full((Xu.shape[0], code.size), np.log(0.01), np.float32)
    T[:, ok] = np.log(share[:, code[ok]] + 0.01)
    T[np.asarray(Xu.sum(1)).ravel() == 0] = 0.0
    return T


def uknn_term(X: ssp.csr_matrix, users: np.ndarray, k: int) -> np.ndarray:
    norm = np.sqrt(np.asarray(X.sum(1)).ravel())
    Xn = ssp.diags(1.0 / np.maximum(norm, 1e-9)) @ X
    sim = np.asarray((Xn[users] @ Xn.T).todense(), np.float32)
    sim[np.arange(users.size), users] = 0.0
    if k < sim.shape[1]:
        thr = -np.partition(-sim, k - 1, axis=1)[:, k - 1:k]
        sim[sim < thr] = 0.0
    return standardise(np.asarray(ssp.csr_matrix(sim) @ X.todense()))


def uknn_recent_term(X: ssp.csr_matrix, pu, pi, pts, users: np.ndarray, k: int, h: float) -> np.ndarray:
    """User-kNN whose query weighs the user's positives ``0.5 ** (rank / h)`` (rank 0: newest)."""
    ptr, hit, _, hts = build_histories(users, pu, pi, np.ones(pu.size, np.int8), pts)
    rows = np.repeat(np.arange(users.size), np.diff(ptr))
    order = np.lexsort((-hts, rows))
    rank = np.empty(rows.size, np.int64)
    rank[order] = np.arange(rows.size) - ptr[rows[order]]
    Q = ssp.csr_matrix((np.power(0.5, rank / h), (rows, hit)), shape=(users.size, X.shape[1]))
    norm = np.sqrt(np.asarray(X.sum(1)).ravel())
    Xn = ssp.diags(1.0 / np.maximum(norm, 1e-9)) @ X
    sim = np.asarray((Q @ Xn.T).todense(), np.float32)
    sim[np.arange(users.size), users] = 0.0
    thr = -np.partition(-sim, k - 1, axis=1)[:, k - 1:k]
    sim[sim < thr] = 0.0
    return standardise(np.asarray(ssp.csr_matrix(sim) @ X.todense()))


def uknn_variant_term(X: ssp.csr_matrix, users: np.ndarray, k: int, idf: bool, shrink: float) -> np.ndarray:
    """User-kNN with items weighted ``log(n_users / df)`` in the similarity (``idf``) and/or
    the cosine's denominator shrunk by ``shrink`` (fewer overlaps count for less)."""
    df = np.asarray(X.sum(0)).ravel()
    w = np.log(X.shape[0] / np.maximum(df, 1)).astype(np.float32) if idf else np.ones(X.shape[1], np.float32)
    Xw = X @ ssp.diags(w)
    norm = np.sqrt(np.asarray(Xw.multiply(Xw).sum(1)).ravel())
    dot = np.asarray((Xw[users] @ Xw.T).todense(), np.float32)
    sim = dot / (norm[users][:, None] * norm[None, :] + shrink + 1e-9)
    sim[np.arange(users.size), users] = 0.0
    thr = -np.partition(-sim, k - 1, axis=1)[:, k - 1:k]
    sim[sim < thr] = 0.0
    return standardise(np.asarray(ssp.csr_matrix(sim) @ X.todense()))


def rp3_term(X: ssp.csr_matrix, users: np.ndarray, beta: float, top: int = 200) -> np.ndarray:
    du = np.asarray(X.sum(1)).ravel()
    di = np.asarray(X.sum(0)).ravel()
    Pui = ssp.diags(1.0 / np.maximum(du, 1)) @ X
    Piu = ssp.diags(1.0 / np.maximum(di, 1)) @ X.T.tocsr()
    W = np.asarray((Piu @ Pui).todense(), np.float32)
    W /= np.power(np.maximum(di, 1), beta)[None, :].astype(np.float32)
    np.fill_diagonal(W, 0.0)
    if top < W.shape[1]:
        thr = -np.partition(-W, top - 1, axis=1)[:, top - 1:top]
        W[W < thr] = 0.0
    return standardise(np.asarray(X[users] @ W))


def seq_term(pu, pi, pts, users: np.ndarray, n: int, last: int, ahead: int = 10) -> np.ndarray:
    """Co-purchase in sequence: items bought within the next ``ahead`` first purchases."""
    order = np.lexsort((pts, pu))
    u, it = pu[order], pi[order]
    a_l, b_l = [], []
    for d in range(1, ahead + 1):
        same = u[:-d] == u[d:]
        a_l.append(it[:-d][same])
        b_l.append(it[d:][same])
    a, b = np.concatenate(a_l), np.concatenate(b_l)
    T = np.bincount(a * n + b, minlength=n * n).reshape(n, n).astype(np.float32)
    cnt = np.bincount(pi, minlength=n).astype(np.float32)
    T /= np.sqrt(np.maximum(cnt, 1))[:, None] * np.sqrt(np.maximum(cnt, 1))[None, :]
    np.fill_diagonal(T, 0.0)
    ptr, hit, _, hts = build_histories(users, pu, pi, np.ones(pu.size, np.int8), pts)
    out = np.zeros((users.size, n), np.float32)
    for r in range(users.size):
        h, t = hit[ptr[r]:ptr[r + 1]], hts[ptr[r]:ptr[r + 1]]
        if h.size:
            recent = h[np.argsort(-t, kind="stable")[:last]]
            out[r] = T[recent].sum(0)
    return standardise(out)


def terms(which, sp, items, users, n, n_users):
    """name -> [users, n] raw term (0 rows for users without positives)."""
    pu, pi = sp.positives()
    pts = sp.ts[sp.label == 1]
    X = binary_matrix(pu, pi, n_users, n)
    out = {}
    if "attr" in which:
        Xu = X[users]
        parts = {name: attr_term(Xu, codes(items, col)) for name, col in ATTRS.items()}
        for name, T in parts.items():
            out[f"attr:{name}"] = T
        out["attr:all"] = sum(parts.values())
    if "uknn" in which:
        for k in (20, 50, 100, 200):
            out[f"uknn{k}"] = uknn_term(X, users, k)
    if "uknnr" in which:  # recency-weighted queries (not in the default run)
        for h in (10.0, 30.0):
            out[f"uknn50 recent{h:g}"] = uknn_recent_term(X, pu, pi, pts, users, 50, h)
    if "uknnv" in which:  # similarity variants (not in the default run)
        out["uknn50 idf"] = uknn_variant_term(X, users, 50, True, 0.0)
        out["uknn50 shrink10"] = uknn_variant_term(X, users, 50, False, 10.0)
        out["uknn50 idf shrink10"] = uknn_variant_term(X, users, 50, True, 10.0)
    if "rp3" in which:
        for beta in (0.5,):
            out[f"rp3b{beta}"] = rp3_term(X, users, beta)
    if "seq" in which:
        for last in (3, 10):
            out[f"seq{last}"] = seq_term(pu, pi, pts, users, n, last)
    return out


def variant(name: str) -> tuple[dict, dict]:
    """``(config fields, selection constants)`` of a variant of the personal terms:
    ``plain`` (the product), ``knnrecent<h>`` (the query user's positives weighted
    ``0.5 ** (rank / h)`` in finding neighbours), ``iirecent<h>`` (the item-item history
    half-life forced to ``h``), ``iitie`` (the shortest half-life whose gain is within one
SE of the best, ``selection.RECENCY_TIE``), ``knnscale<f>`` (``delta`` tried only at ``f`` times its
    calibration); the weights are chosen by the fit as refresh does."""
    plain = {"RECENCY_TIE": False}  # the variants are changes of the plain user-kNN store
    for prefix, make in (("knnrecent", lambda v: ({"user_knn_recency": v}, plain)),
                         ("iirecent", lambda v: ({}, {"RECENCIES": (v,)})),
                         ("knnscale", lambda v: ({}, {**plain, "DELTA_STEPS": (v,)}))):
        if name.startswith(prefix):
            return make(float(name[len(prefix):]))
    if name == "iitie":  # the shortest half-life within one SE of the best (selection.RECENCY_TIE)
        return {}, {"RECENCY_TIE": True}
    if name == "plain":
        return {}, {"RECENCY_TIE": False}
    raise SystemExit(f"unknown variant {name!r}")


class patched:
    """Selection constants set for the duration of a ``with`` block."""

    def __init__(self, constants: dict):
        self.constants, self.saved = constants, {}

    def __enter__(self):
        for k, v in self.constants.items():
            self.saved[k] = getattr(selection, k)
            setattr(selection, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(selection, k, v)


def fit_variant(name: str, sp, csp):
    """The model as refresh fits it, with variant ``name`` (:func:`variant`)."""
    params, constants = variant(name)
    stats: dict = {}
    with patched(constants):
        score = bq.fit_dynstore(sp, csp, params, stats=stats)
    return score, stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=["attr", "uknn", "rp3", "seq"],
                    help="candidate families: attr uknn rp3 seq (and uknnr, uknnv)")
    ap.add_argument("--cuts", type=int, default=len(bq.ROLLING_CUTS))
    ap.add_argument("--households", default=str(bq.CJ_HOUSEHOLDS))
    ap.add_argument("--user-knn", type=int, default=None,
                    help="the base model's user-kNN neighbours (0: the store before that term; default: as configured)")
    ap.add_argument("--before", action="store_true",
                    help="also a row of the model without the user-kNN term (user_knn 0), paired with the base")
    ap.add_argument("--ref", default=None,
                    help="pair the gains with this variant's row instead of the base")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="rows of the model refit with a variant of its personal terms, paired with the base "
                         "(knnrecent<h>, iirecent<h>, knnscale<f>: see variant())")
    args = ap.parse_args(argv)
    cat, events, items, _, _ = bq.build_cj(bq._size(args.households), bq.CJ_PRODUCTS, bq.SEED)
    test = bq.temporal_split(events, cat.n_items, seed=bq.SEED)
    n = cat.n_items
    res: dict = {}  # name -> list of (ndcg all users per cut)
    ret_mask: list = []
    for c in bq.ROLLING_CUTS[:args.cuts]:
        t0 = time.time()
        sp = bq.rolling_split(test, n, c)
        csp = bq.for_split(cat, sp)
        pu, pi = sp.positives()
        users = np.unique(sp.test_user)
        ret = np.isin(users, pu)
        seen, rel = bq.seen_and_relevant(sp, users, pu, pi)

        def ndcg(S):
            return ndcg_per_user(top_k(np.asarray(S, np.float64), 10, seen), rel, 10)

        ret_mask.append(ret)
        res.setdefault("EASE", []).append(ndcg(peers.fit_ease(sp, n, EASE_LAM, 365)(users)))
        stats: dict = {}
        params = {} if args.user_knn is None else {"user_knn": args.user_knn}
        base = np.asarray(bq.fit_dynstore(sp, csp, params, stats=stats)(users), np.float32)
        res.setdefault("base", []).append(ndcg(base))
        if args.before:
            res.setdefault("user_knn 0 (before)", []).append(ndcg(bq.fit_dynstore(sp, csp, {"user_knn": 0})(users)))
        for v in args.variants:
            score, vstats = fit_variant(v, sp, csp)
            res.setdefault(f"variant {v}", []).append(ndcg(score(users)))
            print(f"  {v}: gamma {vstats.get('gamma')}, delta {vstats.get('delta')}", flush=True)
        t1 = time.time()
        n_users = int(max(sp.user.max(initial=0), users.max(initial=0))) + 1
        s_base = spread(base[ret])
        for name, T in terms(args.only, sp, items, users, n, n_users).items():
            s_t = spread(T[ret])
            if s_t <= 0:  # a term with ties at the top (attribute shares): its per-user spread instead
                s_t = float(np.median(T[ret].std(1)))
            cal = s_base / max(s_t, 1e-9)
            res.setdefault(f"{name} alone", []).append(ndcg(T))
            for w in WEIGHTS:
                res.setdefault(f"{name} w{w}", []).append(ndcg(base + (w * cal) * T))
        print(f"cut {c}: {ret.sum()} returning of {users.size} test users, gamma {stats.get('gamma')}, "
              f"delta {stats.get('delta')}, "
              f"fit {t1 - t0:.0f}s, terms {time.time() - t1:.0f}s", flush=True)
    ret = np.concatenate(ret_mask)
    b = np.concatenate(res[f"variant {args.ref}"] if args.ref else res["base"])
    e = np.concatenate(res["EASE"])
    print(f"\n{len(ret_mask)} cuts, {ret.size} user-periods ({ret.sum()} returning). NDCG@10 pooled; "
          f"gain = paired difference to {args.ref or 'the base'} ± SE; ratio to EASE")
    print(f"{'row':22s} {'returning':>9s} {'gain ± SE':>18s} {'xEASE':>6s}   {'overall':>8s} {'gain ± SE':>18s} {'xEASE':>6s}")
    for k, v in res.items():
        x = np.concatenate(v)
        cells = []
        for m in (ret, np.ones_like(ret)):
            d = x[m] - b[m]
            cells.append(f"{x[m].mean():9.4f} {d.mean():+9.4f} ±{d.std(ddof=1) / np.sqrt(d.size):.4f} "
                         f"{x[m].mean() / e[m].mean():5.3f}x")
        print(f"{k:22s} {cells[0]}   {cells[1]}")


if __name__ == "__main__":
    main()
