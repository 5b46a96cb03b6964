"""Recommendation speed: all users through SQL vs a numpy brute force.

Builds a store with N items (d = 384; the fake encoder stands in for MiniLM,
since this measures scoring, not encoding) and M users with histories, then
times ``SELECT user_id, recommend(user_id, 10) FROM users`` against numpy on
the same user and item matrices (matrix product, seen-item exclusion,
``argpartition``, sort) in the same run, checks the top-10 lists are
identical, and reports single-user latency p50/p99 through the API and SQL.

    python benchmarks/bench_recommend.py --users 20000 --items 50000
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--history", type=int, default=10, help="positives per user")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--latency-queries", type=int, default=200)
    args = ap.parse_args()

    import polars as pl
    import torch

    import dynstore
    from dynstore.recommend import serving_state, user_vectors

    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bench-rec-"))
    try:
        store = dynstore.init(work / "s", model=f"fake:{args.dim}")
        words = np.array([f"w{i}" for i in range(5000)])
        titles = [" ".join(words[rng.integers(0, 5000, 8)]) for _ in range(args.items)]
        store.ingest("items", pl.DataFrame({"item_id": np.arange(1, args.items + 1), "title": titles,
                                            "category": rng.choice(["a", "b", "c", "d"], args.items)}))
        n = args.users * args.history
        store.ingest("interactions", pl.DataFrame({
            "user_id": np.repeat(np.arange(1, args.users + 1), args.history),
            "item_id": rng.integers(1, args.items + 1, n),
            "ts": np.datetime64("2025-01-01T00:00:00", "us") + (rng.integers(0, 86400 * 60, n) * 1_000_000).astype("timedelta64[us]"),
            "value": np.ones(n)}))
        store.ingest("users", pl.DataFrame({"user_id": np.arange(1, args.users + 1)}))
        t0 = time.perf_counter()
        store.encode()
        print(f"setup: {args.items} items encoded (fake:{args.dim}) in {time.perf_counter() - t0:.1f}s")
        con = store.connection()
        con.sql("SELECT recommend(1, 10)").fetchall()  # loads the version once per process

        t0 = time.perf_counter()
        rows = con.sql("SELECT user_id, recommend(user_id, 10) AS r FROM users").fetchall()
        t_sql = time.perf_counter() - t0

        # The baseline gets the same matrices dynstore serves from.
        state = serving_state(store)
        users = [r[0] for r in rows]
        X = user_vectors(state, users)
        W, b = state.Wf, state.bias
        pos_rows = [state.user_row.get(u, -1) for u in users]
        torch_threads = torch.get_num_threads()

        def numpy_topk():
            out = []
            for s in range(0, len(users), 512):
                S = X[s:s + 512] @ W.T + b
                for j, r in enumerate(pos_rows[s:s + 512]):
                    if r >= 0:
                        S[j, state.pos_item[state.pos_ptr[r]:state.pos_ptr[r + 1]]] = -np.inf
                top = np.argpartition(-S, 10, axis=1)[:, :10]
                vals = np.take_along_axis(S, top, 1)
                order = np.argsort(-vals, axis=1, kind="stable")
                out.extend(np.take_along_axis(top, order, 1))
            return out

        t0 = time.perf_counter()
        base = numpy_topk()
        t_np = time.perf_counter() - t0
        same = sum([state.ids[c] for c in base[n_]] == [x["item_id"] for x in rows[n_][1]] for n_ in range(len(rows)))
        print(f"all users via SQL: {t_sql:.2f}s ({len(users) / t_sql:,.0f} users/s); numpy brute force: {t_np:.2f}s; "
              f"ratio {t_sql / t_np:.2f}x (target <= 1.5x); identical top-10 lists: {same}/{len(rows)} "
              f"(torch threads {torch_threads})")

        lat_api, lat_sql = [], []
        for u in rng.integers(1, args.users + 1, args.latency_queries):
            t0 = time.perf_counter()
            store.recommend(int(u), 10)
            lat_api.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            con.sql(f"SELECT recommend({int(u)}, 10)").fetchall()
            lat_sql.append(time.perf_counter() - t0)
        p = lambda xs, q: 1000 * float(np.percentile(xs, q))  # noqa: E731
        print(f"single user at {args.items} items: API p50 {p(lat_api, 50):.1f} ms, p99 {p(lat_api, 99):.1f} ms; "
              f"SQL p50 {p(lat_sql, 50):.1f} ms, p99 {p(lat_sql, 99):.1f} ms")
        print()
        print("| benchmark | dynstore | baseline | ratio | target |")
        print("|---|---|---|---|---|")
        print(f"| all {args.users:,} users x {args.items:,} items, d={args.dim}, top-10 via SQL | {t_sql:.2f} s | "
              f"{t_np:.2f} s (numpy) | {t_sql / t_np:.2f}x | <= 1.5x, identical lists ({same}/{len(rows)}) |")
        print(f"| one user, {args.items:,} items (API / SQL) | p50 {p(lat_api, 50):.1f} / {p(lat_sql, 50):.1f} ms, "
              f"p99 {p(lat_api, 99):.1f} / {p(lat_sql, 99):.1f} ms | | | |")
        con.close()
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
