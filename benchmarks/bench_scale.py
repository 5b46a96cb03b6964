"""The scale-out path, measured against the local engine in the same run.

``--part s3`` (issue 13): a store on object storage (moto's S3 server) against a
local one -- ingest, ``GROUP BY``, ``recommend`` (see ``bench_scale_s3.py``).

``--part window`` (issue 13): refresh reads its window, not the history -- memory and
time with the history grown 1x/4x/12x under a fixed ``--since 30d``, and the memory a
refresh adds per window event (events per GB); see ``bench_scale_window.py``.

``--part ray`` (issue 13): the Ray engine against the local one on this machine --

* encode, fake encoder, ``--items`` documents (default 20k): seconds local vs Ray
  (all the cluster's CPUs as actors), the overhead ratio (target <= 1.3x);
* encode, the real MiniLM encoder, ``--minilm-items`` documents (default 2k): the same;
* Ray encode throughput (MiniLM) with 1 vs 2 actors (target: 2 actors >= 1.7x one);
* score-all local vs Ray over the sample shop (``--shop`` size).

Starting the local cluster is timed on its own and left out of the ratios (a
cluster outlives one command; ``RAY_ADDRESS`` names a running one). The load
average is printed before and after: on a shared machine it says how much of
the CPUs the run really had.

Run (from the repository root)::

    python benchmarks/bench_scale.py --part ray
    python benchmarks/bench_scale.py --part window
    python benchmarks/bench_scale.py --part ray --items 5000 --minilm-items 500 --json OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("LANCE_LOG", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = ("red blue green black white linen wool cotton denim leather shoe boot shirt dress coat jacket "
         "scarf hat bag belt summer winter classic slim loose soft light warm bright dark vintage new").split()


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def items_frame(n: int, seed: int = 0):
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    titles = [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) + f" #{i}" for i in range(n)]
    return pl.DataFrame({"item_id": list(range(n)), "title": titles})


def items_store(n: int, model: str):
    import dynstore

    s = dynstore.init(tempfile.mkdtemp() + "/s", model=model)
    s.ingest("items", items_frame(n))
    return s


def shop_store(size: str):
    import dynstore
    from dynstore.demo import DEMO_RULES
    from dynstore.samples import shop

    frames = shop.generate(size, seed=0)
    s = dynstore.init(tempfile.mkdtemp() + "/s", model="fake", **DEMO_RULES)
    for kind in ("users", "items", "interactions"):
        s.ingest(kind, frames[kind])
    s.encode()
    return s


# ---- part ray: local_* / ray_* ----------------------------------------------------------


def local_encode(n: int, model: str) -> dict:
    s = items_store(n, model)
    t = time.perf_counter()  # the model loads inside, as a command's (and each actor's) does
    r = s.encode()
    sec = time.perf_counter() - t
    return {"engine": "local", "model": model, "docs": r.encoded, "seconds": round(sec, 2),
            "docs_per_s": round(r.encoded / sec, 1)}


def ray_encode(n: int, model: str, workers: int | None = None) -> dict:
    s = items_store(n, model)
    t = time.perf_counter()
    r = s.encode(engine="ray", workers=workers)
    sec = time.perf_counter() - t
    return {"engine": "ray", "model": model, "workers": r.workers, "docs": r.encoded, "seconds": round(sec, 2),
            "docs_per_s": round(r.encoded / sec, 1)}


def local_score_all(s, k: int) -> dict:
    cold = s.score_all(k=k)  # builds the serving state, as a command does (and each Ray actor)
    r = s.score_all(k=k)  # warm: the state is kept per process
    return {"engine": "local", "users": r.users, "rows": r.rows, "seconds": cold.seconds, "warm_seconds": r.seconds,
            "users_per_s": cold.users_per_s}


def ray_score_all(s, k: int, workers: int | None = None) -> dict:
    r = s.score_all(k=k, engine="ray", workers=workers)  # each actor builds its own serving state: counted
    return {"engine": "ray", "workers": r.workers, "users": r.users, "rows": r.rows, "seconds": r.seconds,
            "users_per_s": r.users_per_s}


def ray_start(cpus: int | None) -> float:
    import ray

    t = time.perf_counter()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return round(time.perf_counter() - t, 2)


def part_ray(args) -> dict:
    out: dict = {"load_before": load(), "cpus": os.cpu_count()}
    out["ray_start_s"] = ray_start(args.cpus)
    t = time.perf_counter()
    ray_encode(200, "fake")  # the first Ray Data job imports its modules: not the engine's steady cost
    out["first_job_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    ray_encode(2, "fake", 1)
    out["fixed_cost_s"] = round(time.perf_counter() - t, 2)  # a job of one tiny block: actor start and teardown
    print(f"ray start {out['ray_start_s']}s, first job {out['first_job_s']}s, a one-block job "
          f"{out['fixed_cost_s']}s  [{load()}]", flush=True)
    rows = []
    for model, n in (("fake", args.items), ("minilm", args.minilm_items)):
        a, b = local_encode(n, model), ray_encode(n, model)
        rows.append({"model": model, "docs": n, "local_s": a["seconds"], "ray_s": b["seconds"],
                     "ray_workers": b["workers"], "overhead": round(b["seconds"] / a["seconds"], 2)})
        print(f"encode {model:6} {n:6} docs: local {a['seconds']:7.2f}s  ray {b['seconds']:7.2f}s "
              f"({b['workers']} actors)  ratio {rows[-1]['overhead']:.2f}x  [{load()}]", flush=True)
    out["encode"] = rows
    one, two = ray_encode(args.minilm_items, "minilm", 1), ray_encode(args.minilm_items, "minilm", 2)
    out["scaling"] = {"one": one, "two": two, "speedup": round(two["docs_per_s"] / one["docs_per_s"], 2)}
    print(f"ray encode minilm: 1 actor {one['docs_per_s']} docs/s, 2 actors {two['docs_per_s']} docs/s, "
          f"{out['scaling']['speedup']}x  [{load()}]", flush=True)
    s = shop_store(args.shop)
    a, b = local_score_all(s, args.k), ray_score_all(s, args.k)
    out["score_all"] = {"local": a, "ray": b, "ratio": round(b["seconds"] / a["seconds"], 2)}
    print(f"score-all {a['users']} users k={args.k}: local {a['seconds']}s (warm {a['warm_seconds']}s), "
          f"ray {b['seconds']}s "
          f"({b['workers']} actors), ratio {out['score_all']['ratio']}x  [{load()}]", flush=True)
    out["load_after"] = load()
    return out


# ------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["ray", "s3", "window"], required=True)
    p.add_argument("--rows", type=int, default=100_000, help="interactions for --part s3")
    p.add_argument("--items", type=int, default=20_000, help="documents for the fake-encoder encode")
    p.add_argument("--minilm-items", type=int, default=2_000, help="documents for the MiniLM encode")
    p.add_argument("--shop", default="small", help="sample shop size for score-all")
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.part == "s3":
        import bench_scale_s3

        bench_scale_s3.main(["--part", "s3", "--rows", str(args.rows)])
        return
    if args.part == "window":
        import bench_scale_window

        bench_scale_window.main([] if args.json is None else ["--json", args.json])
        return
    print(load(), flush=True)
    out = part_ray(args)
    print(out["load_after"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
