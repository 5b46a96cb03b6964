"""Refresh at scale: memory and time follow the window, not the history.

Two tables, each row a fresh subprocess (peak RSS is per process):

* **history grows, window fixed** -- the sample shop of ``--events`` rows (four
  months) is copied ``m - 1`` times, each copy shifted back by the span, so the
  store holds ``m`` times the history while ``refresh --since 30d`` sees the same
  window; the ``m = 1`` store is the baseline of the same run: the ratios say what
  the older history costs (target: 1.0x);
* **window grows, history fixed** -- ``refresh --since`` 15d / 30d / 60d / all on
  the ``m = 1`` store: the memory a refresh adds over the opened store, against
  the window's events; the slope is the per-event cost, and ``events per GB`` is
  the limit on one machine (the intercept is the catalogue's share: the items'
  vectors and the version written).

Each refresh is forced (``force=True``) with the fake encoder, so the figures are
the store's own work (window read, training, evaluation, publishing), not BERT's.

Run (from the repository root)::

    python benchmarks/bench_scale.py --part window
    python benchmarks/bench_scale_window.py --events 200000 --histories 1 4 12 --windows 15d 30d 60d all
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = r"""
import datetime as dt, sys
import polars as pl
import dynstore
from dynstore.samples import shop
path, events, copies = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fr = shop.generate(events, seed=0)
ev = fr["interactions"]
span = (ev["ts"].max() - ev["ts"].min()) + dt.timedelta(days=1)
ev = pl.concat([ev.with_columns(pl.col("ts") - span * j) for j in range(copies)])
s = dynstore.init(path, model="fake", positive="event IN ('click', 'purchase')", negative="event = 'skip'")
s.ingest("users", fr["users"]); s.ingest("items", fr["items"]); s.ingest("interactions", ev)
s.encode()
print(ev.height)
"""

REFRESH = r"""
import json, resource, sys, time
import dynstore
path, since = sys.argv[1], sys.argv[2]
s = dynstore.connect(path)
s.sql("SELECT count(*) FROM interactions").fetchall()   # the store opened, datasets listed
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
out = s.refresh(since=since, force=True)
total = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"window_events": out.counts["events"], "prepare_s": out.durations.get("prepare_s"),
                  "train_s": out.durations.get("train_s"), "refresh_s": round(total, 2),
                  "rss_before_mb": round(before), "peak_rss_mb": round(peak)}))
"""


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def child(code: str, *args) -> str:
    env = dict(os.environ, LANCE_LOG="error", PYTHONPATH=os.pathsep.join(
        [os.environ.get("PYTHONPATH", ""), str(ROOT)]).strip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``: (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def history_table(events: int, histories: list[int], since: str, tmp: Path) -> list[dict]:
    rows = []
    for m in histories:
        path = tmp / f"h{m}"
        hist = int(child(BUILD, path, events, m))
        r = json.loads(child(REFRESH, path, since))
        rows.append(dict(history_events=hist, copies=m, **r, load=load()))
        print(f"  history x{m}: {hist:,} events, window {r['window_events']:,}: prepare {r['prepare_s']} s, "
              f"refresh {r['refresh_s']} s, peak RSS {r['peak_rss_mb']} MB ({load()})", flush=True)
    return rows


def window_table(path: Path, windows: list[str]) -> list[dict]:
    rows = []
    for since in windows:
        r = json.loads(child(REFRESH, path, since))
        rows.append(dict(since=since, **r, load=load()))
        print(f"  --since {since}: {r['window_events']:,} events: refresh {r['refresh_s']} s, "
              f"RSS {r['rss_before_mb']} -> {r['peak_rss_mb']} MB ({load()})", flush=True)
    return rows


def report(hist: list[dict], wins: list[dict], since: str) -> dict:
    base = hist[0]
    print(f"\nhistory grows, window fixed (--since {since}); baseline: the x{base['copies']} store")
    print("| history events | window events | prepare (s) | refresh (s) | peak RSS (MB) | vs baseline: prepare / refresh / RSS |")
    print("|---|---|---|---|---|---|")
    for r in hist:
        print(f"| {r['history_events']:,} | {r['window_events']:,} | {r['prepare_s']} | {r['refresh_s']} | "
              f"{r['peak_rss_mb']:,} | {r['prepare_s'] / base['prepare_s']:.2f}x / "
              f"{r['refresh_s'] / base['refresh_s']:.2f}x / {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x |")
    xs = [r["window_events"] / 1000 for r in wins]
    ys = [r["peak_rss_mb"] - r["rss_before_mb"] for r in wins]
    a, b = slope(xs, ys)
    print(f"\nwindow grows, history fixed ({hist[0]['history_events']:,} events)")
    print("| --since | window events | refresh (s) | s per 1k events | RSS opened -> peak (MB) | added (MB) |")
    print("|---|---|---|---|---|---|")
    for r, y in zip(wins, ys):
        print(f"| {r['since']} | {r['window_events']:,} | {r['refresh_s']} | "
              f"{r['refresh_s'] / max(r['window_events'] / 1000, 1e-9):.3f} | {r['rss_before_mb']} -> "
              f"{r['peak_rss_mb']} | {y:,} |")
    per_gb = 1024 / b * 1000 if b > 0 else float("inf")
    print(f"\nadded memory = {a:.0f} MB + {b:.3f} MB per 1k window events  =>  about {per_gb:,.0f} "
          f"window events per GB (beyond the catalogue's {a:.0f} MB)")
    return {"history": hist, "windows": wins, "intercept_mb": round(a), "mb_per_1k_events": round(b, 4),
            "events_per_gb": round(per_gb)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000, help="rows of the sample shop (one four-month history)")
    p.add_argument("--histories", type=int, nargs="+", default=[1, 4, 12], help="copies of the history")
    p.add_argument("--since", default="30d", help="the fixed window of the history table")
    p.add_argument("--windows", nargs="+", default=["15d", "30d", "60d", "all"], help="windows of the second table")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    print(f"start: {load()}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        hist = history_table(args.events, args.histories, args.since, tmp)
        wins = window_table(tmp / f"h{args.histories[0]}", args.windows)
    out = report(hist, wins, args.since)
    print(f"end: {load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
