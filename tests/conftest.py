"""Shared fixtures: temporary stores, sample data, a CLI runner."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("LANCE_LOG", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import settings

from dynstore.demo import DEMO_RULES as SHOP_RULES

# CI (`.ci/run` sets CI=1) replays the same examples on every run, so a red run is
# reproducible; on a developer's machine hypothesis keeps drawing new ones
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def store(store_path):
    """An empty store using the tiny fake encoder."""
    import dynstore

    s = dynstore.init(store_path, model="fake", **SHOP_RULES)
    yield s
    s.close()


@pytest.fixture(scope="session")
def shop_frames():
    from dynstore.samples import shop

    return shop.generate("tiny", seed=0)


@pytest.fixture(scope="session")
def shop_files(tmp_path_factory, shop_frames):
    """The tiny sample shop as files: users.parquet, items.csv, interactions.parquet."""
    d = tmp_path_factory.mktemp("shop")
    shop_frames["users"].write_parquet(d / "users.parquet")
    shop_frames["items"].write_csv(d / "items.csv")
    shop_frames["interactions"].write_parquet(d / "interactions.parquet")
    return d


@pytest.fixture
def loaded(store, shop_files):
    """A fake-encoder store with the tiny shop ingested."""
    store.ingest("users", shop_files / "users.parquet")
    store.ingest("items", shop_files / "items.csv")
    store.ingest("interactions", shop_files / "interactions.parquet")
    return store


@pytest.fixture
def encoded(loaded):
    """The tiny shop store, encoded (version 1 exists)."""
    loaded.encode()
    return loaded


@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture
def hold_lock():
    """``with hold_lock(store_path, kind):`` — another process holds that writer lock."""
    import contextlib
    import subprocess
    import sys

    @contextlib.contextmanager
    def hold(path, kind):
        code = (
            "import pathlib, time\n"
            "from dynstore.storage.locks import writer_lock\n"
            f"with writer_lock(pathlib.Path({str(path)!r}), {kind!r}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n"
        )
        holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            yield
        finally:
            holder.kill()
            holder.wait()

    return hold
