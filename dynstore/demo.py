"""``dynstore demo``: a sample shop store, end to end, in one command."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dynstore.errors import ConfigError, StoreExists
from dynstore.formatting import table

if TYPE_CHECKING:  # pragma: no cover
    from dynstore.results import RefreshResult
    from dynstore.store import Store

__all__ = ["run_demo"]

DEMO_RULES = {"positive": "event IN ('click', 'purchase')", "negative": "event = 'skip'"}
#: A file the demo leaves in its directory: only such a directory is ever rebuilt.
MARKER = ".dynstore-demo"


def prepare_directory(directory: str | os.PathLike | None) -> Path:
    """The demo's directory: new, empty, or an earlier demo's (whose store and data are removed).

    Anything else is refused, so a mistyped path never loses a user's files.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> (d / "notes.txt").write_text("mine")
    4
    >>> prepare_directory(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dynstore.errors.StoreExists: ...: holds files that dynstore demo did not create (e.g. notes.txt); choose a new or empty directory
    """
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="dynstore-demo-"))
    if root.exists() and not root.is_dir():
        raise StoreExists(f"{root}: exists and is not a directory; choose a new or empty directory")
    if root.exists() and not (root / MARKER).is_file():
        entries = sorted(p.name for p in root.iterdir())
        if entries:
            raise StoreExists(f"{root}: holds files that dynstore demo did not create (e.g. {entries[0]}); "
                              "choose a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by `dynstore demo`, which may rebuild this directory\n")
    for sub in ("store", "data"):
        if (root / sub).exists():
            shutil.rmtree(root / sub)
    return root


def run_demo(directory: str | None = None, *, size: str = "small", model: str = "minilm", seed: int = 0,
             echo: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Generate shop data, build a store, encode, recommend, refresh; print each step.

    Returns the store path. The data before the drift point is ingested first,
    a refresh trains on it, then the drifted tail arrives and a second refresh
    recovers; the metrics before and after are printed. ``directory`` must be
    new, empty or an earlier demo's (see :func:`prepare_directory`).

    Examples
    --------
    >>> import tempfile
    >>> path = run_demo(tempfile.mkdtemp() + "/demo", size="tiny", model="fake", echo=lambda s: None)
    >>> (path / "dynstore.toml").exists()
    True
    """
    from dynstore.samples import shop

    from dynstore.store import init

    t0 = time.perf_counter()
    if size not in shop.SIZES:
        raise ConfigError(f"--size {size!r}: use one of {', '.join(shop.SIZES)}")
    root = prepare_directory(directory)
    data_dir, store_dir = root / "data", root / "store"
    paths, after_rows = write_data(data_dir, size=size, seed=seed)
    where = "a temporary directory: pass DIR to choose one" if directory is None else "kept after the demo"
    echo(f"== the demo's store: {store_dir} ({where})")
    echo(f"== generated a '{size}' sample shop in {data_dir}")
    with init(store_dir, model=model, **DEMO_RULES) as store:
        echo(f"$ dynstore init {store_dir} --positive \"{DEMO_RULES['positive']}\" "
             f"--negative \"{DEMO_RULES['negative']}\"")
        user = _load_and_encode(store, paths, echo, progress)
        _retrain_across_the_drift(store, paths, after_rows, echo)
        _show_results(store, user, echo)
        echo(f"\ndone in {time.perf_counter() - t0:.1f}s; the store is {store_dir}. Try:\n"
             f"  dynstore sql {store_dir} \"SELECT recommend({user}, 10)\"\n"
             f"  dynstore recommend {store_dir} {user}")
    return store_dir


def write_data(data_dir: Path, *, size: str, seed: int) -> tuple[dict[str, Path], int]:
    """Write the sample shop's files into ``data_dir``, interactions split at the drift point.

    Returns the paths (``users``, ``items``, ``before``, ``after``) and the
    number of interactions after the drift.
    """
    import datetime as dt

    import polars as pl

    from dynstore.samples import shop

    data_dir.mkdir(parents=True, exist_ok=True)
    frames = shop.generate(size, seed=seed)
    inter = frames["interactions"]
    drift = shop.START + dt.timedelta(days=shop.DAYS * shop.DRIFT_FRACTION)
    before, after = inter.filter(pl.col("ts") < drift), inter.filter(pl.col("ts") >= drift)
    paths = {
        "users": data_dir / "users.parquet", "items": data_dir / "items.csv",
        "before": data_dir / "interactions_before.parquet", "after": data_dir / "interactions_after.parquet",
    }
    frames["users"].write_parquet(paths["users"])
    frames["items"].write_csv(paths["items"])
    before.write_parquet(paths["before"])
    after.write_parquet(paths["after"])
    return paths, after.height


def _load_and_encode(store: Store, paths: dict[str, Path], echo: Callable[[str], None], progress: bool) -> Any:
    """Ingest the data before the drift, encode; show the events and a first list. Returns the user shown."""
    for kind, path in (("users", paths["users"]), ("items", paths["items"]), ("interactions", paths["before"])):
        out = store.ingest(kind, path)
        echo(f"$ dynstore ingest {store.path.name} {kind} {path.name}   -> {out.rows} rows")
    echo("\n== SQL: events by type")
    echo(_table(store.sql("SELECT event, count(*) AS n, round(avg(label), 2) AS mean_label "
                          "FROM interactions GROUP BY event ORDER BY n DESC")))
    enc = store.encode(progress=progress)
    echo(f"\n$ dynstore encode   -> {enc.stale} stale items, {enc.encoded} documents encoded "
         f"({enc.items_per_s} docs/s on {enc.device}); version {enc.version} created")
    user = store.sql("SELECT user_id FROM interactions WHERE label = 1 GROUP BY 1 ORDER BY count(*) DESC LIMIT 1").fetchall()[0][0]
    echo(f"\n== recommendations for user {user} (untrained version):")
    echo(_recommendations(store, user))
    return user


def _retrain_across_the_drift(store: Store, paths: dict[str, Path], after_rows: int,
                              echo: Callable[[str], None]) -> None:
    """Refresh on the data before the drift, ingest the rest, evaluate, refresh again."""
    echo("\n$ dynstore refresh (training on the data before the drift) ...")
    echo(_metrics(store.refresh(since="all")))
    echo(f"\n== new interactions arrive ({after_rows} rows after the drift point)")
    store.ingest("interactions", paths["after"])
    ev = store.evaluate()
    echo(f"version {ev.version} on the newest slice, before retraining: "
         f"ndcg@10={ev.ndcg:.4f} recall@10={ev.recall:.4f}")
    r2 = store.refresh(since="30d")
    echo("$ dynstore refresh --since 30d")
    echo(_metrics(r2))


def _show_results(store: Store, user: Any, echo: Callable[[str], None]) -> None:
    """The list the current version serves, a semantic search, the versions."""
    current = store.sql("SELECT max(version) FROM versions WHERE status = 'current'").fetchall()[0][0]
    echo(f"\n== recommendations for user {user} now (version {current}):")
    echo(_recommendations(store, user))
    search = ("SELECT item_id, title, category FROM items ORDER BY "
              "array_cosine_similarity(semantic_vector(item_id), embed('outdoor hiking gear')) DESC LIMIT 3")
    echo(f"\n== semantic search: {search}")  # the heading is the query whose columns follow
    echo(_table(store.sql(search)))
    echo("\n== versions")
    echo(_table(store.sql("SELECT version, status, verdict, parent, train_window FROM versions ORDER BY version")))


def _recommendations(store: Store, user: Any) -> str:
    return _table(store.sql(f"SELECT r.rank, r.item_id, i.title, i.category, round(r.score, 4) AS score "
                            f"FROM recommendations({user}, 5) r JOIN items i USING (item_id) ORDER BY r.rank"))


def _metrics(r: RefreshResult) -> str:
    if r.noop:
        return f"no-op: {r.reason}"
    c, p = r.metrics["candidate"], r.metrics["current"]
    out = (f"version {r.version} ({r.status}): holdout ndcg@10 {p['ndcg@10']:.4f} -> {c['ndcg@10']:.4f}, "
           f"recall@10 {p['recall@10']:.4f} -> {c['recall@10']:.4f}, auc {p['auc']:.3f} -> {c['auc']:.3f}")
    if r.kept_start:
        out += ("\n  (training did not beat its start clearly on the holdout, so the new version keeps "
                "the start's weights; the behaviour features still follow every new interaction)")
    if r.published:
        rule = r.metrics["rule"]
        out += (f"\nversion {r.published['version']} (current): the popularity rule (holdout ndcg@10 "
                f"{rule['ndcg@10']:.4f}, better than version {r.parent})")
    return out


def _table(rel: Any) -> str:
    return table(rel.columns, rel.fetchall())
