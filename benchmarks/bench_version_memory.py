"""Peak memory of a store's first version against the size of its item vectors.

Builds the generated catalogue of ``bench_recommend.py`` (300 topics, ``fake:384``
encoder, 2,000 users with 10 positives each) at each ``--items`` size with the vector
index on, then runs ``dynstore encode`` (which encodes the items, builds and indexes
version 1 and scores it on the holdout) in a fresh process of its own, as it runs
after an ingest, and prints that process's peak resident memory over the float32
size of the item vectors (``items x 384 x 4`` bytes). Target: 3x. With ``--api`` the
process calls ``store.encode()`` instead, as an application does: the command line
caps glibc's malloc arenas at one per core (``dynstore.memory.cap_malloc_arenas``),
a library does not.

Beside it: the process's resident memory before ``encode`` (Python, dynstore and
its imports, the open store), and, with two sizes or more, the memory each further
item costs (the slope of the peaks between sizes), which no fixed cost hides. The
catalogue is generated and ingested in another process, so the benchmark's own
data is not counted (it was until 2026-11-28: about 550 MB at 200,000 items).

    python benchmarks/bench_version_memory.py --items 200000
    python benchmarks/bench_version_memory.py --items 200000 400000 1000000
    python benchmarks/bench_version_memory.py --items 200000 --api
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("LANCE_LOG", "error")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _rss_mb() -> float:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def stage_ingest(path: str, items: int, dim: int) -> None:
    from bench_recommend import generated_store

    store = generated_store(Path(path), items, 2000, np.random.default_rng(0), dim=dim,
                            index_min_items=items, encode=False)
    store.close()
    print(json.dumps({"peak_mb": _peak_mb()}))


def stage_encode(path: str, api: bool) -> None:
    import dynstore

    before = _rss_mb()  # opening the store here would start Lance's threads before the command
    t0 = time.perf_counter()
    if api:
        with dynstore.connect(path) as store:
            store.encode()
    else:
        from dynstore.cli import main as cli

        cli(["encode", path, "--quiet"], standalone_mode=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_mb": _peak_mb(), "before_mb": before, "seconds": seconds}))


def _run(*args: str) -> dict:
    """One stage in a fresh process; its last stdout line is its JSON figures."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:  # a killed build (out of memory) says so here, not in a traceback of ours
        raise SystemExit(f"stage {' '.join(args[:2])} failed with exit code {out.returncode}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[200_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--api", action="store_true", help="store.encode() in the process, not `dynstore encode`")
    ap.add_argument("--stage", choices=["ingest", "encode"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage == "ingest":
        return stage_ingest(args.path, args.items[0], args.dim)
    if args.stage == "encode":
        return stage_encode(args.path, args.api)

    how = "`store.encode()`" if args.api else "`dynstore encode`"
    rows = []
    for n in args.items:
        with tempfile.TemporaryDirectory(prefix="bench-mem-") as work:
            path = str(Path(work) / "s")
            load0 = os.getloadavg()[0]
            gen = _run("--stage", "ingest", "--path", path, "--items", str(n), "--dim", str(args.dim))
            enc = _run("--stage", "encode", "--path", path, *(["--api"] if args.api else []))
        vectors_mb = n * args.dim * 4 / 2**20
        rows.append((n, enc, vectors_mb))
        print(f"| {n:,} items, d = {args.dim} | {how} in its own process: built in {enc['seconds']:.0f} s, "
              f"peak RSS {enc['peak_mb']:,.0f} MB (at its start: {enc['before_mb']:,.0f} MB) | "
              f"vectors {vectors_mb:,.0f} MB | {enc['peak_mb'] / vectors_mb:.1f}x | target <= 3x | "
              f"load {load0:.2f} -> {os.getloadavg()[0]:.2f}; generation + ingest process (not counted): "
              f"{gen['peak_mb']:,.0f} MB |", flush=True)
    for (n0, e0, v0), (n1, e1, v1) in zip(rows, rows[1:]):
        slope = (e1["peak_mb"] - e0["peak_mb"]) / (v1 - v0)
        per_item_kb = (e1["peak_mb"] - e0["peak_mb"]) * 1024 / (n1 - n0)
        print(f"each further item, {n0:,} -> {n1:,}: {per_item_kb:.2f} KB of peak RSS = {slope:.2f}x its float32 vector")


if __name__ == "__main__":
    main()
