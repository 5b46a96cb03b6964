"""The store: the public façade over a :class:`~dynstore.storage.catalog.Catalog`.

``init`` creates a store directory, ``connect`` opens one; every method of
:class:`Store` checks that it may write, takes the writer lock of its kind and
calls one module that does the work (see the README's code map). The modules
of the write path (ingest, encode, refresh, compaction, score-all) are imported
by the method that needs them, so a reader (``recommend``, ``sql``) never loads them.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import replace
from typing import Any, Iterable

os.environ.setdefault("LANCE_LOG", "error")  # Lance warns on every first write

import duckdb

from dynstore.storage.catalog import TABLES, Catalog, is_init_leftover, open_catalog, unfinished_init
from dynstore.storage.config import CONFIG_NAME, StoreConfig
from dynstore.encoders import check_precision, encoder_fingerprint, get_encoder
from dynstore.errors import ConfigError, DynstoreError, SqlError, StoreExists
from dynstore.data.feedback import log_impressions
from dynstore.sql.functions import check_write_calls
from dynstore.results import (CompactResult, DeleteResult, EncodeResult, Evaluation, IngestResult, Inspection,
                              Recommendation, RefreshResult, RollbackResult, ScoreAllResult, VersionRow)
from dynstore.storage.registry import list_versions
from dynstore.data.rules import validate_rules
from dynstore.encoders.cache import encoder_info, snapshot
from dynstore.sql.session import connection_state, follow, id_type_hint, open_connection
from dynstore.storage.backend import Storage, open_storage
from dynstore.data.views import check_item_text
from dynstore.versions import DEFAULT_SINCE

__all__ = ["connect", "init", "Store"]

#: What :meth:`Store.configure` may change.
SETTABLE = frozenset({"positive", "negative", "item_text", "behaviour_summary", "model", "max_length", "precision",
                      "index_min_items", "compact_fragments", "retain_seconds"})


def init(path: str | os.PathLike, *, positive: str | None = None, negative: str | None = None,
         item_text: str | None = None, model: str | None = None, max_length: int | None = None,
         precision: str | None = None, storage_options: dict | None = None) -> "Store":
    """Create a new, empty store at ``path`` and open it.

    Parameters
    ----------
    path : str or path-like
        A directory that does not exist yet or is empty, or an empty prefix on
        object storage (``s3://bucket/shop``; see the README, "Stores on object storage").
    positive, negative : str, optional
        SQL boolean expressions over interaction columns that label a row as
        positive (1) or negative (-1); defaults ``value > 0`` / ``value <= 0``.
    item_text : str, optional
        SQL expression over item columns rendering an item's document.
    model : str, optional
        Encoder: a registered name (default ``"minilm"``) or a local Hugging Face path.
    precision : str, optional
        Encoder precision (default ``"auto"``); ``"int8"`` is the faster,
        approximate CPU encoder (see :class:`dynstore.encoders.HFEncoder`).
    storage_options : dict, optional
        Object-store settings over the environment's (endpoint, region, keys);
        used, never written into the store.

    Examples
    --------
    >>> import tempfile, dynstore
    >>> store = dynstore.init(tempfile.mkdtemp() + "/shop", positive="event = 'click'")
    >>> store.sql("SELECT count(*) FROM interactions").fetchall()[0]
    (0,)
    """
    storage = open_storage(path, storage_options)
    _check_new(storage)
    cfg = StoreConfig(created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if positive is not None:
        cfg.positive = positive
    if negative is not None:
        cfg.negative = negative
    if item_text is not None:
        cfg.item_text = item_text
    if model is not None:
        cfg.model = str(model)
    if max_length is not None:
        cfg.max_length = int(max_length)
    if precision is not None:
        cfg.precision = check_precision(precision)
    validate_rules(cfg)
    if cfg.model not in ("minilm",) and not cfg.model.startswith("fake"):
        get_encoder(  # fail at init, not at the first encode
            cfg.model, max_length=cfg.max_length, precision=cfg.precision)
    storage.prepare()
    _record_identity(Catalog(storage, cfg))  # readers then know id and dimension without the model
    _publish(storage, cfg)
    return Store(open_catalog(path, storage_options=storage_options))


def _publish(storage: Storage, cfg: StoreConfig) -> None:
    """Create the config: the one write that makes the store, created exclusively.
    A crash before it leaves an unfinished store that ``init`` finishes; of two
    ``init`` runs at once exactly one creates the store, the other gets :class:`StoreExists`."""
    try:
        storage.create(CONFIG_NAME, cfg.to_text().encode("utf-8"))
    except (FileExistsError, FileNotFoundError):
        if not storage.exists(CONFIG_NAME):
            raise
        raise StoreExists(f"{storage.root}: another `dynstore init` created a store here at the same time; "
                          "use it, or choose a new directory") from None
    for name in storage.names(""):
        if is_init_leftover(name):  # a killed init's, now that the store is whole
            storage.remove(name)


def _check_new(storage: Storage) -> None:
    """Refuse a location that holds a store or anything else than an unfinished ``init``."""
    if storage.is_empty() or unfinished_init(storage):
        return
    if storage.exists(CONFIG_NAME):
        raise StoreExists(f"{storage.root}: already exists and is not empty (it is a dynstore store); "
                          "open it, or choose a new directory")
    raise StoreExists(f"{storage.root}: already exists and is not empty; choose a new directory")


def _record_identity(catalog: Catalog) -> None:
    """Set the encoder's id, dim and fingerprint in ``catalog.config`` (not written):
    a config is then written whole, never a new model beside the old encoder's id."""
    cfg = catalog.config
    cfg.encoder_id, cfg.encoder_dim = encoder_info(catalog)
    cfg.encoder_fingerprint = encoder_fingerprint(cfg.encoder_spec(catalog.storage.local_dir("")),
                                                  max_length=cfg.max_length, precision=cfg.precision)


def connect(path: str | os.PathLike, *, read_only: bool = False, storage_options: dict | None = None) -> "Store":
    """Open the store at ``path``.

    Parameters
    ----------
    path : str or path-like
        A directory created by :func:`init` (``dynstore init``), or a store on
        object storage (``s3://bucket/shop``).
    read_only : bool
        Refuse every write and run SQL with DuckDB's external access disabled,
        so queries cannot read or write files outside the store.
    storage_options : dict, optional
        Object-store settings over the environment's (endpoint, region, keys).

    Examples
    --------
    >>> import tempfile, dynstore
    >>> path = tempfile.mkdtemp() + "/s"
    >>> _ = dynstore.init(path)
    >>> with dynstore.connect(path) as store:
    ...     store.sql("SELECT count(*) FROM items").fetchall()[0]
    (0,)
    """
    return Store(open_catalog(path, read_only=read_only, storage_options=storage_options))


class Store:
    """An open store. Cheap to create; holds no lock while idle.

    Parameters
    ----------
    catalog : Catalog
        Where the store's data lives (:func:`connect` opens it from a path).
    """

    def __init__(self, catalog: Catalog | str | os.PathLike, *, read_only: bool = False):
        self.catalog = catalog if isinstance(catalog, Catalog) else open_catalog(catalog, read_only=read_only)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._con_state: tuple | None = None
        self._base: Store = self

    @property
    def path(self) -> Any:
        """The store directory (a ``Path``), or its URI on object storage (``s3://...``)."""
        return self.catalog.path

    @property
    def config(self) -> StoreConfig:
        """The config the store runs with."""
        return self.catalog.config

    @property
    def read_only(self) -> bool:
        """True when opened with ``read_only=True``: every write is refused."""
        return self.catalog.read_only

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        self.catalog.memo.invalidate()

    def __repr__(self) -> str:
        return f"<dynstore.Store {str(self.path)!r}{' read-only' if self.read_only else ''}>"

    def pinned(self) -> "Store":
        """A read view of this store frozen at its latest commits.

        Every dataset (tables, registry, embeddings, the semantic cache) is
        read at the version it had when the view was made, so the views and
        the functions of one connection -- one statement -- see one snapshot,
        whatever commits in the meantime. Writes through the view go to the
        store itself (they never build on a stale snapshot). The view shares
        the store's memo, which is keyed by dataset versions.

        Examples
        --------
        >>> import tempfile, dynstore, polars as pl
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
        >>> _ = store.ingest("users", pl.DataFrame({"user_id": [1]}))
        >>> view = store.pinned()
        >>> _ = store.ingest("users", pl.DataFrame({"user_id": [2]}))
        >>> view.catalog.dataset("users").count_rows(), store.catalog.dataset("users").count_rows()
        (1, 2)
        """
        view = _PinnedStore(self._base.catalog.pinned(), base=self._base)
        snapshot(view.catalog)  # pins the semantic cache of the store's encoder too
        return view

    def snapshot(self) -> dict[str, int]:
        """Latest committed version of every dataset (what a new query sees)."""
        return snapshot(self.catalog)

    # -- SQL -----------------------------------------------------------------------
    def connection(self) -> duckdb.DuckDBPyConnection:
        """A new in-process DuckDB connection with every view and function.

        The connection is pinned to the store's commits as of this call: its
        views *and* its functions (``recommend``, ``score`` ...) read that one
        snapshot, whatever other processes commit. Call :meth:`follow` between
        statements (or open a new connection, or use :meth:`sql`, which follows
        by itself) to see later writes. Write functions (``log_impressions``)
        are refused here, since DuckDB may optimise away a call whose result a
        query does not use; run them through :meth:`sql`, a
        :class:`~dynstore.sql.session.SqlSession` or ``dynstore sql``, which check
        where the call stands.

        Examples
        --------
        >>> import tempfile, dynstore
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
        >>> con = store.connection()
        >>> con.sql("SELECT count(*) FROM users").fetchall()[0]
        (0,)
        """
        return open_connection(self)

    def follow(self, con: duckdb.DuckDBPyConnection) -> None:
        """Move a connection from :meth:`connection` to the latest commits.

        Views, macros and functions are re-created on a newly pinned snapshot;
        tables the connection created stay. Call it between statements.

        Examples
        --------
        >>> import tempfile, dynstore, polars as pl
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
        >>> con = store.connection()
        >>> _ = store.ingest("users", pl.DataFrame({"user_id": [1, 2]}))
        >>> con.sql("SELECT count(*) FROM users").fetchall()[0][0]
        0
        >>> store.follow(con)
        >>> con.sql("SELECT count(*) FROM users").fetchall()[0][0]
        2
        """
        follow(self, con, checked=False)

    def sql(self, query: str, params: Iterable[Any] | None = None) -> duckdb.DuckDBPyRelation:
        """Run SQL on the latest committed state; returns a DuckDB relation.

        Examples
        --------
        >>> import tempfile, dynstore
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
        >>> store.sql("SELECT 1 + 1 AS two").pl()["two"][0]
        2
        """
        state = connection_state(self)
        if self._con is None or state != self._con_state:
            if state[0] != (self._con_state or (None,))[0]:
                self.catalog.latest.reload_config()
            # The old connection is not closed: relations a caller still holds
            # (they are lazy in DuckDB) keep working on their snapshot.
            self._con = open_connection(self, checked=True)
            self._con_state = state
        check_write_calls(query)
        try:
            return self._con.sql(query, params=None if params is None else list(params))
        except duckdb.Error as exc:  # an id of the wrong type: one line naming the store's id type
            hint = id_type_hint(self, str(exc), query)
            if hint is None:
                raise
            raise SqlError(hint) from None


    # -- writes --------------------------------------------------------------------
    def ingest(self, kind: str, source: Any, *, mapping: dict[str, str] | None = None,
               format: str | None = None, dedupe: bool | str | list[str] = False,
               allow_future: bool = False) -> IngestResult:
        """Load rows into ``interactions`` (append) or ``items``/``users`` (upsert).

        ``source`` is a file path (CSV, TSV, Parquet, JSON/NDJSON), a list of
        paths, a Polars or pandas DataFrame, or an Arrow table. The whole
        source is validated and committed at once, or rejected with an
        :class:`~dynstore.errors.IngestError` naming file, row and column.
        ``dedupe`` (interactions): ``True`` skips rows already stored (equal
        in every column), a column name or list compares only those (an
        ``event_id``); see :func:`dynstore.data.ingest.ingest`. Interactions more
        than a day after the ingest are refused unless ``allow_future``;
        ``label`` and names starting with ``__`` are reserved (rename them
        with ``mapping``). A glob pattern (``"day-*.csv"``) names every match.

        Examples
        --------
        >>> import tempfile, dynstore, polars as pl
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
        >>> store.ingest("items", pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"]})).rows
        2
        """
        sources = list(source) if isinstance(source, (list, tuple)) else [source]
        return self._ingest(kind, sources, mapping=mapping, fmt=format, dedupe=dedupe, allow_future=allow_future)

    def _ingest(self, kind: str, sources: list, **options: Any) -> IngestResult:
        from dynstore.data.ingest import ingest_locked  # the write path: imported when used

        return ingest_locked(self.catalog, kind, sources, **options)

    def delete(self, kind: str, where: str, *, dry_run: bool = False) -> DeleteResult:
        """Delete the rows of ``kind`` matching the SQL condition ``where``, in one commit.

        A deleted item is never recommended again (at once) and leaves the
        next version; see :mod:`dynstore.data.delete`.

        Examples
        --------
        >>> import tempfile, dynstore, polars as pl
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
        >>> _ = store.ingest("users", pl.DataFrame({"user_id": [1, 2], "region": ["north", "south"]}))
        >>> store.delete("users", "region = 'north'").deleted
        1
        """
        from dynstore.data.delete import delete_rows

        cat = self.catalog.latest
        cat.require_writable("delete")
        with cat.writing("delete"), cat.lock(f"ingest-{kind}" if kind in TABLES else "ingest"):
            return delete_rows(cat, kind, where, dry_run=dry_run)

    def configure(self, *, positive: str | None = None, negative: str | None = None, item_text: str | None = None,
                  behaviour_summary: bool | None = None, model: str | None = None, max_length: int | None = None,
                  precision: str | None = None, index_min_items: int | None = None,
                  compact_fragments: int | None = None, retain_seconds: int | None = None) -> StoreConfig:
        """Change labelling rules, the item document or the encoder (None leaves a setting as it is).

        Examples
        --------
        >>> import tempfile, dynstore
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
        >>> store.configure(positive="value >= 4").positive
        'value >= 4'
        """
        changes = {k: v for k, v in locals().items() if k in SETTABLE and v is not None}
        cat = self.catalog.latest
        cat.require_writable("change the config")
        if changes.get("precision") is not None:
            changes["precision"] = check_precision(changes["precision"])
        with cat.writing("config"), cat.lock("config"):
            cat.reload_config()
            new = StoreConfig(**cat.config.as_dict())
            for key, val in changes.items():
                if val is not None:
                    setattr(new, key, val)
            validate_rules(new)
            if ("model" in changes and changes["model"]) or changes.get("precision") == "int8":
                # an unusable encoder fails here, not at the next encode
                get_encoder(new.encoder_spec(cat.storage.local_dir("")), max_length=new.max_length,
                            precision=new.precision)
            old, cat.config = cat.config, new
            try:
                check_item_text(cat)
                if {"model", "max_length", "precision"} & set(changes):
                    _record_identity(cat)  # the new encoder's id in the same write as its name
            except Exception:
                cat.config = old
                raise
            cat.save_config(new)
        return cat.config

    # -- the recommender (implemented in their own modules) -------------------------
    def encode(self, *, all: bool = False, batch_size: int = 64, device: str | None = None,
               progress: bool = False, precision: str | None = None, engine: str = "local",
               workers: int | None = None) -> EncodeResult:
        """Encode stale items (or every item with ``all=True``); see :mod:`dynstore.data.semantic`.

        ``precision`` (e.g. ``"int8"``), when given, first becomes the store's
        encoder precision (as ``configure(precision=...)``): an int8 encoder
        has its own id and cache, so every item is stale for it once.
        ``engine="ray"`` encodes on a Ray actor pool of ``workers`` actors
        (default: one per GPU, else per CPU, of the cluster); see :mod:`dynstore.engines.ray`.
        """
        from dynstore.versions.bootstrap import ensure_first_version
        from dynstore.data.semantic import encode

        cat = self.catalog.latest
        cat.require_writable("encode")
        if precision is not None and check_precision(precision) != self.config.precision:
            self.configure(precision=precision)
        with cat.writing("encode"), cat.lock("encode"):
            out = encode(cat, all=all, batch_size=batch_size, device=device, progress=progress, engine=engine,
                         workers=workers)
        with cat.writing("encode"):
            version = ensure_first_version(cat)
        _keep_serving_snapshot(cat)
        return out if version is None else replace(out, version=version)

    def score_all(self, k: int = 100, *, engine: str = "local", workers: int | None = None,
                  precision: str = "fp32") -> ScoreAllResult:
        """Write every user's top-``k`` of the current version to the ``batch_recommendations``
        table (one overwrite commit); see :mod:`dynstore.serving.score_all`. ``engine="ray"`` scores
        batches of users on a Ray actor pool of ``workers`` actors. ``precision="fp16"`` /
        ``"bf16"`` runs the product in half precision as a prefilter rescored in float32
        (the same lists; faster only on hardware with a half-precision GEMM).

        Examples
        --------
        >>> import tempfile, dynstore, polars as pl
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
        >>> _ = store.ingest("items", pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"]}))
        >>> _ = store.ingest("users", pl.DataFrame({"user_id": [7]}))
        >>> _ = store.encode()
        >>> store.score_all(k=1).rows
        1
        """
        from dynstore.serving.score_all import score_all

        cat = self.catalog.latest
        cat.require_writable("score all users")
        with cat.writing("score-all"), cat.lock("score-all"):
            return score_all(cat, k=k, engine=engine, workers=workers, precision=precision)

    def recommend(self, user_id: Any, k: int = 10, *, version: int | None = None,
                  candidates: Iterable[Any] | None = None, exact: bool = False) -> list[Recommendation]:
        """Top-``k`` items for ``user_id``, best first: :class:`~dynstore.results.Recommendation`
        rows (``.item_id``, ``.score``; they also read as ``{"item_id", "score"}`` dicts).

        Large catalogues are served from the version's vector index unless ``exact``.
        """
        from dynstore.serving.recommend import recommend

        view = self.catalog if self.catalog.is_pinned else self.catalog.pinned()  # one snapshot per call
        return [Recommendation(r["item_id"], r["score"])
                for r in recommend(view, user_id, k, version=version, candidates=candidates, exact=exact)]

    def refresh(self, *, since: str | None = DEFAULT_SINCE, epochs: int | None = None, promote: bool = True,
                finetune_encoder: bool = False, finetune_steps: int | None = None, seed: int = 0,
                progress: bool = False, device: str | None = None, tolerance: float | None = None,
                use_negatives: bool = True, force: bool = False, refit: bool = True) -> RefreshResult:
        """Retrain from recent positives and negatives; the arguments are the fields of
        :class:`~dynstore.versions.refresh.RefreshOptions` (``tolerance=None``: its default; see
        :func:`dynstore.versions.refresh.refresh`)."""
        from dynstore.versions.refresh import REFRESH_FIELDS, RefreshOptions, refresh  # the write path: imported when used

        given = {k: v for k, v in locals().items() if k in REFRESH_FIELDS}
        options = RefreshOptions(**{k: v for k, v in given.items() if not (k == "tolerance" and v is None)})
        cat = self.catalog.latest
        cat.require_writable("refresh")
        with cat.writing("refresh"), cat.lock("refresh"):
            result = refresh(cat, options)
        _keep_serving_snapshot(cat)
        return result

    def log_impressions(self, user_id: Any, items: Iterable[Any]) -> int:
        """Record that ``items`` were shown to ``user_id`` (see :mod:`dynstore.data.feedback`)."""
        return log_impressions(self.catalog, user_id, items)

    def compact(self, *, retain_seconds: float | None = None) -> CompactResult:
        """Merge small fragments, drop dataset versions superseded more than
        ``retain_seconds`` ago (config default: an hour) and orphans of killed
        refreshes; see :mod:`dynstore.data.compaction`.

        Examples
        --------
        >>> import tempfile, dynstore
        >>> sorted(dynstore.init(tempfile.mkdtemp() + "/s", model="fake").compact().to_dict())
        ['bytes', 'datasets', 'encoders_removed', 'kept', 'orphans', 'reclaimed', 'retain_seconds', 'skipped']
        """
        from dynstore.data.compaction import compact

        cat = self.catalog.latest
        cat.require_writable("compact")
        with cat.writing("compact"):
            return compact(cat, retain_seconds=retain_seconds)

    def inspect(self) -> Inspection:
        """Counts, sizes, fragments, versions, encoder, stale items, last refresh and
        what a refresh would do now (:class:`~dynstore.results.Inspection`; ``to_dict()`` is
        JSON-able); see :mod:`dynstore.inspection`."""
        from dynstore.inspection import inspect_store

        return Inspection.from_dict(inspect_store(self.catalog))

    def versions(self) -> list[VersionRow]:
        """Every embedding version, newest first (:class:`~dynstore.results.VersionRow`)."""
        return [VersionRow.from_dict(r) for r in list_versions(self.catalog)]

    def rollback(self, version: int) -> RollbackResult:
        """Make an older version ``current`` again."""
        from dynstore.versions.embeddings import rollback

        cat = self.catalog.latest
        cat.require_writable("roll back")
        with cat.writing("rollback"), cat.lock("refresh"):
            result = rollback(cat, version)
        _keep_serving_snapshot(cat)
        return result

    def evaluate(self, *, version: int | None = None, k: int = 10, since: str | None = None) -> Evaluation:
        """Recall@k, NDCG@k and AUC of ``version`` (default: current) on the newest 10% of
        all interactions (of the ``since`` window, e.g. ``"30d"``: only it is read), with the
        ``"slice"`` judged (:class:`~dynstore.results.Evaluation`); see
        :func:`dynstore.versions.holdout.evaluate_version`."""
        from dynstore.versions.holdout import evaluate_version

        view = self.catalog if self.catalog.is_pinned else self.catalog.pinned()
        from dynstore.model.metrics import check_k

        return Evaluation.from_dict(evaluate_version(view, version=version, k=k, since=since), check_k(k))



def _keep_serving_snapshot(cat: Catalog) -> None:
    """After a write that may change what ``recommend`` serves: the current version's serving
    snapshot, so a new reader process starts without building it (a cache: a failure to
    write one changes nothing but the next reader's start-up)."""
    from dynstore.serving.state import keep_serving_snapshot

    try:
        keep_serving_snapshot(cat)
    except (OSError, DynstoreError, duckdb.Error):  # disk full; rules that do not bind: readers build (and say why)
        pass


class _PinnedStore(Store):
    """What :meth:`Store.pinned` returns: reads one snapshot, writes through the store
    (every write method works on ``catalog.latest``)."""

    def __init__(self, catalog: Catalog, *, base: Store):
        super().__init__(catalog)
        self._base = base

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None  # the memo is the store's: it stays
