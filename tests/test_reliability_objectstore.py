"""Issue 24 on object storage (moto's S3 server, as tests/test_object_store.py): ``init``
exclusive, a busy config never failing a committed ingest, and the registry's version
numbers unique when a paused writer's lease was taken over."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

pytest.importorskip("boto3", reason="object-store tests need boto3 (pip install 'dynstore[s3]')")
moto_server = pytest.importorskip("moto.server", reason="object-store tests need moto[server]")

import dynstore
from dynstore.errors import StoreBusy

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3_env():
    """A moto server; the environment points boto3 and Lance at it (dummy keys)."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
                           "LANCE_LOG": "error"}.items():
            mp.setenv(key, value)
        for key in ("AWS_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        yield endpoint
    server.stop()


@pytest.fixture
def uri(s3_env):
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}/shop"


def test_init_is_exclusive(uri):
    """Three `init`s at once on one prefix: exactly one creates the store (its rules
    stand), the others exit 1; a later `init` there fails too."""
    procs = [subprocess.Popen([sys.executable, "-m", "dynstore", "init", uri, "--model", "fake",
                               "--positive", f"value > {n}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for n in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1, 1], (codes, outs)
    with dynstore.connect(uri) as s:
        assert s.config.positive == f"value > {codes.index(0)}"
    with pytest.raises(dynstore.errors.StoreExists):
        dynstore.init(uri, model="fake")


def test_busy_config_and_paused_registry_writer(uri):
    """The config lease held by another process: a first ingest (string ids) commits and
    succeeds. Then a registry writer whose lease expires while it is paused: the writer
    that takes over gets the next free number, and the paused one commits nothing."""
    from dynstore.storage.objectstore import Lease
    from dynstore.storage.registry import list_versions, next_version, registry_table, write_registry

    import polars as pl

    store = dynstore.init(uri, model="fake")
    code = ("import sys, time\nfrom dynstore.storage.backend import open_storage\n"
            "with open_storage(sys.argv[1]).lock('config', wait=30):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        store.ingest("items", pl.DataFrame({"item_id": [f"sku-{i}" for i in range(6)],
                                            "title": [f"thing {i}" for i in range(6)]}))
        store.ingest("interactions", pl.DataFrame({"user_id": ["u1", "u2", "u1"], "item_id": ["sku-1", "sku-2", "sku-3"],
                                                   "ts": ["2025-05-01 10:00:00"] * 3, "event": ["click"] * 3}))
    finally:
        holder.kill()
        holder.wait()
    assert store.catalog.id_types() == {"item": "string", "user": "string"}
    assert store.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == 3
    store.encode()  # version 1
    assert [r["version"] for r in list_versions(store.catalog)] == [1]

    paused = dynstore.connect(uri, storage_options={"lease_ttl": "1"}).catalog
    other = dynstore.connect(uri, storage_options={"lease_ttl": "1"}).catalog
    renew = Lease._renew
    Lease._renew = lambda self: None  # a paused process renews nothing
    try:
        with paused.lock("versions"):
            mine = next_version(paused)
            time.sleep(2.5)  # past the ttl (Last-Modified has whole seconds)
            with other.lock("versions", wait=5):  # taken over
                theirs = next_version(other)
                rows = registry_table(other).to_pylist()
                write_registry(other, rows + [dict(rows[0], version=theirs, status="candidate")])
            rows = registry_table(paused).to_pylist()
            with pytest.raises(StoreBusy, match="paused longer than its lease"):
                write_registry(paused, rows + [dict(rows[0], version=mine, status="candidate")])
    finally:
        Lease._renew = renew
    assert (mine, theirs) == (2, 3)
    numbers = [r["version"] for r in list_versions(store.catalog)]
    assert sorted(numbers) == [1, 3] and len(set(numbers)) == len(numbers)
    store.close()
