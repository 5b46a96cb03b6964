"""The Ray engine (issue 13): ``encode`` and ``score-all`` on a local Ray cluster equal
the local engine's results. Marked ``ray``; skipped when Ray is not installed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data]: pip install 'dynstore[ray]'")
pytest.importorskip("ray.data", reason="the Ray engine needs ray[data]: pip install 'dynstore[ray]'")

import dynstore  # noqa: E402
from dynstore.cli import main  # noqa: E402
from dynstore.demo import DEMO_RULES  # noqa: E402
from dynstore.encoders.cache import cache_dataset  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def cluster():
    started = not ray.is_initialized()
    if started:  # workers inherit this environment: PYTHONPATH finds dynstore as the tests do
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


def _store(tmp_path, name, shop_files):
    s = dynstore.init(tmp_path / name, model="fake", **DEMO_RULES)
    s.ingest("users", shop_files / "users.parquet")
    s.ingest("items", shop_files / "items.csv")
    s.ingest("interactions", shop_files / "interactions.parquet")
    return s


def _vectors(store):
    t = cache_dataset(store.catalog).to_table().sort_by("doc_hash")
    return t.column("doc_hash").to_pylist(), np.stack(t.column("vector").to_numpy(zero_copy_only=False))


def test_encode_on_ray_equals_local(tmp_path, shop_files, runner):
    local, remote = _store(tmp_path, "local", shop_files), _store(tmp_path, "ray", shop_files)
    a = local.encode()
    r = runner.invoke(main, ["encode", str(remote.path), "--engine", "ray", "--workers", "2", "--json"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    b = json.loads(r.output)
    assert (b["engine"], b["encoded"], b["stale"], b["version"]) == ("ray", a.encoded, a.stale, a.version)
    ha, va = _vectors(local)
    hb, vb = _vectors(remote)
    assert ha == hb and np.allclose(va, vb, atol=1e-5)
    assert remote.sql("SELECT count(*) FROM stale_items").fetchall()[0][0] == 0
    assert remote.encode(engine="ray").encoded == 0  # nothing stale: no cluster work


def test_score_all_on_ray_equals_local(encoded, runner):
    local = encoded.score_all(k=10)
    table_local = encoded.catalog.dataset("batch_recommendations").to_table()
    r = runner.invoke(main, ["score-all", str(encoded.path), "-k", "10", "--engine", "ray", "--json"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["engine"] == "ray" and out["workers"] >= 1 and out["rows"] == local.rows
    assert out["table_version"] == local.table_version + 1
    table_ray = encoded.catalog.dataset("batch_recommendations").to_table()
    assert table_ray.equals(table_local)


def test_command_line_connects_to_RAY_ADDRESS(encoded):
    """A new process, as cron runs it: nothing initialised, the cluster named by RAY_ADDRESS."""
    encoded.score_all(k=5)
    local = encoded.catalog.dataset("batch_recommendations").to_table()
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    res = subprocess.run([sys.executable, "-m", "dynstore", "score-all", str(encoded.path), "-k", "5", "--engine",
                          "ray", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["engine"] == "ray" and out["workers"] == 1  # 60 users: one block of at least 256, one actor
    assert encoded.catalog.dataset("batch_recommendations").to_table().equals(local)
