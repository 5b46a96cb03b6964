"""``kill -9`` at seeded moments of ingest, encode, refresh and refresh --finetune-encoder.

For every command, 20 moments (seed ``DYNSTORE_KILL_SEED``, default 10): half
at a write event (before it starts, during it, right after it: see
tests/crashpoint.py), half at a point in time within a full run. Each moment
starts from a fresh copy of a prepared store; after the kill the store is
opened and checked (tests/store_checks.py: one current version, complete
embeddings, registry and config agreeing, serving answers, no partial
ingest), then the command is run again and must complete, and the store is
checked again.

Refresh runs take seconds, so their moments follow each other on one copy
(see ``_exercise``'s ``chain``): the run after a kill is the next moment's, and
every fourth kill is followed by a complete rerun. Two copies go side by side.

The commands run in children forked from one server that imported torch and
transformers once (each child a real process, killed with a real SIGKILL),
which saves seconds per run. Sized for ``.ci/run`` on a 2-core machine (about
four minutes in all); raise the moments with ``DYNSTORE_KILL_MOMENTS``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import dynstore
from store_checks import check_store, shop_store

pytestmark = pytest.mark.slow

MOMENTS = int(os.environ.get("DYNSTORE_KILL_MOMENTS", "20"))
SEED = int(os.environ.get("DYNSTORE_KILL_SEED", "10"))
HERE = Path(__file__).resolve().parent


class CrashServer:
    """tests/crashpoint.py serve: one request line in, one reply line out."""

    def __init__(self):
        env = dict(os.environ, LANCE_LOG="error", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "crashpoint.py"), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def run(self, **request) -> dict:
        return self.run_all([request])[0]

    def run_all(self, requests: list) -> list:
        """Run the requests side by side (one forked child each); their replies in order."""
        self.proc.stdin.write(json.dumps(requests) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        assert isinstance(reply, list), reply
        return reply

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    s = CrashServer()
    yield s
    s.close()


def _moments(writes: int, seconds: float, rng: random.Random, count: int, first=()) -> list[dict]:
    """Half at write events (``first``, then every (write, phase) pair once, in a seeded
    order, before any repeats), half at seeded points in time of a full run."""
    pairs = [(k, p) for k in range(1, writes + 1) for p in ("before", "during", "after")]
    rng.shuffle(pairs)
    pairs = list(first) + [p for p in pairs if p not in first]
    n_write = (count + 1) // 2
    while len(pairs) < n_write:
        pairs.append((rng.randint(1, writes), "during"))
    out = [{"kill_at": k, "phase": p, "delay": round(rng.uniform(0.0, 0.02), 4)} for k, p in pairs[:n_write]]
    out += [{"kill_after": round(rng.uniform(0.05, seconds), 3)} for _ in range(count - n_write)]
    return out


def _exercise(server, template: Path, work: Path, args: list, *, check, tune=None, log=None, count=MOMENTS,
              chain: bool = False, lanes: int = 2, critical=None):
    """Count the command's writes and time it on a copy, then kill it at ``count`` moments.

    Each moment starts from a fresh copy of ``template`` and is followed by a check,
    a complete rerun and a check. With ``chain`` (commands whose runs take seconds:
    refresh) the moments follow each other on one copy instead: the run after a
    kill is the next moment's run, itself killed, and every fourth kill (and the
    last) is followed by a complete rerun -- so each kill is followed by a check
    and a rerun that starts from the state it left. ``lanes`` copies go side by
    side (independent stores, one process each: two cores, half the time).
    ``critical(write names) -> [(k, phase)]`` names moments that must be among them.
    """
    rng = random.Random(f"{SEED}-{args[0]}-{'-'.join(map(str, args[2:]))}")
    probe = work / "probe"
    shutil.copytree(template, probe)
    count_file = work / "writes.txt"
    logs = str(log or os.devnull)

    def argv(store):
        return [str(a) if a != "{store}" else str(store) for a in args]

    full = server.run(args=argv(probe), count_file=str(count_file), tune=tune, log=logs)
    assert full.get("code") == 0, (full, (log.read_text()[-2000:] if log else ""))
    names = count_file.read_text().splitlines()
    writes = len(names)
    assert writes >= 1
    moments = _moments(writes, full["seconds"], rng, count, critical(names) if critical else ())
    killed = 0
    spent = {"killed_runs": 0.0, "reruns": 0.0, "checks": 0.0}
    chains = [work / f"chain{n}" for n in range(lanes)]
    for store in chains if chain else ():
        shutil.copytree(template, store)
    for step, start in enumerate(range(0, len(moments), lanes)):
        batch = moments[start:start + lanes]
        stores = chains[:len(batch)] if chain else [work / f"m{start + n}" for n in range(len(batch))]
        for store in stores if not chain else ():
            shutil.copytree(template, store)
        replies = server.run_all([dict(args=argv(st), tune=tune, log=logs, **m) for st, m in zip(stores, batch)])
        spent["killed_runs"] += max(r["seconds"] for r in replies)
        for moment, reply, store in zip(batch, replies, stores):
            killed += reply.get("signal") == 9
            assert reply.get("signal") == 9 or reply.get("code") == 0, (moment, reply)
            t0 = time.perf_counter()
            check(store, after_kill=True)
            spent["checks"] += time.perf_counter() - t0
        if not chain or step % 4 == 3 or start + lanes >= len(moments):
            again = server.run_all([dict(args=argv(st), tune=tune, log=logs) for st in stores])
            spent["reruns"] += max(r["seconds"] for r in again)
            for moment, reply, store in zip(batch, again, stores):
                assert reply.get("code") == 0, (moment, reply, (log.read_text()[-2000:] if log else ""))
                t0 = time.perf_counter()
                check(store, after_kill=False)
                spent["checks"] += time.perf_counter() - t0
        for store in stores if not chain else ():
            shutil.rmtree(store)
    print(f"{' '.join(map(str, args[:1] + args[2:]))}: {writes} write events, full run {full['seconds']:.1f} s, "
          f"{killed}/{len(moments)} killed; " + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()))
    # every write moment kills; a time moment may come after a fast run ended
    assert killed >= (count + 1) // 2, f"only {killed} of {len(moments)} runs were killed"
    return writes, killed


@pytest.fixture(scope="module")
def shop_template(tmp_path_factory, shop_files):
    path = tmp_path_factory.mktemp("tpl") / "loaded"
    shop_store(path, shop_files, encode=False).close()
    encoded = path.parent / "encoded"
    shutil.copytree(path, encoded)
    with dynstore.connect(encoded) as s:
        s.encode()
    return path, encoded


def test_kill_ingest(server, shop_template, shop_files, tmp_path):
    """Interactions appended (deduplicated on rerun) and with a new column (the whole
    table rewritten in one commit), items upserted: all of it lands or none."""
    _, template = shop_template
    base = dynstore.connect(template, read_only=True)
    n0 = base.sql("SELECT count(*) FROM interactions").fetchall()[0][0]
    titles0 = dict(base.sql("SELECT item_id, title FROM items").fetchall())
    base.close()
    rng = np.random.default_rng(0)
    new = pl.DataFrame({"user_id": rng.integers(1, 61, 500), "item_id": rng.integers(1, 81, 500),
                        "ts": pl.datetime_range(pl.datetime(2025, 6, 1), pl.datetime(2025, 6, 2), "1m", eager=True)[:500],
                        "event": ["click"] * 500, "value": [1.0] * 500})
    plain, keyed, items = tmp_path / "new.parquet", tmp_path / "keyed.parquet", tmp_path / "items.csv"
    new.write_parquet(plain)
    new.with_columns(pl.int_range(0, 500).alias("event_id")).write_parquet(keyed)
    pl.DataFrame({"item_id": list(range(1, 81)) + [500], "title": [f"renamed {i}" for i in range(1, 82)]}).write_csv(items)

    def check_interactions(store, after_kill):
        got = check_store(store)
        assert got["interactions"] in ((n0, n0 + 500) if after_kill else (n0 + 500,)), got
        assert got["items"] == 80

    def check_items(store, after_kill):
        got = check_store(store)
        with dynstore.connect(store, read_only=True) as s:
            titles = dict(s.sql("SELECT item_id, title FROM items").fetchall())
        renamed = {i: f"renamed {i}" for i in range(1, 81)} | {500: "renamed 81"}
        assert titles in ((titles0, renamed) if after_kill else (renamed,)), "a partial upsert"
        assert got["items"] == len(titles)

    store = "{store}"
    third = -(-MOMENTS // 3)  # the moments of the command, shared by its three kinds of ingest
    _exercise(server, template, tmp_path / "a", ["ingest", store, "interactions", plain, "--dedupe"],
              check=check_interactions, count=third)
    _exercise(server, template, tmp_path / "b", ["ingest", store, "interactions", keyed, "--key", "event_id"],
              check=check_interactions, count=third)
    _exercise(server, template, tmp_path / "c", ["ingest", store, "items", items], check=check_items,
              count=MOMENTS - 2 * third)


def test_kill_encode(server, shop_template, tmp_path):
    """The first encode (chunks of the cache, then version 1) and a re-encode of every item."""
    loaded, encoded = shop_template

    def check(store, after_kill):
        got = check_store(store)
        if not after_kill:
            assert got["stale"] == 0 and got["current"] == 1

    half = MOMENTS // 2
    _exercise(server, loaded, tmp_path / "first", ["encode", "{store}"], check=check, count=half)
    _exercise(server, encoded, tmp_path / "all", ["encode", "{store}", "--all"], check=check, count=MOMENTS - half)


def test_kill_refresh(server, shop_template, tmp_path):
    _, encoded = shop_template

    def check(store, after_kill):
        got = check_store(store)
        assert got["current"] is not None
        if not after_kill:
            assert len(got["versions"]) >= 2

    _exercise(server, encoded, tmp_path / "r", ["refresh", "{store}", "--force", "--since", "all", "--epochs", "1"],
              check=check, chain=True)


def test_kill_refresh_after_an_encoder_change(server, shop_template, tmp_path):
    """The first version of a new encoder's width rewrites every version's rows into
    variable-width vectors in one commit: a kill leaves the old rows or the new ones."""
    from click.testing import CliRunner

    from dynstore.cli import main

    _, encoded = shop_template
    changed = tmp_path / "changed"
    shutil.copytree(encoded, changed)
    for args in (["config", str(changed), "--model", "fake:64"], ["encode", str(changed)]):
        assert CliRunner().invoke(main, args).exit_code == 0

    def check(store, after_kill):
        got = check_store(store, new_encoder=True)
        assert got["current"] is not None
        with dynstore.connect(store) as s:
            assert s.sql("SELECT count(*) FROM item_embeddings_all WHERE version = 1").fetchall()[0][0] > 0

    _exercise(server, changed, tmp_path / "r", ["refresh", "{store}", "--force", "--since", "all", "--epochs", "1"],
              check=check, count=8)


@pytest.fixture(scope="module")
def bert_template(tmp_path_factory, shop_files):
    from test_finetune import tiny_bert as make_bert  # the module's tiny-BERT fixture, called directly

    bert = make_bert.__wrapped__(tmp_path_factory)
    path = tmp_path_factory.mktemp("bert") / "s"
    # the first 700 events: enough to train and judge, and each fine-tuning run stays short
    shop_store(path, shop_files, model=str(bert),
               interactions=pl.read_parquet(shop_files / "interactions.parquet").sort("ts").head(700)).close()
    return path


def test_kill_refresh_finetune_encoder(server, bert_template, tmp_path):
    """Promotion of a fine-tuned encoder: registry and config always agree (the
    kill between the version's commit and the config switch is among the moments)."""
    enc0 = dynstore.connect(bert_template, read_only=True).config.model

    def check(store, after_kill):
        got = check_store(store)
        with dynstore.connect(store, read_only=True) as s:
            model = s.config.model
        if not after_kill:
            assert model.startswith("encoders/ft-"), model
        else:
            assert model == enc0 or model.startswith("encoders/ft-")
        return got

    def critical(names):
        """Around the registry commit that promotes the fine-tuned encoder: the config
        names it (pending) before, and is settled after."""
        registry = max(n for n, name in enumerate(names, 1) if name == "lance.write_dataset")
        settle = max(n for n, name in enumerate(names, 1) if name == "os.replace")
        assert settle > registry, names
        return [(registry, "before"), (registry, "after"), (settle, "before")]

    log = tmp_path / "ft.log"
    writes, _ = _exercise(server, bert_template, tmp_path / "ft",
                          ["refresh", "{store}", "--finetune-encoder", "--finetune-steps", "1", "--epochs", "1",
                           "--since", "all", "--force"], check=check, tune="promote", log=log, chain=True,
                          critical=critical)
    assert writes >= 6  # encoder files, the re-encoded cache, version files, config, registry
