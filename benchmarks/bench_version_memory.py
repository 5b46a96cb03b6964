"""Peak memory of a store's first version against the size of its item vectors.

Builds the generated catalogue of ``bench_recommend.py`` (300 topics, ``fake:384``
encoder, 2,000 users with 10 positives each) at ``--items`` items with the vector
index on, in a fresh process, and prints the peak resident memory of ``encode``
(which builds and indexes version 1 and scores it on the holdout) over the
float32 size of the item vectors (``items x 384 x 4`` bytes). Target: 3x.

    python benchmarks/bench_version_memory.py --items 200000
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("LANCE_LOG", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    args = ap.parse_args()
    from bench_recommend import generated_store

    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as work:
        t0 = time.perf_counter()
        store = generated_store(Path(work) / "s", args.items, 2000, np.random.default_rng(0), dim=args.dim,
                                index_min_items=args.items)
        store.close()
        seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    vectors_mb = args.items * args.dim * 4 / 2**20
    print(f"| {args.items:,} items, d = {args.dim} | built in {seconds:.0f} s | peak RSS {peak_mb:,.0f} MB | "
          f"vectors {vectors_mb:,.0f} MB | {peak_mb / vectors_mb:.1f}x | target <= 3x |")


if __name__ == "__main__":
    main()
