"""Soak: readers, ingest, logged impressions, encode and refresh cycles together for N minutes.

What a store sees in production, compressed: reader processes loop
``recommend``, a join and a consistency check on one long-lived SQL session
each (and the Python API); an application process logs impressions of what
it showed (one small commit each); a cron-like process ingests batches of
interactions, adds and encodes new items, refreshes, and runs
``dynstore compact`` now and then. Automatic compaction is on
(``compact_fragments``), and compaction keeps versions superseded less than
``--retain-seconds`` ago.

Every 10 s the monitor records each dataset's fragments and versions, the
store's bytes, and the readers' memory. At the end it prints errors, answers
that mixed two snapshots, query latency p50/p99, reader RSS growth, and the
fragments and size over time: with compaction they stay bounded (size grows
with the data, not with the number of commits).

    python benchmarks/soak.py --minutes 10
    python benchmarks/soak.py --minutes 1 --readers 1      # a quick look
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reader(path: str, until: float, out: str, seed: int) -> None:
    """Loop queries on one SqlSession until ``until``; write stats as JSON to ``out``."""
    import dynstore
    from dynstore.sql.session import SqlSession

    rng = random.Random(seed)
    lat: list[float] = []
    stats = {"queries": 0, "errors": [], "mixed": 0, "rss": [], "slowest": 0.0}
    next_rss = 0.0
    with dynstore.connect(path) as store, SqlSession(store) as session:
        users = [r[0] for r in session.run("SELECT user_id FROM users").rows]

        def timed(sql):
            t0 = time.perf_counter()
            rows = session.run(sql).rows
            lat.append(time.perf_counter() - t0)
            return rows

        while time.time() < until:
            u = rng.choice(users)
            try:
                timed(f"SELECT recommend({u}, 10)")
                timed(f"SELECT r.rank, i.title FROM recommendations({u}, 5) r JOIN items i USING (item_id)")
                v, a, b = timed("WITH cur AS (SELECT max(version) AS v FROM versions WHERE status = 'current') "
                                f"SELECT cur.v, recommend({u}, 5), recommend({u}, 5, cur.v) FROM cur")[0]
                if [x["item_id"] for x in a] != [x["item_id"] for x in b]:
                    stats["mixed"] += 1
                t0 = time.perf_counter()
                store.recommend(u, 10)
                lat.append(time.perf_counter() - t0)
                stats["queries"] += 4
            except Exception as exc:  # counted and reported, the soak goes on
                stats["errors"].append(f"{type(exc).__name__}: {str(exc)[:200]}")
            if time.time() >= next_rss:
                stats["rss"].append((round(time.time(), 1), round(_rss_mb(), 1)))
                next_rss = time.time() + 10
    stats["latencies"] = lat
    Path(out).write_text(json.dumps(stats))


def impressions(path: str, until: float, out: str) -> None:
    """An application logging what it showed: one commit per call, every ~0.2 s."""
    import dynstore

    stats = {"calls": 0, "errors": []}
    rng = random.Random(1)
    with dynstore.connect(path) as store:
        users = [r[0] for r in store.sql("SELECT user_id FROM users").fetchall()]
        while time.time() < until:
            u = rng.choice(users)
            try:
                shown = [r["item_id"] for r in store.recommend(u, 5)]
                store.log_impressions(u, shown)
                stats["calls"] += 1
            except Exception as exc:
                stats["errors"].append(f"{type(exc).__name__}: {str(exc)[:200]}")
            time.sleep(0.2)
    Path(out).write_text(json.dumps(stats))


def _cli(*args) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "dynstore", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""


def cron(path: str, until: float, out: str, workdir: str, refresh_every: float) -> None:
    """Batches of interactions every ~3 s; new items + encode every ~30 s; refresh (and
    compact every other time) every ``refresh_every`` s. Each a separate command, as cron runs them."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(2)
    stats = {"ingest": 0, "encode": 0, "refresh": 0, "compact": 0, "failures": []}
    work = Path(workdir)
    next_items, next_refresh, n_item = time.time() + 30, time.time() + refresh_every, 100_000
    t_base = np.datetime64("2025-06-01T00:00:00", "us")
    step = 0
    while time.time() < until:
        step += 1
        n = 200
        batch = pl.DataFrame({"user_id": rng.integers(1, 400, n), "item_id": rng.integers(1, 300, n),
                              "ts": t_base + (np.arange(n) + step * n).astype("timedelta64[s]"),
                              "event": rng.choice(["click", "impression", "purchase", "skip"], n),
                              "value": np.ones(n)})
        f = work / "batch.parquet"
        batch.write_parquet(f)
        code, err = _cli("ingest", path, "interactions", f, "-q")
        stats["ingest"] += 1
        if code not in (0, 3):
            stats["failures"].append(("ingest", code, err))
        if time.time() >= next_items:
            items = pl.DataFrame({"item_id": [n_item + i for i in range(5)],
                                  "title": [f"new product {n_item + i} in the spring range" for i in range(5)],
                                  "category": ["new"] * 5})
            items.write_csv(work / "items.csv")
            n_item += 5
            for cmd in (["ingest", path, "items", work / "items.csv", "-q"], ["encode", path, "-q"]):
                code, err = _cli(*cmd)
                if code not in (0, 3):
                    stats["failures"].append((cmd[0], code, err))
            stats["encode"] += 1
            next_items = time.time() + 30
        if time.time() >= next_refresh:
            code, err = _cli("refresh", path, "--epochs", "1", "-q")
            stats["refresh"] += 1
            if code not in (0, 3):
                stats["failures"].append(("refresh", code, err))
            if stats["refresh"] % 2 == 0:
                code, err = _cli("compact", path, "-q")
                stats["compact"] += 1
                if code not in (0, 3):
                    stats["failures"].append(("compact", code, err))
            next_refresh = time.time() + refresh_every
        time.sleep(2)
    Path(out).write_text(json.dumps(stats))


