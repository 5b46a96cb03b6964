"""How refresh and version builds scale on one machine: time and peak memory per size.

For each size, a fresh subprocess generates the sample shop (``samples.shop``) at that
many log rows and items, builds a store with the tiny fake encoder (so the figures are
the store's own work, not BERT's), then times ``encode`` (which builds version 1) and
``refresh(since="all")``, and reports the peak resident memory of the process. The
baseline of each row is its own event count: seconds per 1,000 events, and peak memory
over the float32 size of the item matrix (``items x 384 x 4`` bytes of MiniLM vectors).

Run (from the repository root)::

    python benchmarks/bench_scale_local.py                       # 100k, 300k, 1M events
    python benchmarks/bench_scale_local.py --sizes 100000:10000 3000000:50000
    python benchmarks/bench_scale_local.py --json OUT
    python benchmarks/bench_scale_local.py --sizes 300000:20000 --hash   # bits of the served version

A size is ``EVENTS[:ITEMS]`` (items default to the shop generator's interpolation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, tempfile, time
import numpy as np
import dynstore
from dynstore.samples import shop
events, items = int(sys.argv[1]), int(sys.argv[2])
t = time.perf_counter()
frames = shop.generate(events, seed=0)
if items and frames["items"].height > items:
    frames["items"] = frames["items"].head(items)
    ids = frames["items"]["item_id"]
    frames["interactions"] = frames["interactions"].filter(frames["interactions"]["item_id"].is_in(ids))
store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake",
                      positive="event IN ('click', 'purchase')", negative="event = 'skip'")
store.ingest("users", frames["users"]); store.ingest("items", frames["items"])
store.ingest("interactions", frames["interactions"])
gen = time.perf_counter() - t
t = time.perf_counter(); store.encode(); enc = time.perf_counter() - t
t = time.perf_counter(); out = store.refresh(since="all"); ref = time.perf_counter() - t
digest = None
if len(sys.argv) > 3:  # --hash: the served version's bits, to compare two trees
    import hashlib
    h = hashlib.sha256()
    for item, vec, bias in store.sql("SELECT item_id::VARCHAR, vector, bias FROM item_embeddings ORDER BY item_id").fetchall():
        h.update(item.encode()); h.update(np.asarray(vec, dtype=np.float32).tobytes()); h.update(np.float32(bias).tobytes())
    users = [r[0] for r in store.sql("SELECT DISTINCT user_id FROM interactions ORDER BY user_id LIMIT 50").fetchall()]
    for u in users:
        # dict(r): the rows as plain dicts (typed rows since issue 25; the digest is the same)
        h.update(json.dumps([dict(r) for r in store.recommend(u, k=10)], sort_keys=True, default=str).encode())
    digest = h.hexdigest()
print(json.dumps({"sha256": digest, "events": frames["interactions"].height, "items": frames["items"].height,
                  "users": frames["users"].height, "generate_ingest_s": round(gen, 1),
                  "encode_v1_s": round(enc, 1), "refresh_s": round(ref, 1),
                  "durations": out.durations, "status": out.status,
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def run(events: int, items: int, digest: bool = False) -> dict:
    env = dict(os.environ, LANCE_LOG="error")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(events), str(items)] + (["hash"] if digest else []),
                          capture_output=True,
                          text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"size {events}:{items} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=["100000", "300000", "1000000"],
                    help="EVENTS[:ITEMS] per run (default: 100k, 300k, 1M events)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--hash", action="store_true",
                    help="print a sha256 of each size's served vectors and 50 users' lists (to compare two trees)")
    args = ap.parse_args(argv)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    rows = []
    for size in args.sizes:
        ev, _, it = size.partition(":")
        t = time.perf_counter()
        r = run(int(ev), int(it or 0), args.hash)
        r["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(r)
        d = r["durations"]
        print(f"{r['events']:>9,} events {r['items']:>7,} items: refresh {r['refresh_s']:7.1f} s "
              f"({1000 * r['refresh_s'] / r['events']:.3f} s per 1k events; train {d.get('train_s')} s, "
              f"eval {d.get('eval_s')} s = {100 * d.get('eval_s', 0) / max(r['refresh_s'], 1e-9):.0f} %), "
              f"version 1 {r['encode_v1_s']:.1f} s, peak RSS {r['peak_rss_mb']:,} MB "
              f"({r['peak_rss_mb'] * 2**20 / (r['items'] * 384 * 4):.1f}x the item vectors), "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        if args.hash:
            print(f"  sha256 of the served version: {r['sha256']}", flush=True)
    print()
    print("| events | items | refresh | s per 1k events | eval share | version 1 | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['events']:,} | {r['items']:,} | {r['refresh_s']} s | "
              f"{1000 * r['refresh_s'] / r['events']:.3f} | "
              f"{100 * r['durations'].get('eval_s', 0) / max(r['refresh_s'], 1e-9):.0f} % | "
              f"{r['encode_v1_s']} s | {r['peak_rss_mb']:,} MB |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
