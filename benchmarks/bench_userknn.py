"""What the user-kNN term costs at serving time, against the rest of the score.

The user-kNN term (``dynstore/model/userknn.py``, weight ``delta``) scores a user against
every user's positives. This script builds synthetic pools (Zipf-distributed items, so a
few items are picked by many users, as in real logs) and times, in one process:

* ``Pool.build``: indexing the positives by item, what the first ``recommend`` of a
  serving state does once when ``delta`` > 0;
* the term for 1 user and for a batch of 100 users (a ``score-all`` batch);
* the baseline: the dot-product part of the same users' logits (``X @ Wf.T``, 384
  dimensions, every item), which every version pays.

It prints the seconds and the ratio kNN / dot product. Run (from the repository root)::

    python benchmarks/bench_userknn.py
    python benchmarks/bench_userknn.py --sizes 100000:20:50000 1000000:10:100000
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from dynstore.model.userknn import Pool, user_knn_scores


def timed(fn, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(n_users: int, per_user: int, n_items: int, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    nnz = n_users * per_user
    ptr = np.arange(0, nnz + 1, per_user, dtype=np.int64)
    item = (rng.zipf(1.3, nnz) - 1) % n_items
    t = time.perf_counter()
    pool = Pool.build(ptr, item, n_items)
    build = time.perf_counter() - t
    rows = np.arange(batch)
    qp = np.concatenate([[0], np.cumsum(np.diff(pool.ptr[:batch + 1]))]).astype(np.int64)
    qi = pool.item[:pool.ptr[batch]]
    X = rng.normal(size=(batch, 384)).astype(np.float32)
    Wf = rng.normal(size=(n_items, 384)).astype(np.float32)
    one = timed(lambda: user_knn_scores(pool, qp[:2], qi[:qp[1]], k=50, self_rows=rows[:1]))
    many = timed(lambda: user_knn_scores(pool, qp, qi, k=50, self_rows=rows), rounds=1)
    dot1 = timed(lambda: X[:1] @ Wf.T)
    dotm = timed(lambda: X @ Wf.T)
    return {"users": n_users, "positives": nnz, "items": n_items, "build_s": build,
            "one_s": one, "one_ratio": one / dot1, "batch": batch, "batch_s": many, "batch_ratio": many / dotm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["100000:20:50000", "1000000:10:100000"],
                    help="USERS:POSITIVES_PER_USER:ITEMS, one or more")
    ap.add_argument("--batch", type=int, default=100)
    a = ap.parse_args()
    print("| users | positives | items | Pool.build | kNN, 1 user (x dot product) | kNN, batch (x dot product) |")
    print("|---|---|---|---|---|---|")
    for size in a.sizes:
        u, p, n = (int(x) for x in size.split(":"))
        r = run(u, p, n, a.batch)
        print(f"| {r['users']:,} | {r['positives']:,} | {r['items']:,} | {r['build_s']:.2f} s | "
              f"{r['one_s'] * 1000:.1f} ms ({r['one_ratio']:.0f}x) | {r['batch']}: {r['batch_s']:.2f} s "
              f"({r['batch_ratio']:.0f}x) |", flush=True)


if __name__ == "__main__":
    main()
