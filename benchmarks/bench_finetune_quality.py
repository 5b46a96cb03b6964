"""Issue 22 item 5(b): ``refresh --finetune-encoder``, with and without, on a real data set.

The single split of ``bench_quality.py`` (80/20 temporal, 10 % of the test-positive
items forced cold, documents built for the split so nothing written after the cut
leaks in): the same store (``ingest``, ``encode`` from the benchmark's MiniLM cache,
``refresh --since all``) twice, once plain and once with ``finetune_encoder`` for a
bounded number of steps; each scored through the serving path and judged on the same
test users, so every segment's difference is paired per user (mean ± standard error,
users judged). Bounded for a CPU: ``--steps`` fine-tuning steps of 32 events (refresh's
own default on a CPU is one pass over the positives, at most 60 steps), the last 2
layers of MiniLM trained; the fine-tuned encoder then re-encodes every item (that is
most of the cost on MovieLens' 9,742 documents).

Run: ``python benchmarks/bench_finetune_quality.py --dataset completejourney --steps 20``
(``--dataset movielens`` reads ``../shared/data/ml-latest-small``; ``--rolling``: the five
rolling-origin cuts of ``bench_quality.py`` instead, pooled; ``--json OUT``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_quality as bq  # noqa: E402

SEGMENTS = ("overall", "warm items", "cold items", "returning users", "new users")


def load(dataset: str, args) -> tuple:
    """``(catalogue, events, store input maker)`` of ``dataset``."""
    if dataset == "movielens":
        cat, events, _, _ = bq.build(Path(args.movielens))
        return cat, events, bq.movielens_store_input
    cat, events, items, users, _ = bq.build_cj(args.cj_households, args.cj_products, args.seed)
    return cat, events, bq.cj_store_input(items, users)


def splits(cat, events, args):
    """The single split, or (``--rolling``) bench_quality's five forward-chained cuts."""
    test = bq.temporal_split(events, cat.n_items, seed=args.seed)
    if not args.rolling:
        return [test]
    out = []
    for c in bq.ROLLING_CUTS:
        out.append(bq.rolling_split(test, cat.n_items, c))
    return out


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``b - a`` over the same users and its standard error."""
    return bq.mean_se(np.asarray(b, np.float64) - np.asarray(a, np.float64))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("movielens", "completejourney"), default="completejourney")
    ap.add_argument("--movielens", default=str(bq.ROOT.parent / "shared/data/ml-latest-small"))
    ap.add_argument("--cj-households", type=int, default=bq.CJ_HOUSEHOLDS)
    ap.add_argument("--cj-products", type=int, default=bq.CJ_PRODUCTS)
    ap.add_argument("--seed", type=int, default=bq.SEED)
    ap.add_argument("--steps", type=int, default=20, help="fine-tuning steps of 32 events")
    ap.add_argument("--rolling", action="store_true",
                    help="bench_quality's five forward-chained cuts, per-user values pooled (user-periods)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    cat_all, events, make = load(args.dataset, args)
    runs, stats, secs = {"without": [], "with": []}, {"without": [], "with": []}, {"without": [], "with": []}
    for test in splits(cat_all, events, args):
        cat = bq.for_split(cat_all, test)
        data = make(test, cat)
        print(f"{args.dataset}: {cat.n_items} items, test {len(np.unique(test.test_user))} users, "
              f"{int(test.cold.sum())} cold items", flush=True)
        for name, opts in (("without", {}), ("with", {"finetune_encoder": True, "finetune_steps": args.steps})):
            st: dict = {}
            t0 = time.perf_counter()
            score = bq.fit_dynstore_store(test, cat, data=data, refresh_options=opts, stats=st)
            runs[name].append(bq.evaluate_scorer(score, test, cat.n_items))
            secs[name].append(round(time.perf_counter() - t0, 1))
            stats[name].append(st)
            print(f"{name} --finetune-encoder: {secs[name][-1]} s, status {st['status']}, kept_start "
                  f"{st['kept_start']}, durations {st['durations']}", flush=True)
    res = {name: bq.pool(r) for name, r in runs.items()}
    out = {"dataset": args.dataset, "steps": args.steps, "rolling": args.rolling, "seconds": secs,
           "refresh": stats if args.rolling else {k: v[0] for k, v in stats.items()}, "segments": {}}
    print(f"\n| segment (NDCG@10) | without | with | with - without (paired) | users |\n|---|---|---|---|---|")
    for seg in SEGMENTS:
        a, b = res["without"][seg]["per_user"]["ndcg"], res["with"][seg]["per_user"]["ndcg"]
        (ma, sa), (mb, sb), (d, sd) = bq.mean_se(a), bq.mean_se(b), paired(a, b)
        out["segments"][seg] = {"without": [ma, sa], "with": [mb, sb], "gain": [d, sd], "users": int(len(a))}
        print(f"| {seg} | {ma:.4f} ±{sa:.4f} | {mb:.4f} ±{sb:.4f} | {d:+.4f} ±{sd:.4f} | {len(a)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
