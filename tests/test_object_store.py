"""A store on object storage (``s3://bucket/shop``) against moto's S3 server.

Every test runs on a fresh bucket of one in-process moto server (no Docker); the
AWS_* environment points boto3 and Lance at it.
"""
from __future__ import annotations

import json
import time
import uuid

import pytest

pytest.importorskip("boto3", reason="object-store tests need boto3 (pip install 'dynstore[s3]')")
moto_server = pytest.importorskip("moto.server", reason="object-store tests need moto[server]")

import dynstore
from dynstore.errors import DynstoreError, StoreBusy, StoreExists, StoreNotFound

pytestmark = pytest.mark.s3

SECRET = "dynstore-test-secret-" + uuid.uuid4().hex[:8]
RULES = {"positive": "event IN ('click', 'purchase')", "negative": "event = 'skip'"}


@pytest.fixture(scope="module")
def s3_server():
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3_env(s3_server):
    """The environment points boto3 and Lance at the moto server (dummy keys)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": SECRET,
                           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server, "AWS_ALLOW_HTTP": "true"}.items():
            mp.setenv(key, value)
        for key in ("AWS_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        yield s3_server


def _new_bucket(endpoint):
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def bucket(s3_env):
    """A fresh bucket."""
    return _new_bucket(s3_env)


@pytest.fixture(scope="module")
def built(s3_env, tmp_path_factory):
    """``(client, bucket, uri, store)``: a store built once (init, ingest, encode, refresh)."""
    client, name = _new_bucket(s3_env)
    uri = f"s3://{name}/shop"
    store, result = _build(uri, _shop_files(tmp_path_factory.mktemp("shop")))
    assert result.status in ("current", "rejected", "candidate")
    yield client, name, uri, store
    store.close()


def _shop_files(d, n_users=24, n_items=30, n_events=600):
    """A small shop with string ids, as CSV files."""
    import random

    rnd = random.Random(0)
    words = ["red", "blue", "shoe", "hat", "lamp", "desk", "cup", "tea", "book", "pen"]
    items = ["item_id,title,category"] + [
        f"sku-{i},{rnd.choice(words)} {rnd.choice(words)} {i},{'home' if i % 2 else 'fashion'}" for i in range(n_items)]
    (d / "items.csv").write_text("\n".join(items) + "\n")
    events = ["user_id,item_id,ts,event"]
    for n in range(n_events):
        u, i = rnd.randrange(n_users), (rnd.randrange(n_items) + 3 * rnd.randrange(n_users)) % n_items
        day = 1 + n * 27 // n_events
        events.append(f"u{u},sku-{i},2025-05-{day:02d} 10:00:00,{rnd.choice(['click', 'click', 'purchase', 'skip'])}")
    (d / "interactions.csv").write_text("\n".join(events) + "\n")
    return d


def _build(uri, files):
    store = dynstore.init(uri, model="fake", **RULES)
    store.ingest("items", files / "items.csv")
    store.ingest("interactions", files / "interactions.csv")
    store.encode()
    # promoted whatever its holdout says (tolerance 1): the rollback below needs a second current version
    result = store.refresh(since="all", force=True, epochs=1, tolerance=1.0)
    return store, result


def test_python_api_end_to_end(built):
    client, name, uri, store = built
    assert store.path == uri and store.catalog.id_type("user") == "string"
    recs = store.sql("SELECT recommend('u3', 5) AS r").fetchall()[0][0]
    assert 0 < len(recs) <= 5 and all(r["item_id"].startswith("sku-") for r in recs)
    assert store.recommend("u3", 5)[0]["item_id"] == recs[0]["item_id"]
    counts = dict(store.sql("SELECT event, count(*) FROM interactions GROUP BY event").fetchall())
    assert sum(counts.values()) == 600
    # the layout is the local one, under the prefix
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="shop/")["Contents"]}
    assert "shop/dynstore.toml" in keys and "shop/models/v1.json" in keys
    assert any(k.startswith("shop/tables/interactions.lance/_versions/") for k in keys)
    # another connection sees the same store; inspect and compact work there too
    with dynstore.connect(uri, read_only=True) as reader:
        assert reader.recommend("u3", 5) == store.recommend("u3", 5)
        assert reader.inspect()["tables"]["interactions"]["rows"] == 600
    out = store.compact(retain_seconds=0)
    assert "interactions" in out.datasets and not out.skipped
    assert [r["item_id"] for r in store.recommend("u3", 5)] == [r["item_id"] for r in recs]
    # the other writers: config, delete, impressions, rollback
    store.configure(retain_seconds=120)
    assert dynstore.connect(uri).config.retain_seconds == 120
    assert store.delete("interactions", "event = 'skip'", dry_run=True).deleted > 0
    assert store.log_impressions("u3", [recs[0]["item_id"]]) == 1
    assert len(store.versions()) > 1 and store.versions()[0]["status"] == "current"
    assert store.rollback(1).version == 1 and store.versions()[0]["status"] in ("current", "retired")
    assert store.sql("SELECT max(version) FROM versions WHERE status = 'current'").fetchall()[0][0] == 1


def test_cli_end_to_end(bucket, tmp_path):
    from click.testing import CliRunner

    from dynstore.cli import main

    _client, name = bucket
    uri, files = f"s3://{name}/cli-shop", _shop_files(tmp_path)
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    run("init", uri, "--model", "fake", "--positive", RULES["positive"], "--negative", RULES["negative"])
    run("ingest", uri, "items", files / "items.csv")
    run("ingest", uri, "interactions", files / "interactions.csv")
    run("encode", uri)
    run("refresh", uri, "--since", "all", "--force")
    out = run("sql", uri, "SELECT count(*) AS n FROM interactions", "--format", "json")
    assert "600" in out
    out = run("recommend", uri, "u3", "-k", "3", "--format", "json")
    assert out.count("sku-") == 3
    with dynstore.connect(uri) as store:
        assert store.versions()[0]["version"] >= 1


def test_reader_keeps_its_snapshot_while_a_writer_ingests(built, tmp_path):
    _client, _name, uri, writer = built
    reader = dynstore.connect(uri, read_only=True)
    con = reader.connection()  # pinned at the commits it first sees
    q = "SELECT (SELECT count(*) FROM interactions) AS n, recommend('u5', 5) AS r"
    n0, r0 = con.sql(q).fetchall()[0]
    (tmp_path / "more.csv").write_text("user_id,item_id,ts,event\n" + "".join(
        f"u5,{r0[0]['item_id']},2025-05-28 12:00:00,purchase\n" for _ in range(20)))
    assert writer.ingest("interactions", tmp_path / "more.csv").rows == 20
    n1, r1 = con.sql(q).fetchall()[0]
    assert (n1, [r["item_id"] for r in r1]) == (n0, [r["item_id"] for r in r0])
    reader.follow(con)
    assert con.sql(q).fetchall()[0][0] == n0 + 20
    con.close()
    reader.close()


def test_lease_excludes_a_second_writer_and_expires(bucket, tmp_path):
    from dynstore.storage.objectstore import Lease

    client, name = bucket
    uri = f"s3://{name}/shop"
    store = dynstore.init(uri, model="fake", **RULES)
    (tmp_path / "items.csv").write_text("item_id,title\nsku-1,a red hat\n")
    with store.catalog.lock("ingest-items"):
        other = dynstore.connect(uri)
        with pytest.raises(StoreBusy, match="busy"):
            with other.catalog.lock("ingest-items", wait=0.3):
                pass
        assert other.ingest("users", _users(tmp_path)).rows == 1  # another kind is free
    assert store.ingest("items", tmp_path / "items.csv").rows == 1  # released
    assert "Contents" not in client.list_objects_v2(Bucket=name, Prefix="shop/locks/")
    # a writer killed while holding the lease: it never renews, never releases
    dead = Lease(client, name, "shop/locks/ingest-items.lease", ttl=2.0, heartbeat=False)
    dead.acquire(0)
    with pytest.raises(StoreBusy, match="died releases it after 2 s"):
        with store.catalog.lock("ingest-items", wait=0.2):
            pass
    time.sleep(3.2)  # past the ttl (the object store's clock has 1 s steps)
    assert store.ingest("items", tmp_path / "items.csv").rows == 1  # taken over
    holder = json.loads(client.get_object(Bucket=name, Key="shop/locks/ingest-items.lease")["Body"].read()) \
        if "Contents" in client.list_objects_v2(Bucket=name, Prefix="shop/locks/") else None
    assert holder is None  # the new writer released it


def test_heartbeat_keeps_the_lease(bucket):
    from dynstore.storage.objectstore import Lease

    client, name = bucket
    held = Lease(client, name, "locks/x.lease", ttl=1.0)
    held.acquire(0)
    time.sleep(2.5)  # longer than the ttl: renewed meanwhile
    with pytest.raises(StoreBusy):
        Lease(client, name, "locks/x.lease", ttl=1.0).acquire(0.2)
    held.release()
    Lease(client, name, "locks/x.lease").acquire(0)


def _users(d):
    (d / "users.csv").write_text("user_id,segment\nu1,new\n")
    return d / "users.csv"


def test_no_secret_in_the_store(built):
    client, name, _uri, _store = built
    with pytest.raises(DynstoreError, match="secret"):
        from dynstore.storage.config import StoreConfig

        StoreConfig.parse('format_version = 1\n[storage]\naws_secret_access_key = "x"\n', "t")
    objects = client.list_objects_v2(Bucket=name)["Contents"]
    assert len(objects) > 20
    for o in objects:
        if o["Size"] < 5_000_000:
            body = client.get_object(Bucket=name, Key=o["Key"])["Body"].read()
            assert SECRET.encode() not in body, o["Key"]
            assert b"testing-key" not in body, o["Key"]


def test_missing_store_and_storage_table(bucket):
    client, name = bucket
    with pytest.raises(StoreNotFound):
        dynstore.connect(f"s3://{name}/nothing")
    store = dynstore.init(f"s3://{name}/s", model="fake")
    with pytest.raises(StoreExists):
        dynstore.init(f"s3://{name}/s", model="fake")
    # a [storage] table (no secrets) in the store's config applies when it is opened
    text = client.get_object(Bucket=name, Key="s/dynstore.toml")["Body"].read().decode()
    client.put_object(Bucket=name, Key="s/dynstore.toml", Body=text + '\n[storage]\nlease_ttl = 7\n')
    again = dynstore.connect(f"s3://{name}/s")
    assert again.catalog.storage.lease_ttl == 7.0 and again.config.storage == {"lease_ttl": "7"}
    store.close()


def test_local_stores_never_import_boto3(tmp_path):
    import subprocess
    import sys

    (tmp_path / "items.csv").write_text("item_id,title\n1,a hat\n")
    code = ("import sys, dynstore\n"
            f"s = dynstore.init({str(tmp_path / 's')!r}, model='fake')\n"
            f"s.ingest('items', {str(tmp_path / 'items.csv')!r})\n"
            "s.sql('SELECT count(*) FROM items').fetchall()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')"
            " or m == 'dynstore.storage.objectstore'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
