"""Does a ``refresh`` across the shop sample's drift beat what it starts from?

The shop-sample path of ``bench_quality.py`` (``--dataset shop``: ``samples.shop.generate``,
80/20 split by time, the test period after the planted drift) without its peers: one
store gets the training rows before ``DRIFT_START`` and ``refresh --since all``
(version a), then the post-drift training rows and a second ``refresh --since all``
(version b). Printed: each refresh's ``kept_start`` and the gain ± standard error and
users of every choice (``training.selection``), then NDCG@10 / Recall@10 on the test
period of (a) served with the post-drift histories and of what is served after the
second refresh, paired per user (mean difference ± SE, users judged).

Run: ``python benchmarks/bench_drift.py [--size 100000] [--seed 0]``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_quality as bq  # noqa: E402


def choices(r) -> str:
    sel = (r.training or {}).get("selection", {})
    return "; ".join(f"{k} {v.get('chosen')} (gain {v.get('gain')} ±{v.get('se')}, {v.get('users')} users, "
                     f"best tried {v.get('best_tried')})" for k, v in sel.items())


def main(argv=None) -> int:
    from samples.shop import DRIFT_START

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default=bq.SHOP_SIZE)
    ap.add_argument("--seed", type=int, default=bq.SEED)
    args = ap.parse_args(argv)
    cat, slog, items, users, _ = bq.build_shop(args.size, args.seed)
    test, train_rows = bq.shop_split(slog, np.arange(len(slog)), cat.n_items, seed=args.seed)
    drift_us = int(np.datetime64(DRIFT_START, "us").astype(np.int64))
    ts = slog.ts_us[train_rows]
    pre, post = train_rows[ts < drift_us], train_rows[ts >= drift_us]
    print(f"shop {args.size} seed {args.seed}: {pre.size} pre-drift + {post.size} post-drift training rows, "
          f"test {len(np.unique(test.test_user))} users", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    try:
        store = bq.bench_store(work / "s", cat, bq.StoreInput(init={}, items=items, users=users))
        store.ingest("interactions", slog.rows(pre))
        store.encode()
        out = {}
        for name, rows in (("pre-drift", None), ("post-drift", post)):
            if rows is not None:
                store.ingest("interactions", slog.rows(rows))
            t0 = time.perf_counter()
            r = store.refresh(since="all")
            served = next(v["version"] for v in store.versions() if v["status"] == "current")
            out[name] = {"version": r.version, "status": r.status, "kept_start": r.kept_start, "served": served,
                         "training": r.training, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{name} refresh: v{r.version} {r.status}, kept_start {r.kept_start}, serving v{served} "
                  f"({out[name]['seconds']} s); {choices(r)}", flush=True)
            if rows is None:
                va = served
        a = bq.evaluate_scorer(bq.store_scorer(store, cat, va), test, cat.n_items)
        b = bq.evaluate_scorer(bq.store_scorer(store, cat, out["post-drift"]["served"]), test, cat.n_items)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n| segment | v{va} (pre-drift version, new histories) | served after the post-drift refresh "
          f"| difference (paired) | users |\n|---|---|---|---|---|")
    for seg in ("overall", "cold items", "returning users", "new users"):
        for m in ("ndcg", "recall"):
            x, y = a[seg]["per_user"][m], b[seg]["per_user"][m]
            (mx, sx), (my, sy), (d, sd) = bq.mean_se(x), bq.mean_se(y), bq.mean_se(y - x)
            print(f"| {seg} {m}@10 | {mx:.4f} ±{sx:.4f} | {my:.4f} ±{sy:.4f} | {d:+.4f} ±{sd:.4f} | {len(x)} |")
    print(json.dumps(out, default=str)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
