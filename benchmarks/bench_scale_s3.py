"""``bench_scale.py --part s3``: a store on object storage against a local one.

    python benchmarks/bench_scale.py --part s3 [--rows 100000]

``s3``: the same store (string ids, ``--rows`` interactions) built in a local
directory and in ``s3://`` on an in-process moto server (needs boto3 and
moto[server]; no Docker, no network), then timed: the ingest of the
interactions, a ``GROUP BY event`` query and ``recommend`` (warm, median of
many users; the first statement of a fresh connection; and warm with
``refresh_interval = 0``, every statement listing each dataset's versions). Prints each
timing and the ratio object storage / local. moto answers from the same
machine, so the ratios show dynstore's own overhead per request, not a real
network's latency.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# -- part s3: a store on object storage (moto) against a local one ----------------------------

def s3_data(directory: Path, rows: int, n_items: int = 2000, n_users: int = 5000) -> Path:
    """``items.parquet`` and ``interactions.parquet`` with string ids."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(0)
    words = np.array(["red", "blue", "shoe", "hat", "lamp", "desk", "cup", "tea", "book", "pen", "green", "mug"])
    pl.DataFrame({"item_id": [f"sku-{i}" for i in range(n_items)],
                  "title": [" ".join(rng.choice(words, 3)) for _ in range(n_items)],
                  "category": [f"c{i % 17}" for i in range(n_items)]}).write_parquet(directory / "items.parquet")
    users = rng.integers(0, n_users, rows)
    items = (rng.zipf(1.3, rows) + users * 7) % n_items
    seconds = np.sort(rng.integers(0, 28 * 86400, rows)).astype("timedelta64[s]")
    ts = (np.datetime64("2025-05-01") + seconds).astype("datetime64[ms]")
    pl.DataFrame({"user_id": [f"u{u}" for u in users], "item_id": [f"sku-{i}" for i in items], "ts": ts,
                  "event": rng.choice(["click", "click", "view", "purchase", "skip"], rows)}
                 ).write_parquet(directory / "interactions.parquet")
    return directory


def s3_server():
    """An in-process moto S3 server with one bucket; sets the AWS_* environment."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return server


def s3_time_store(uri: str, data: Path, repeats: int = 30) -> dict[str, float]:
    """Build the store at ``uri`` and time ingest, a GROUP BY and recommend."""
    import dynstore

    out = {}
    store = dynstore.init(uri, model="fake", positive="event IN ('click', 'purchase')", negative="event = 'skip'")
    store.ingest("items", data / "items.parquet")
    t = time.perf_counter()
    store.ingest("interactions", data / "interactions.parquet")
    out["ingest_s"] = time.perf_counter() - t
    store.encode()  # version 1 (the popularity rule): enough to serve
    q = "SELECT event, count(*) FROM interactions GROUP BY event ORDER BY 1"
    store.sql(q).fetchall()
    out["group_by_s"] = s3_median(lambda: store.sql(q).fetchall(), repeats)
    store.close()
    out["recommend_first_s"], out["recommend_s"] = s3_recommend(uri, repeats)
    return out


def s3_recommend(uri: str, repeats: int, options: dict | None = None) -> tuple[float, float]:
    """A fresh reader's first ``recommend`` statement, and the median of the next ones."""
    import dynstore

    reader = dynstore.connect(uri, read_only=True, storage_options=options)
    t = time.perf_counter()
    reader.sql("SELECT recommend('u1', 10)").fetchall()
    first = time.perf_counter() - t
    users = iter(range(2, 10 ** 6))
    warm = s3_median(lambda: reader.sql(f"SELECT recommend('u{next(users)}', 10)").fetchall(), repeats)
    reader.close()
    return first, warm


def s3_median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def s3_main(rows: int) -> dict:
    """Local and object-storage timings and their ratios (object storage / local)."""
    server = s3_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = s3_data(Path(tmp), rows)
            local = s3_time_store(str(Path(tmp) / "local"), data)
            remote = s3_time_store("s3://bench/shop", data)
            # every statement asks the object store for new commits (no reused stamps)
            _, remote["recommend_s_ask_always"] = s3_recommend("s3://bench/shop", 30, {"refresh_interval": "0"})
            local["recommend_s_ask_always"] = local["recommend_s"]  # a local store always asks (stat)
    finally:
        server.stop()
    print(f"{'':24}{'local':>10}{'s3 (moto)':>12}{'ratio':>8}")
    for key in local:
        print(f"{key:24}{local[key]:10.4f}{remote[key]:12.4f}{remote[key] / local[key]:8.2f}x")
    return {"local": local, "s3": remote, "ratio": {k: remote[k] / local[k] for k in local}}

# -- end of part s3 ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["s3"], required=True)
    parser.add_argument("--rows", type=int, default=100_000, help="interactions (default 100000)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LANCE_LOG", "error")
    if args.part == "s3":
        s3_main(args.rows)


if __name__ == "__main__":
    main()
