"""Start-up of everyday commands, against DuckDB's own start-up in the same run.

Builds two stores in a temporary directory:

* ``shop``: the ``small`` sample shop (1,500 items, 50k interactions) with
  the default MiniLM encoder configured but nothing encoded — a query that
  needs no vector must not load the encoder (or torch);
* ``big``: 50,000 items and 20,000 users with 10 positives each, encoded with
  the 384-dimensional fake encoder (this measures serving, not encoding).

Then times, as fresh processes, interleaved round by round so a shared
machine's load hits every contender alike (median of ``--rounds``):

* baseline: ``python -c "import duckdb; duckdb.sql('select 1')"``
* ``dynstore --help``                                  target <= 0.3 s
* ``dynstore sql shop "SELECT count(*) FROM items"``   target <= 3x baseline
* ``dynstore recommend big 42``                        target <= 1 s
* ``dynstore sql big "SELECT recommend(42, 10)"``      target <= 1 s

    python benchmarks/bench_startup.py [--rounds 7] [--items 50000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")


def build(work: Path, n_items: int, n_users: int) -> tuple[Path, Path]:
    import numpy as np
    import polars as pl

    import dynstore
    from dynstore.demo import DEMO_RULES
    from dynstore.samples import shop

    frames = shop.generate("small", seed=0)
    s = dynstore.init(work / "shop", **DEMO_RULES)  # MiniLM configured, never loaded
    for kind in ("users", "items", "interactions"):
        s.ingest(kind, frames[kind])
    s.close()

    rng = np.random.default_rng(0)
    big = dynstore.init(work / "big", model="fake:384")
    words = np.array([f"w{i}" for i in range(6000)])
    picks = rng.integers(0, 6000, (n_items, 8))
    big.ingest("items", pl.DataFrame({"item_id": np.arange(1, n_items + 1),
                                      "title": [" ".join(w) for w in words[picks]],
                                      "category": rng.choice(["a", "b", "c", "d"], n_items)}))
    n = n_users * 10
    big.ingest("interactions", pl.DataFrame({
        "user_id": np.repeat(np.arange(1, n_users + 1), 10), "item_id": rng.integers(1, n_items + 1, n),
        "ts": [f"2025-01-{1 + i % 28:02d}" for i in range(n)],
        "value": np.ones(n)}))
    big.encode()
    big.close()
    return work / "shop", work / "big"


#: a user's machine keeps compiled bytecode; PYTHONDONTWRITEBYTECODE (set on some
#: CI and sandbox images) would recompile dynstore's sources in every process
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--users", type=int, default=20_000)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        t0 = time.perf_counter()
        shop, big = build(work, args.items, args.users)
        print(f"built the stores in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        py, cli = sys.executable, [sys.executable, "-m", "dynstore"]
        runs = {
            "baseline": [py, "-c", "import duckdb; duckdb.sql('select 1')"],
            "help": [*cli, "--help"],
            "sql": [*cli, "sql", str(shop), "SELECT count(*) FROM items"],
            "recommend": [*cli, "recommend", str(big), "42"],
            "sql_recommend": [*cli, "sql", str(big), "SELECT recommend(42, 10)"],
        }
        for cmd in runs.values():  # warm the page cache (and write bytecode) once
            timed(cmd)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for name, cmd in runs.items():
                times[name].append(timed(cmd))
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["baseline"]
        rows = [
            ("python -c \"import duckdb; duckdb.sql('select 1')\" (baseline)", "baseline", None, None),
            ("dynstore --help", "help", 0.3, None),
            ('dynstore sql shop "SELECT count(*) FROM items"', "sql", None, 3.0),
            (f"dynstore recommend big 42 ({args.items:,} items)", "recommend", 1.0, None),
            ('dynstore sql big "SELECT recommend(42, 10)"', "sql_recommend", 1.0, None),
        ]
        print(f"load average before: {os.getloadavg()[0]:.2f}; median of {args.rounds} rounds, interleaved")
        print("| command | median | ratio to baseline | target |")
        print("|---|---|---|---|")
        for label, key, abs_target, ratio_target in rows:
            ratio = med[key] / base
            if abs_target is not None:
                target = f"<= {abs_target} s {'ok' if med[key] <= abs_target else 'MISSED'}"
            elif ratio_target is not None:
                target = f"<= {ratio_target}x {'ok' if ratio <= ratio_target else 'MISSED'}"
            else:
                target = ""
            print(f"| {label} | {med[key]:.3f} s | {ratio:.2f}x | {target} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
