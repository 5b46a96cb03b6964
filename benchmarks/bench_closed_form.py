"""Rolling-origin NDCG@10 per segment with paired standard errors (issue 22's figures).

Runs ``bench_quality``'s rolling cuts on ml-latest-small for each variant (name ->
``fit_dynstore`` parameters; ``force_beta`` / ``force_gamma_step`` force a closed-form
weight instead of refresh's pooled choice) and prints every segment's pooled NDCG@10 with
the paired difference against the first variant, its standard error and the number of
user-periods. Item texts carry no tags (nothing written after a cut leaks in).

Run (from the repository root; the data set is never committed)::

    python benchmarks/bench_closed_form.py '{"rule": {"rule": true}, "cf": {"epochs": -1}, "model": {}}' 5 OUT.json
    python benchmarks/bench_closed_form.py '{"rule": {"rule": true}, "ii only": {"epochs": -1, "content_prior": false}}'
"""
import json, os, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq
from dynstore.model.metrics import ndcg_per_user, top_k

variants = json.loads(sys.argv[1])
ncuts = int(sys.argv[2]) if len(sys.argv) > 2 else 5
out_file = sys.argv[3] if len(sys.argv) > 3 else None
orig = bq.load_movielens
bq.load_movielens = lambda p: (*orig(p)[:2], None)
cat, events, how, spec = bq.build(Path(os.environ.get("MOVIELENS", "/work/shared/data/ml-latest-small")))
test = bq.temporal_split(events, cat.n_items, seed=0)
K = 10
SEGS = ["overall", "warm items", "cold items", "returning users", "new users"]
per = {v: {s: [] for s in SEGS} for v in variants}
def seg_scores(S, sp):
    pu, pi = sp.positives()
    nu = int(max(sp.user.max(initial=0), sp.test_user.max(initial=0))) + 1
    ret = np.zeros(nu, bool); ret[pu] = True
    users = np.unique(sp.test_user)
    seen_l, rel = bq.seen_and_relevant(sp, users, pu, pi)
    cold = sp.cold
    rk = top_k(S, K, seen_l); Sc = S.copy(); Sc[:, ~cold] = -np.inf; rkc = top_k(Sc, K, seen_l)
    r = ret[users]
    res = {}
    def put(name, ranked, rl, mask):
        rl = [x if m else x[:0] for x, m in zip(rl, mask)]
        nd = ndcg_per_user(ranked, rl, K)
        keep = np.array([x.size > 0 for x in rl])
        res[name] = (users[keep], nd)
    al = np.ones(users.size, bool)
    put("overall", rk, rel, al); put("warm items", rk, [x[~cold[x]] for x in rel], al)
    put("cold items", rkc, [x[cold[x]] for x in rel], al)
    put("returning users", rk, rel, r); put("new users", rk, rel, ~r)
    return res
cuts = bq.ROLLING_CUTS[:ncuts]
for c in cuts:
    sp = bq.rolling_split(test, cat.n_items, c)
    for v, params in variants.items():
        t0 = time.perf_counter(); st = {}
        from dynstore.model import selection as sel
        params = dict(params); fb = params.pop("force_beta", None); fg = params.pop("force_gamma_step", None)
        orig_best = sel.best
        def forced(grid, z):
            keys = list(grid)
            if fb is not None and keys and all(k in sel.BETAS for k in keys):
                return fb
            if fg is not None and keys and not all(k in sel.BETAS for k in keys):
                return keys[list(sel.GAMMA_STEPS).index(fg)]
            return orig_best(grid, z)
        sel.best = forced
        try:
            score = bq.fit_dynstore(sp, cat, params, stats=st)
        finally:
            sel.best = orig_best
        users = np.unique(sp.test_user)
        S = score(users).astype(np.float64)
        for s, (u, nd) in seg_scores(S, sp).items():
            per[v][s].append(nd)
        print(f"cut {c} {v}: {time.perf_counter()-t0:.1f}s {st}", flush=True)
names = list(variants)
base = names[0]
print(f"\nrolling origin, {len(cuts)} cuts, NDCG@10 pooled (mean, se, n user-periods); diff vs {base!r} paired")
summary = {}
for s in SEGS:
    line = [f"{s:16s}"]
    b = np.concatenate(per[base][s])
    for v in names:
        x = np.concatenate(per[v][s])
        d = x - b
        se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
        line.append(f"{v}: {x.mean():.4f} (d {d.mean():+.4f} ± {se:.4f}, n {x.size})")
        summary.setdefault(v, {})[s] = {"ndcg": float(x.mean()), "diff": float(d.mean()), "se": float(se), "n": int(x.size)}
    print(" | ".join(line))
if out_file:
    Path(out_file).write_text(json.dumps(summary, indent=1))