def sample(path: Path) -> dict:
    """Fragments and versions per dataset, and bytes on disk."""
    import lance

    from dynstore.data.compaction import dataset_stats

    out = {"t": time.time(), "bytes": 0, "datasets": {}}
    for uri in [*sorted((path / "tables").glob("*.lance")), path / "embeddings.lance", path / "versions.lance",
                *sorted((path / "cache").glob("*.lance"))]:
        try:
            ds = lance.dataset(str(uri))
        except Exception:
            continue
        out["datasets"][uri.stem] = dataset_stats(ds, str(uri))
    for root, _, files in os.walk(path):
        for f in files:
            try:
                out["bytes"] += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--model", default="fake", help="encoder of the soak store (default: fake; 'minilm' for the real one)")
    ap.add_argument("--compact-fragments", type=int, default=32)
    ap.add_argument("--retain-seconds", type=int, default=60)
    ap.add_argument("--refresh-every", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the store (its path is printed)")
    args = ap.parse_args()

    import numpy as np
    import polars as pl

    import dynstore
    from dynstore.demo import DEMO_RULES

    work = Path(tempfile.mkdtemp(prefix="dynstore-soak-"))
    path = work / "store"
    rng = np.random.default_rng(0)
    store = dynstore.init(path, model=args.model, **DEMO_RULES)
    store.configure(compact_fragments=args.compact_fragments, retain_seconds=args.retain_seconds)
    store.ingest("users", pl.DataFrame({"user_id": np.arange(1, 400), "age": rng.integers(18, 80, 399),
                                        "region": rng.choice(["north", "south", "east", "west"], 399)}))
    store.ingest("items", pl.DataFrame({"item_id": np.arange(1, 300),
                                        "title": [f"product {i} for {['home', 'garden', 'kids'][i % 3]}" for i in range(1, 300)],
                                        "category": rng.choice(["home", "garden", "kids"], 299)}))
    n = 20_000
    store.ingest("interactions", pl.DataFrame({
        "user_id": rng.integers(1, 400, n), "item_id": rng.integers(1, 300, n),
        "ts": np.datetime64("2025-05-01T00:00:00", "us") + (np.sort(rng.integers(0, 86400 * 30, n)) * 1_000_000).astype("timedelta64[us]"),
        "event": rng.choice(["click", "impression", "purchase", "skip"], n), "value": np.ones(n)}))
    store.encode()
    store.refresh(since="all", epochs=1)
    store.close()
    print(f"soak store {path}: 399 users, 299 items, {n} interactions; {args.minutes} min, {args.readers} readers, "
          f"compact_fragments {args.compact_fragments}, retain {args.retain_seconds} s", flush=True)

    until = time.time() + args.minutes * 60
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=reader, args=(str(path), until, str(work / f"reader{i}.json"), i))
             for i in range(args.readers)]
    procs.append(ctx.Process(target=impressions, args=(str(path), until, str(work / "impressions.json"))))
    procs.append(ctx.Process(target=cron, args=(str(path), until, str(work / "cron.json"), str(work),
                                                args.refresh_every)))
    for p in procs:
        p.start()
    samples = [sample(path)]
    while time.time() < until:
        time.sleep(min(10.0, max(0.0, until - time.time())))
        samples.append(sample(path))
        s = samples[-1]
        frags = {k: v["fragments"] for k, v in s["datasets"].items()}
        print(f"  t={s['t'] - samples[0]['t']:5.0f}s  size {s['bytes'] / 1e6:6.1f} MB  fragments {frags}", flush=True)
    for p in procs:
        p.join(timeout=600)
    samples.append(sample(path))

    readers = [json.loads((work / f"reader{i}.json").read_text()) for i in range(args.readers)]
    imp = json.loads((work / "impressions.json").read_text())
    cron_stats = json.loads((work / "cron.json").read_text())
    lat = np.array([x for r in readers for x in r["latencies"]])
    errors = [e for r in readers for e in r["errors"]] + imp["errors"]
    mixed = sum(r["mixed"] for r in readers)
    rss = [(r["rss"][0][1], r["rss"][-1][1], max(x[1] for x in r["rss"])) for r in readers if r["rss"]]
    inter = [s["datasets"].get("interactions", {}) for s in samples]
    max_frag = {k: max(s["datasets"].get(k, {}).get("fragments", 0) for s in samples) for k in samples[-1]["datasets"]}
    max_ver = {k: max(s["datasets"].get(k, {}).get("versions", 0) for s in samples) for k in samples[-1]["datasets"]}
    with dynstore.connect(path, read_only=True) as s:
        rows = s.sql("SELECT count(*) FROM interactions").fetchall()[0][0]
        versions = len(s.versions())
    minutes = (samples[-1]["t"] - samples[0]["t"]) / 60
    print()
    print(f"soak of {minutes:.1f} min: {len(lat):,} reader queries, {imp['calls']:,} log_impressions commits, "
          f"{cron_stats['ingest']} ingests, {cron_stats['encode']} encodes, {cron_stats['refresh']} refreshes, "
          f"{cron_stats['compact']} compacts")
    print(f"errors: {len(errors)} (readers and impressions) {errors[:3]}; writer failures: "
          f"{len(cron_stats['failures'])} {cron_stats['failures'][:3]}; mixed answers: {mixed}")
    print(f"query latency: p50 {1000 * np.percentile(lat, 50):.1f} ms, p99 {1000 * np.percentile(lat, 99):.1f} ms, "
          f"max {1000 * lat.max():.0f} ms")
    for n_, (a, b, m) in enumerate(rss):
        print(f"reader {n_} RSS: {a:.0f} MB at start, {b:.0f} MB at the end (max {m:.0f} MB)")
    print(f"interactions: {rows:,} rows; fragments max {max_frag.get('interactions')} (end "
          f"{inter[-1].get('fragments')}), dataset versions max {max_ver.get('interactions')} (end "
          f"{inter[-1].get('versions')})")
    print(f"fragments, max over the soak: {max_frag}")
    print(f"store size: {samples[0]['bytes'] / 1e6:.1f} MB at start, max {max(s['bytes'] for s in samples) / 1e6:.1f} MB, "
          f"{samples[-1]['bytes'] / 1e6:.1f} MB at the end; {versions} embedding versions")
    print()
    print("| soak (min) | reader queries | errors | mixed | p50 / p99 | reader RSS start -> end | "
          "interaction fragments max (end) | store size start -> max -> end |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {minutes:.1f} | {len(lat):,} | {len(errors) + len(cron_stats['failures'])} | {mixed} | "
          f"{1000 * np.percentile(lat, 50):.1f} / {1000 * np.percentile(lat, 99):.1f} ms | "
          + ", ".join(f"{a:.0f} -> {b:.0f} MB" for a, b, _ in rss)
          + f" | {max_frag.get('interactions')} ({inter[-1].get('fragments')}) | {samples[0]['bytes'] / 1e6:.1f} -> "
          f"{max(s['bytes'] for s in samples) / 1e6:.1f} -> {samples[-1]['bytes'] / 1e6:.1f} MB |")
    if args.keep:
        print(f"store kept at {path}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
