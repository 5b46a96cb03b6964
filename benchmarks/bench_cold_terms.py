"""Candidate cold-item terms on top of what refresh fits, rolling cuts of both data sets.

For each of ``bench_quality``'s five rolling cuts: the model as refresh fits it
(``bench_quality.fit_dynstore``: rule + learned weights + item-item and user-kNN terms
at the weights chosen on its pooled cuts + content prior) gives the base logits; ONE
candidate term at a time is added to the cold items' columns (items without training
events; warm items' logits unchanged) as ``w * c * T``: ``T`` standardised per user over
the cold items (zero mean, unit standard deviation; 0 for users without a positive),
``c`` the calibration refresh uses for ``gamma`` (median spread of the top-10 base
logits over that of the term, both on the cold columns of the returning users) and ``w``
a small grid (``z`` rows; ``le0`` rows: the same term shifted per user so its largest
value is 0 -- cold items only move down, their order among themselves is the ``z`` row's;
a term whose top-10 ties (identical documents: ``max`` = 1) is calibrated by its per-user
standard deviation instead). Candidates, for cold item ``i`` and the user's training positives ``j``:

* ``text <agg>`` -- MiniLM cosine ``sim(i, j)`` aggregated over ``j`` by ``sum``,
  ``max`` or ``top3`` (mean of the three largest);
* ``fused <agg>`` -- the same with the fused item vectors ``w_i`` of the fitted model
  (``FusionModel.item_side``).

Prints, per candidate and weight, NDCG@10 pooled over the cold-item user-periods
(candidates: cold items only, as ``bench_quality``) and over all user-periods, each with
the paired gain over the base ± SE. The weight is the best in hindsight: an upper bound
on what a pooled selection in refresh could choose; the last block chooses it without
hindsight (on the earlier cuts pooled, applied at the next: :func:`forward`).

Run (from the repository root; data as for bench_quality)::

    nice python benchmarks/bench_cold_terms.py cj --before    # docs/model.md's table (2-4 min)
    nice python benchmarks/bench_cold_terms.py ml --before [--cuts 3]

``--before`` empties the store's own text-neighbour weight grid (``eta`` 0), the model
these candidates were measured on before the term was built, and adds the row "store's
eta as chosen" (the model with the term, its weight chosen as refresh does, paired);
without it the base is the store as it is now (its ``eta`` chosen per cut).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

import dynstore.model.selection as selection  # noqa: E402

from dynstore.model.fusion import FusionModel  # noqa: E402
from dynstore.model.histories import build_histories  # noqa: E402
from dynstore.model.metrics import ndcg_per_user, top_k  # noqa: E402

WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
AGGS = ("sum", "max", "top3")
SHIFTS = ("z", "le0")  # z: zero mean per user; le0: shifted so that its largest value is 0


def spread(M: np.ndarray) -> float:
    n = M.shape[1]
    k = min(10, n)
    top = np.sort(np.partition(M, n - k, axis=1)[:, n - k:], axis=1)
    return float(np.median(top[:, -1] - top[:, 0]))


def unit(V: np.ndarray) -> np.ndarray:
    V = np.asarray(V, np.float32)
    return V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-9)


def neighbour_terms(V: np.ndarray, ptr, hit, cold_idx: np.ndarray) -> dict:
    """agg -> [m, n_cold] of cosine(cold item, the user's positives), standardised per user."""
    Vn = unit(V)
    C = Vn[cold_idx]
    m = ptr.size - 1
    out = {a: np.zeros((m, cold_idx.size), np.float32) for a in AGGS}
    for r in range(m):
        h = hit[ptr[r]:ptr[r + 1]]
        if not h.size:
            continue
        S = Vn[np.unique(h)] @ C.T  # [|P_u|, n_cold]
        out["sum"][r] = S.sum(0)
        out["max"][r] = S.max(0)
        k = min(3, S.shape[0])
        out["top3"][r] = -np.partition(-S, k - 1, axis=0)[:k].mean(0)
    for a, T in out.items():
        sd = T.std(1, keepdims=True)
        out[a] = np.divide(T - T.mean(1, keepdims=True), sd, out=np.zeros_like(T), where=sd > 0)
    return out


class capture:
    """Records the model ``fit_dynstore`` scores with (its last ``scorer`` call)."""

    def __enter__(self):
        self.orig, self.model = FusionModel.scorer, None
        me = self

        def scorer(model, data, residuals=None):
            me.model, me.residuals = model, residuals
            return me.orig(model, data, residuals)

        FusionModel.scorer = scorer
        return self

    def __exit__(self, *exc):
        FusionModel.scorer = self.orig


def load(ds: str, ml_path: str):
    if ds == "cj":
        cat, events, *_ = bq.build_cj(bq.CJ_HOUSEHOLDS, bq.CJ_PRODUCTS, bq.SEED)
    else:
        cat, events, *_ = bq.build(Path(ml_path))
    return cat, bq.temporal_split(events, cat.n_items, seed=bq.SEED)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dataset", choices=("cj", "ml"))
    ap.add_argument("--cuts", type=int, default=len(bq.ROLLING_CUTS))
    ap.add_argument("--before", action="store_true",
                    help="the base without the store's own text-neighbour term (its weight grid emptied: eta 0), "
                         "as docs/model.md's table was measured")
    ap.add_argument("--ml-path", default=str(bq.ROOT.parent / "shared/data/ml-latest-small"))
    args = ap.parse_args(argv)
    eta_steps = selection.ETA_STEPS
    if args.before:
        selection.ETA_STEPS = ()
    cat, test = load(args.dataset, args.ml_path)
    n = cat.n_items
    res: dict = {}  # name -> [(cold per-user ndcg, overall per-user ndcg)] per cut
    for c in bq.ROLLING_CUTS[:args.cuts]:
        t0 = time.time()
        sp = bq.rolling_split(test, n, c)
        csp = bq.for_split(cat, sp)
        pu, pi = sp.positives()
        users = np.unique(sp.test_user)
        ret = np.isin(users, pu)
        seen, rel = bq.seen_and_relevant(sp, users, pu, pi)
        cold = sp.cold
        cold_idx = np.flatnonzero(cold)
        rel_cold = [r[cold[r]] for r in rel]

        def score(S):
            S = np.asarray(S, np.float64)
            Sc = S.copy()
            Sc[:, ~cold] = -np.inf
            return (ndcg_per_user(top_k(Sc, 10, seen), rel_cold, 10),
                    ndcg_per_user(top_k(S, 10, seen), rel, 10))

        with capture() as cap:
            base = np.asarray(bq.fit_dynstore(sp, csp)(users), np.float32)
        res.setdefault("base", []).append(score(base))
        if args.before:  # the store with its own term, as refresh chooses its weight, paired
            selection.ETA_STEPS = eta_steps
            stats: dict = {}
            res.setdefault("store's eta as chosen", []).append(score(bq.fit_dynstore(sp, csp, stats=stats)(users)))
            selection.ETA_STEPS = ()
        Wf, _ = cap.model.item_side(csp.V, csp.A, cap.residuals)
        ptr, hit, _, _ = build_histories(users, pu, pi, np.ones(pu.size, np.int8), np.zeros(pu.size, np.int64))
        s_base = spread(base[ret][:, cold_idx])
        for vname, V in (("text", csp.V), ("fused", Wf)):
            for agg, T in neighbour_terms(V, ptr, hit, cold_idx).items():
                s_t = spread(T[ret])
                if s_t < 1e-3:  # ties at the top (identical documents: max = 1): the per-user spread instead
                    s_t = float(np.median(T[ret].std(1)))
                cal = s_base / max(s_t, 1e-9)
                for shift in SHIFTS:
                    Ts = T - T.max(1, keepdims=True) if shift == "le0" else T
                    for w in WEIGHTS:
                        S = base.copy()
                        S[:, cold_idx] += (w * cal) * Ts
                        res.setdefault(f"{vname} {agg} {shift} w{w:g}", []).append(score(S))
        print(f"cut {c}: {users.size} test users ({ret.sum()} returning), {cold_idx.size} cold items, "
              f"{sum(1 for r in rel_cold if r.size)} with a cold positive, {time.time() - t0:.0f}s", flush=True)
    bc = np.concatenate([x[0] for x in res["base"]])
    bo = np.concatenate([x[1] for x in res["base"]])
    print(f"\n{args.dataset}: {len(res['base'])} cuts; cold items {bc.size} user-periods, overall {bo.size}. "
          "NDCG@10 pooled; gain = paired difference to the base ± SE")
    print(f"{'row':22s} {'cold':>7s} {'gain':>8s} {'± SE':>7s}  {'z':>5s}   {'overall':>7s} {'gain':>8s} {'± SE':>7s}")
    for k, v in res.items():
        xc = np.concatenate([x[0] for x in v])
        xo = np.concatenate([x[1] for x in v])
        dc, do = xc - bc, xo - bo
        sc = dc.std(ddof=1) / np.sqrt(dc.size)
        so = do.std(ddof=1) / np.sqrt(do.size)
        print(f"{k:22s} {xc.mean():7.4f} {dc.mean():+8.4f} ±{sc:.4f}  {dc.mean() / max(sc, 1e-12):5.2f}   "
              f"{xo.mean():7.4f} {do.mean():+8.4f} ±{so:.4f}")
    forward(res)


def forward(res: dict) -> None:
    """Per candidate family, the weight chosen on the earlier cuts pooled (largest cold-item
    gain whose overall gain is not below -1 SE; 0 when none is positive), applied at the
    next cut: cuts 2..N pooled, paired with the base -- what a pooled selection in refresh
    would have served, without hindsight."""
    n_cuts = len(res["base"])
    if n_cuts < 2:
        return
    fams = sorted({k.rsplit(" w", 1)[0] for k in res if " w" in k})
    print(f"\nforward-chained choice (weight chosen on cuts < k, applied at cut k; cuts 2..{n_cuts} pooled)")
    for fam in fams:
        rows = {float(k.rsplit(" w", 1)[1]): v for k, v in res.items() if k.startswith(fam + " w")}
        got_c, got_o, base_c, base_o, picks = [], [], [], [], []
        for k in range(1, n_cuts):
            bc = np.concatenate([res["base"][j][0] for j in range(k)])
            bo = np.concatenate([res["base"][j][1] for j in range(k)])
            best, best_gain = None, 0.0
            for w, v in rows.items():
                dc = np.concatenate([v[j][0] for j in range(k)]) - bc
                do = np.concatenate([v[j][1] for j in range(k)]) - bo
                if do.mean() < -do.std(ddof=1) / np.sqrt(do.size) or dc.mean() <= best_gain:
                    continue
                best, best_gain = w, dc.mean()
            picks.append(best or 0)
            pick = res["base"][k] if best is None else rows[best][k]
            got_c.append(pick[0]); got_o.append(pick[1])
            base_c.append(res["base"][k][0]); base_o.append(res["base"][k][1])
        dc = np.concatenate(got_c) - np.concatenate(base_c)
        do = np.concatenate(got_o) - np.concatenate(base_o)
        sc, so = dc.std(ddof=1) / np.sqrt(dc.size), do.std(ddof=1) / np.sqrt(do.size)
        print(f"{fam:18s} picks {picks}: cold {np.concatenate(got_c).mean():.4f} {dc.mean():+.4f} ±{sc:.4f} "
              f"({dc.size}), overall {do.mean():+.4f} ±{so:.4f} ({do.size})")


if __name__ == "__main__":
    main()
