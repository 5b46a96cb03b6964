"""Vector-index settings at scale: latency of one user's ``recommend`` and recall@10 vs exact.

Runs against a store built once (e.g. the 1M-item store of ``bench_recommend.py``'s
index run, kept on disk) and re-creates only the index of its current version with
each setting of the grid: index type, partitions, PQ sub-vectors, then for each
built index the search settings (nprobes, candidates rescored exactly, Lance's
refine_factor, HNSW ef) without rebuilding. Per row: p50/p99 of the whole API call
``store.recommend(user, 10)`` in a warm process, p50 of the raw Lance query
(``ds.to_table(nearest=...)``) it makes, and recall@10 against ``exact=True`` (the
full score, every term). The load average is printed with every figure.

    python benchmarks/bench_index_grid.py /tmp/idx/store --only sq,pq50,flat
    python benchmarks/bench_index_grid.py /tmp/idx/store --only default   # build_index's own settings

The store: ``bench_recommend.py``'s 1M-item catalogue (2,000 users with 10 positives,
fake:384 encoder, ``index_min_items`` at 1M), built once and kept.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")

import numpy as np

# name -> (build settings, [search settings]); partitions "sqrt" = sqrt(n)
GRID = {
    "flat": ({"index_type": "IVF_FLAT"},
             [{"nprobes": p} for p in (10, 20, 50, 200)]),
    "pq50": ({"index_type": "IVF_PQ", "num_sub_vectors": 50},
             [{"nprobes": p, "candidates": c} for p in (10, 20, 40) for c in (50, 100, 200, 400)]
             + [{"nprobes": 20, "candidates": 10, "refine_factor": r} for r in (10, 20)]),
    "pq100": ({"index_type": "IVF_PQ", "num_sub_vectors": 100},
              [{"nprobes": p, "candidates": c} for p in (10, 20, 40) for c in (50, 100, 200)]),
    "pq25": ({"index_type": "IVF_PQ", "num_sub_vectors": 25},
             [{"nprobes": p, "candidates": c} for p in (10, 20, 40) for c in (100, 200, 400)]),
    "sq": ({"index_type": "IVF_SQ"},
           [{"nprobes": p, "candidates": c} for p in (10, 20, 40) for c in (10, 100)]),
    "hnsw_sq": ({"index_type": "IVF_HNSW_SQ", "num_partitions": 64},
                [{"nprobes": p, "ef": e, "candidates": 100} for p in (2, 4, 8) for e in (50, 150)]),
}


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def load():
    return "load %.2f %.2f %.2f" % os.getloadavg()


def build_store(path: Path, n_items: int, n_users: int = 2000, history: int = 10, dim: int = 384) -> None:
    """The catalogue of ``bench_recommend.py``'s index run: 300 topics with their own
    vocabularies (item vectors cluster as real ones do), fake:384 encoder."""
    from bench_recommend import generated_store

    t0 = time.perf_counter()
    store = generated_store(path, n_items, n_users, np.random.default_rng(0), history=history, dim=dim,
                            index_min_items=n_items)
    print(f"store built: {n_items} items in {time.perf_counter() - t0:.0f} s ({load()})", flush=True)
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("--only", default=",".join(GRID), help="comma-separated grid entries")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--partitions", type=int, default=0, help="IVF partitions (0: sqrt(n))")
    ap.add_argument("--reuse", action="store_true", help="search the index on disk (built by the entry) as is")
    ap.add_argument("--build-items", type=int, default=1_000_000,
                    help="catalogue size of the store built when STORE does not exist")
    ap.add_argument("--out", type=Path, default=None, help="append result rows (JSON lines) here")
    args = ap.parse_args()

    import lance

    import dynstore
    from dynstore.serving.recommend import serving_state, user_vectors
    from dynstore.serving.state import row_starts
    from dynstore.versions.index import INDEX_PAD, build_index, create_vector_index, index_settings

    if not args.store.exists():
        build_store(args.store, args.build_items)
    store = dynstore.connect(args.store)
    state = serving_state(store.catalog)
    version = state.version
    uri = store.catalog.index_uri(version)
    rng = np.random.default_rng(1)
    known = np.array(list(state.user_row.base))
    users = [int(u) for u in rng.choice(known, args.warmup + args.users, replace=False)]
    warm, timed = users[:args.warmup], users[args.warmup:]

    ref_file = args.store / f"exact_v{version}.json"
    if ref_file.exists():
        ref = {int(k): v for k, v in json.loads(ref_file.read_text()).items()}
    else:
        lat = []
        ref = {}
        for u in timed:
            t0 = time.perf_counter()
            ref[u] = [r["item_id"] for r in store.recommend(u, 10, exact=True)]
            lat.append(time.perf_counter() - t0)
        ref_file.write_text(json.dumps(ref))
        print(f"exact: p50 {pct(lat, 50):.1f} ms p99 {pct(lat, 99):.1f} ms ({load()})", flush=True)

    for name in args.only.split(","):
        ds = lance.dataset(uri)
        width = ds.schema.field("vector").type.list_size
        n = ds.count_rows()
        if name == "default":  # what build_index records for this catalogue
            settings, searches = index_settings(n, -(-width // INDEX_PAD) * INDEX_PAD), [{}]
        else:
            build, searches = GRID[name]
            settings = {"num_partitions": args.partitions or max(16, int(np.sqrt(n))), **build}
        t0 = time.perf_counter()
        if args.reuse:
            pass
        elif width % INDEX_PAD:  # an index written before padding: write the padded vectors once
            build_index(store.catalog, version, {"nprobes": 1, **settings})
        else:
            create_vector_index(ds, {"nprobes": 1, **settings})
        print(f"\n== {name}: {settings} built in {time.perf_counter() - t0:.0f} s ({load()})", flush=True)
        ds = lance.dataset(uri)
        width = ds.schema.field("vector").type.list_size
        state.index = ds
        for search in searches:
            state.index_params = {**settings, "candidates": 0, **search, "width": width,
                                  "row_starts": row_starts(ds)}
            for u in warm:
                store.recommend(u, 10)
            lat, raw, rec = [], [], []
            for u in timed:
                t0 = time.perf_counter()
                got = store.recommend(u, 10)
                lat.append(time.perf_counter() - t0)
                rec.append(len({r["item_id"] for r in got} & set(ref[u])) / max(1, len(ref[u])))
            p = state.index_params
            for u in timed:  # the raw Lance query the call makes (same k, nprobes, ...)
                x = user_vectors(state, [u])[0]
                q = np.zeros(width, np.float32)
                q[:x.size], q[x.size] = x, 1.0
                nearest = {"column": "vector", "q": q, "k": max(10, p["candidates"]) + 10, "nprobes": p["nprobes"]}
                for key in ("refine_factor", "ef"):
                    if p.get(key):
                        nearest[key] = p[key]
                if "ef" in nearest:
                    nearest["ef"] = max(nearest["ef"], nearest["k"])
                t0 = time.perf_counter()
                ds.to_table(nearest=nearest, columns=[], with_row_id=True)
                raw.append(time.perf_counter() - t0)
            row = {"index": name, **{k: v for k, v in p.items() if k not in ("width", "row_starts")},
                   "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
                   "raw_p50_ms": round(pct(raw, 50), 2), "raw_p99_ms": round(pct(raw, 99), 2),
                   "recall": round(float(np.mean(rec)), 3), "load": os.getloadavg()}
            print(f"{name} {search}: API p50 {row['p50_ms']:.1f} ms p99 {row['p99_ms']:.1f} ms | raw lance p50 "
                  f"{row['raw_p50_ms']:.1f} p99 {row['raw_p99_ms']:.1f} ms | recall@10 {row['recall']:.3f} ({load()})",
                  flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    store.close()


if __name__ == "__main__":
    main()
