"""Ingest speed: dynstore vs writing the same rows straight to Lance.

Baseline (same run): ``lance.write_dataset`` on DuckDB's ``read_parquet``
Arrow stream. Queries (``GROUP BY event``, ``WHERE event = 'click'``, a join
with items by category) through a dynstore connection vs DuckDB on the raw
Parquet files, interleaved, medians.

    python benchmarks/bench_ingest.py --rows 1000000
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved query rounds (medians)")
    args = ap.parse_args()

    import duckdb
    import lance

    import dynstore
    from dynstore.samples import shop

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        frames = shop.generate(args.rows, seed=0)
        parquet = work / "interactions.parquet"
        frames["interactions"].write_parquet(parquet)
        n = frames["interactions"].height
        print(f"{n} interaction rows, {parquet.stat().st_size / 1e6:.1f} MB parquet; load average "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()))

        def baseline():
            out = work / "raw.lance"
            shutil.rmtree(out, ignore_errors=True)
            con = duckdb.connect()
            reader = con.sql(f"SELECT * FROM read_parquet('{parquet}')").to_arrow_reader(64 * 1024)
            lance.write_dataset(reader, out, mode="create", max_rows_per_file=4 * 1024 * 1024)

        def ours() -> float:
            d = work / "store"
            shutil.rmtree(d, ignore_errors=True)
            store = dynstore.init(d, model="fake")  # creating the store is not ingest
            t0 = time.perf_counter()
            store.ingest("interactions", parquet)
            return time.perf_counter() - t0

        t_base = best_of(baseline, args.repeat)
        t_ours = min(ours() for _ in range(args.repeat))
        print(f"ingest   lance.write_dataset: {t_base:.3f}s ({n / t_base:,.0f} rows/s)")
        print(f"ingest   dynstore ingest:     {t_ours:.3f}s ({n / t_ours:,.0f} rows/s)")
        print(f"ingest   ratio dynstore/baseline: {t_ours / t_base:.2f}x (target <= 1.3x)")

        items = work / "items.parquet"
        frames["items"].write_parquet(items)
        dynstore.connect(work / "store").ingest("items", items)
        raw = duckdb.connect()
        store = dynstore.connect(work / "store")
        con = store.connection()
        # (name, query over {i} interactions and {it} items)
        queries = [
            ("`SELECT event, count(*), avg(value) … GROUP BY event`",
             "SELECT event, count(*), avg(value) FROM {i} GROUP BY event"),
            ("`SELECT count(*), avg(value) … WHERE event = 'click'`",
             "SELECT count(*), avg(value) FROM {i} WHERE event = 'click'"),
            ("`… JOIN items USING (item_id) GROUP BY category`",
             "SELECT it.category, count(*), avg(x.value) FROM {i} x JOIN {it} it USING (item_id) GROUP BY it.category"),
        ]
        on_parquet = {"i": f"read_parquet('{parquet}')", "it": f"read_parquet('{items}')"}
        on_store = {"i": "interactions", "it": "items"}
        for _, q in queries:
            a = sorted(raw.sql(q.format(**on_parquet)).fetchall())
            b = sorted(con.sql(q.format(**on_store)).fetchall())
            assert [r[:2] for r in a] == [r[:2] for r in b] and all(
                abs(x[-1] - y[-1]) < 1e-9 * max(1.0, abs(x[-1])) for x, y in zip(a, b)), (q, a, b)
        # interleaved rounds (the machine may be shared): medians
        times: dict = {(n, w): [] for n, _ in queries for w in ("parquet", "store")}
        for _ in range(args.rounds):
            for name, q in queries:
                for who, c, names in (("parquet", raw, on_parquet), ("store", con, on_store)):
                    t0 = time.perf_counter()
                    c.sql(q.format(**names)).fetchall()
                    times[(name, who)].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name, _ in queries:
            t_raw, t_q = med[(name, "parquet")], med[(name, "store")]
            print(f"query    {name}: parquet {t_raw * 1000:.1f} ms; dynstore {t_q * 1000:.1f} ms; "
                  f"ratio {t_q / t_raw:.2f}x (target <= 2x)")
        print("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        print()
        print("| benchmark | dynstore | baseline | ratio | target |")
        print("|---|---|---|---|---|")
        print(f"| ingest {n:,} interactions (Parquet) | {t_ours:.2f} s | {t_base:.2f} s (lance.write_dataset) | "
              f"{t_ours / t_base:.2f}x | <= 1.3x |")
        for name, _ in queries:
            t_raw, t_q = med[(name, "parquet")], med[(name, "store")]
            print(f"| {name} | {t_q * 1000:.0f} ms | {t_raw * 1000:.0f} ms (DuckDB on Parquet) | "
                  f"{t_q / t_raw:.2f}x | <= 2x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
