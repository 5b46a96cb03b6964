"""The store: a directory of Lance datasets plus ``dynstore.toml``.

Layout of a store directory::

    dynstore.toml            format version, id types, rules, encoder
    tables/<name>.lance      interactions, items, users (Lance, MVCC)
    cache/semantic.lance     semantic vectors keyed by (doc_hash, encoder)
    embeddings.lance         fused item embeddings, one row per version x item
    versions.lance           the version registry
    models/v<N>.safetensors  per-version model parameters (+ v<N>.json)
    locks/<kind>.lock        writer locks (flock; released when a process dies)

DuckDB is only the SQL engine: every connection is in-memory and scans the
Lance datasets through Arrow, so a reader never holds a file lock that could
keep a cron ``refresh`` out.
"""
from __future__ import annotations

import datetime as _dt
import os
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("LANCE_LOG", "error")  # Lance warns on every first write

import duckdb

from . import functions
from .config import CONFIG_NAME, StoreConfig
from .errors import ConfigError, DynstoreError, ReadOnlyError, StorageError, StoreExists, StoreNotFound
from .lock import writer_lock

__all__ = ["connect", "init", "Store"]

TABLES = ("interactions", "items", "users")
#: Default scan options of the tables' Lance datasets (see Store._open_dataset).
_TABLE_SCAN = {"batch_size": 64 * 1024}


def _sql_text(name: str) -> str:
    return resources.files("dynstore.sql").joinpath(name).read_text(encoding="utf-8")


def _statements(text: str) -> list[str]:
    """Split one of dynstore's own .sql files into statements (';' ends a line)."""
    out, buf = [], []
    for line in text.splitlines():
        if line.lstrip().startswith("--") and not buf:
            continue
        buf.append(line)
        if line.rstrip().endswith(";"):
            out.append("\n".join(buf))
            buf = []
    if "".join(buf).strip():
        out.append("\n".join(buf))
    return out


def init(path: str | os.PathLike, *, positive: str | None = None, negative: str | None = None,
         item_text: str | None = None, model: str | None = None, max_length: int | None = None,
         precision: str | None = None) -> "Store":
    """Create a new, empty store at ``path`` and open it.

    Parameters
    ----------
    path : str or path-like
        A directory that does not exist yet or is empty.
    positive, negative : str, optional
        SQL boolean expressions over interaction columns that label a row as
        positive (1) or negative (-1); defaults ``value > 0`` / ``value <= 0``.
    item_text : str, optional
        SQL expression over item columns rendering an item's document.
    model : str, optional
        Encoder: a registered name (default ``"minilm"``) or a local Hugging Face path.
    precision : str, optional
        Encoder precision (default ``"auto"``); ``"int8"`` is the faster,
        approximate CPU encoder (see :class:`dynstore.encoder.HFEncoder`).

    Examples
    --------
    >>> import tempfile, dynstore
    >>> store = dynstore.init(tempfile.mkdtemp() + "/shop", positive="event = 'click'")
    >>> store.sql("SELECT count(*) FROM interactions").fetchall()[0]
    (0,)
    """
    root = Path(path)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise StoreExists(f"{root}: already exists and is not empty; choose a new directory")
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
        from .encoders import check_precision

        cfg.precision = check_precision(precision)
    validate_rules(cfg)
    if cfg.model not in ("minilm",) and not cfg.model.startswith("fake"):
        from .encoders import get_encoder  # fail at init, not at the first encode

        get_encoder(cfg.model, max_length=cfg.max_length, precision=cfg.precision)
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("tables", "cache", "models", "locks"):
        (root / sub).mkdir(exist_ok=True)
    # The config is written last: a store without it is not a store, so a
    # crash mid-init leaves a directory that `init` may simply be run on again
    # after removing it, never a half-store that opens.
    cfg.save(root / CONFIG_NAME)
    store = Store(root)
    from .semantic import record_encoder

    record_encoder(store)  # readers then know id and dimension without the model
    return store


def expression_error(con: duckdb.DuckDBPyConnection, expr: str, relation: str) -> str | None:
    """Why ``expr`` is not one SQL expression over ``relation``'s columns, or None.

    The expression is parsed on its own first, so a syntax error quotes only
    text the user wrote (not the query dynstore wraps it in), and text that
    would close the wrapper's parentheses (``a) OR (b``) is refused.
    """
    if not expr or not expr.strip():
        return "empty expression"
    try:
        parsed = con.extract_statements(f"SELECT {expr}")
    except duckdb.Error as exc:
        return _first_line(exc)
    if len(parsed) != 1:
        return "expected one expression, found several statements (remove the ';')"
    try:
        con.execute(f"SELECT ({expr}) FROM {relation} LIMIT 0")
    except duckdb.Error as exc:
        return _first_line(exc)
    return None


def _reason(exc: BaseException) -> str:
    """An OS or Lance error in a few words: first line, without Rust source locations.

    >>> _reason(OSError("LanceError(IO): File too large (os error 27), /src/writer.rs:254:9"))
    'File too large (os error 27)'
    """
    text = _first_line(exc)
    text = text.split("LanceError(IO): ", 1)[-1]
    return text.split(", /", 1)[0].strip()


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def validate_rules(cfg: StoreConfig) -> None:
    """Check the labelling rules against DuckDB."""
    con = duckdb.connect()
    con.execute("CREATE TABLE interactions (user_id BIGINT, item_id BIGINT, ts TIMESTAMP, "
                "event VARCHAR, value DOUBLE)")
    try:
        for name, expr in (("positive", cfg.positive), ("negative", cfg.negative)):
            why = expression_error(con, expr, "interactions")
            if why is None:
                try:
                    con.execute(f"SELECT CAST(({expr}) AS BOOLEAN) FROM interactions")
                except duckdb.Error as exc:
                    why = _first_line(exc)
            if why is not None:
                raise ConfigError(f"--{name} {expr!r} is not a valid rule over interaction columns "
                                  f"(user_id, item_id, ts, event, value): {why}")
    finally:
        con.close()


def connect(path: str | os.PathLike, *, read_only: bool = False) -> "Store":
    """Open the store at ``path``.

    Parameters
    ----------
    path : str or path-like
        A directory created by :func:`init` (``dynstore init``).
    read_only : bool
        Refuse every write and run SQL with DuckDB's external access disabled,
        so queries cannot read or write files outside the store.

    Examples
    --------
    >>> import tempfile, dynstore
    >>> path = tempfile.mkdtemp() + "/s"
    >>> _ = dynstore.init(path)
    >>> with dynstore.connect(path) as store:
    ...     store.sql("SELECT count(*) FROM items").fetchall()[0]
    (0,)
    """
    return Store(Path(path), read_only=read_only)


class Store:
    """An open store. Cheap to create; holds no lock while idle."""

    #: set on the pinned view behind connections whose statements dynstore checks
    #: (Store.sql, SqlSession): only there may write functions run
    _statements_checked = False

    def __init__(self, path: Path, *, read_only: bool = False):
        self.path = Path(path)
        cfg_path = self.path / CONFIG_NAME
        if not cfg_path.is_file():
            why = "does not exist" if not self.path.exists() else "is not a dynstore store (no dynstore.toml)"
            raise StoreNotFound(f"{self.path}: {why}; create one with `dynstore init`")
        from .switch import effective

        self.config = effective(self.path, StoreConfig.load(cfg_path))
        self.read_only = read_only
        self._con: duckdb.DuckDBPyConnection | None = None
        self._con_state: tuple | None = None
        self._cache: dict[str, Any] = {}
        self._open: dict[str, tuple[int, Any]] = {}
        #: uri -> dataset (or None) in a pinned view (see :meth:`pinned`); None: follow the latest
        self._pins: dict[str, Any] | None = None
        self._base: "Store" = self

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        self._cache.clear()

    def __repr__(self) -> str:
        return f"<dynstore.Store {str(self.path)!r}{' read-only' if self.read_only else ''}>"

    # -- datasets ------------------------------------------------------------------
    def _dataset_uri(self, name: str) -> str:
        if name in TABLES:
            return str(self.path / "tables" / f"{name}.lance")
        return str(self.path / f"{name}.lance")

    def _dataset(self, name: str, version: int | None = None):
        """The latest (or a pinned) version of a Lance dataset, or None."""
        return self._open_dataset(self._dataset_uri(name), version)

    def _open_dataset(self, uri: str, version: int | None = None):
        import lance

        from .lancescan import enable_dictionary_filters, enable_row_estimates

        enable_dictionary_filters()  # DuckDB's WHERE on dictionary columns (interactions.event)
        enable_row_estimates()  # DuckDB plans joins knowing each dataset's size

        if self._pins is not None and version is None:
            # A pinned view answers every later call with the version it saw
            # first, so one statement never mixes commits.
            if uri not in self._pins:
                self._pins[uri] = self._base._open_dataset(uri)
            return self._pins[uri]
        try:
            # A commit adds a manifest to _versions/, which changes the
            # directory's mtime: a cheap way to reuse the open dataset
            # until someone commits.
            stamp = os.stat(os.path.join(uri, "_versions")).st_mtime_ns
        except FileNotFoundError:
            return None
        # Tables are scanned in batches of 64k rows (Lance's default is 8k): the
        # batches DuckDB pulls through the Arrow stream, ~1.3x faster scans.
        options = _TABLE_SCAN if os.path.basename(os.path.dirname(uri)) == "tables" else None
        if version is not None:
            return lance.dataset(uri, version=version, default_scan_options=options)
        hit = self._open.get(uri)
        if hit is None or hit[0] != stamp:
            hit = self._open[uri] = (stamp, lance.dataset(uri, default_scan_options=options))
        return hit[1]

    @contextmanager
    def _writing(self, what: str):
        """Turn a refused write (disk full, read-only files) into :class:`StorageError`:
        every writer commits atomically, so the last commit stands."""
        try:
            yield
        except DynstoreError:
            raise
        except Exception as exc:
            if not isinstance(exc, OSError) and type(exc).__name__ != "SafetensorError":
                raise
            raise StorageError(f"{self.path}: {what} could not write ({_reason(exc)}); the last commit "
                               "stands: free space or fix permissions, then run it again") from None

    def _require_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: opened read-only; cannot {what}")

    def _reload_config(self) -> None:
        from .switch import effective

        self.config = effective(self.path, StoreConfig.load(self.path / CONFIG_NAME))

    def _save_config(self) -> None:
        self._require_writable("change the config")
        self.config.save(self.path / CONFIG_NAME)
        self._con_state = None

    def _record_id_types(self, id_types: dict[str, str]) -> None:
        with writer_lock(self.path, "config"):
            self._reload_config()
            if self.config.id_types != {**self.config.id_types, **id_types}:
                self.config.id_types.update(id_types)
                self.config.save(self.path / CONFIG_NAME)
        self._con_state = None

    def pinned(self) -> "Store":
        """A read view of this store frozen at its latest commits.

        Every dataset (tables, registry, embeddings, the semantic cache) is
        read at the version it had when the view was made, so the views and
        the functions of one connection -- one statement -- see one snapshot,
        whatever commits in the meantime. Writes through the view go to the
        store itself (they never build on a stale snapshot). The view shares
        the store's caches, which are keyed by dataset versions.

        Examples
        --------
        >>> import tempfile, dynstore, polars as pl
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
        >>> _ = store.ingest("users", pl.DataFrame({"user_id": [1]}))
        >>> view = store.pinned()
        >>> _ = store.ingest("users", pl.DataFrame({"user_id": [2]}))
        >>> view._dataset("users").count_rows(), store._dataset("users").count_rows()
        (1, 2)
        """
        from .semantic import cache_dataset

        base = self._base
        view = _PinnedStore.__new__(_PinnedStore)
        view.__dict__.update(base.__dict__)
        view._base = base
        view._con = None
        view._con_state = None
        view._pins = {}
        view.config = StoreConfig(**base.config.as_dict())
        view.config.id_types = dict(base.config.id_types)
        for name in TABLES + ("embeddings", "versions"):
            view._dataset(name)
        cache_dataset(view)
        return view

    def snapshot(self) -> dict[str, int]:
        """Latest committed version of every dataset (what a new query sees)."""
        from .semantic import cache_dataset

        out = {}
        for name in TABLES + ("embeddings", "versions"):
            ds = self._dataset(name)
            out[name] = ds.version if ds is not None else 0
        cache = cache_dataset(self)
        out["semantic"] = cache.version if cache is not None else 0
        return out

    # -- SQL -----------------------------------------------------------------------
    def connection(self, *, _checked: bool = False) -> duckdb.DuckDBPyConnection:
        """A new in-process DuckDB connection with every view and function.

        The connection is pinned to the store's commits as of this call: its
        views *and* its functions (``recommend``, ``score`` ...) read that one
        snapshot, whatever other processes commit. Call :meth:`follow` between
        statements (or open a new connection, or use :meth:`sql`, which follows
        by itself) to see later writes. Write functions (``log_impressions``)
        are refused here, since DuckDB may optimise away a call whose result a
        query does not use; run them through :meth:`sql`, a
        :class:`~dynstore.session.SqlSession` or ``dynstore sql``, which check
        where the call stands.

        Examples
        --------
        >>> import tempfile, dynstore
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
        >>> con = store.connection()
        >>> con.sql("SELECT count(*) FROM users").fetchall()[0]
        (0,)
        """
        view = self if self._pins is not None else self.pinned()
        view._statements_checked = _checked
        con = duckdb.connect(config={"threads": max(1, os.cpu_count() or 1)})
        con.execute("SET TimeZone = 'UTC'")
        view._attach(con)
        if self.read_only:
            # Set last: the views above needed no file access, and once
            # locked, SQL cannot turn external access back on.
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        return con

    def _views_connection(self) -> duckdb.DuckDBPyConnection:
        """A connection with the views only (no functions, no macros), pinned like
        :meth:`connection`: what dynstore's own reads of the data need, at a third
        of the cost."""
        view = self if self._pins is not None else self.pinned()
        con = duckdb.connect(config={"threads": max(1, os.cpu_count() or 1)})
        con.execute("SET TimeZone = 'UTC'")
        view._register_datasets(con)
        view._create_views(con, ("views.sql",))
        return con

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
        self._follow(con, checked=False)

    def _follow(self, con: duckdb.DuckDBPyConnection, *, checked: bool) -> None:
        base = self._base
        base._reload_config()
        view = base.pinned()
        view._statements_checked = checked
        view._attach(con, again=True)

    def _attach(self, con: duckdb.DuckDBPyConnection, *, again: bool = False) -> None:
        """Register datasets, functions, views and macros on ``con``.

        ``again`` re-attaches an existing connection to the latest commits
        (see :class:`~dynstore.session.SqlSession`): functions are replaced,
        views and macros are ``CREATE OR REPLACE``; the session's own tables stay.
        """
        self._register_datasets(con)
        functions.apply(self, con, replace=again)
        self._create_views(con, ("views.sql", "macros.sql"))

    def _create_views(self, con: duckdb.DuckDBPyConnection, files: tuple[str, ...]) -> None:
        for name in files:
            for stmt in _statements(self._render_sql(_sql_text(name))):
                try:
                    con.execute(stmt)
                except duckdb.Error as exc:
                    # A document expression or labelling rule that no longer binds
                    # (a column was never ingested, a hand-edited config) must not
                    # make the whole store unusable: only queries that need
                    # documents (labels) fail, with the reason.
                    if "VIEW item_documents" in stmt:
                        con.execute(self._broken_documents_view(exc))
                    elif "VIEW interactions AS" in stmt:
                        con.execute(self._broken_labels_view(exc))
                    else:
                        raise

    def _broken_documents_view(self, exc: Exception) -> str:
        from .ingest import lit

        first = str(exc).strip().splitlines()[0]
        msg = f"item document expression {self.config.item_text!r} does not bind: {first}"
        id_t = "VARCHAR" if self.config.id_types.get("item") == "string" else "BIGINT"
        return (f"CREATE OR REPLACE VIEW item_documents AS SELECT CAST(NULL AS {id_t}) AS item_id, "
                f"CAST(error({lit(msg)}) AS VARCHAR) AS document, CAST(NULL AS VARCHAR) AS doc_hash "
                "WHERE (SELECT count(*) FROM items) > 0")

    def _broken_labels_view(self, exc: Exception) -> str:
        from .ingest import lit

        first = _first_line(exc)
        msg = (f"labelling rules (positive {self.config.positive!r}, negative {self.config.negative!r}) do not "
               f"bind to the interactions: {first}; fix them with `dynstore config --positive/--negative`")
        return (f"CREATE OR REPLACE VIEW interactions AS SELECT *, CAST(error({lit(msg)}) AS TINYINT) AS label "
                "FROM _dynstore_interactions")

    def _render_sql(self, text: str) -> str:
        from .documents import item_document_sql

        cfg = self.config
        repl = {
            "{{positive}}": cfg.positive,
            "{{negative}}": cfg.negative,
            "{{item_document}}": item_document_sql(self),
        }
        for key, val in repl.items():
            text = text.replace(key, val)
        return text

    def _register_datasets(self, con: duckdb.DuckDBPyConnection) -> None:
        import pyarrow as pa

        id_type = {"int": pa.int64(), "string": pa.string()}
        user_t = id_type.get(self.config.id_types.get("user"), pa.int64())
        item_t = id_type.get(self.config.id_types.get("item"), pa.int64())
        empties = {
            "interactions": pa.schema([("user_id", user_t), ("item_id", item_t), ("ts", pa.timestamp("us")),
                                       ("event", pa.string()), ("value", pa.float64())]),
            "items": pa.schema([("item_id", item_t)]),
            "users": pa.schema([("user_id", user_t)]),
        }
        for name in TABLES:
            ds = self._dataset(name)
            con.register(f"_dynstore_{name}", ds if ds is not None else empties[name].empty_table())
        from .semantic import register_cache
        from .versions import register_versions

        register_cache(self, con)
        register_versions(self, con)

    def _connection_state(self) -> tuple:
        cfg_mtime = os.stat(self.path / CONFIG_NAME).st_mtime_ns
        return (cfg_mtime, tuple(sorted(self.snapshot().items())), functions.generation())

    def sql(self, query: str, params: Iterable[Any] | None = None) -> duckdb.DuckDBPyRelation:
        """Run SQL on the latest committed state; returns a DuckDB relation.

        Examples
        --------
        >>> import tempfile, dynstore
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
        >>> store.sql("SELECT 1 + 1 AS two").pl()["two"][0]
        2
        """
        state = self._connection_state()
        if self._con is None or state != self._con_state:
            if state[0] != (self._con_state or (None,))[0]:
                self._reload_config()
            # The old connection is not closed: relations a caller still holds
            # (they are lazy in DuckDB) keep working on their snapshot.
            self._con = self.connection(_checked=True)
            self._con_state = state
        from .functions import check_write_calls

        check_write_calls(query)
        return self._con.sql(query, params=None if params is None else list(params))

    # -- writes --------------------------------------------------------------------
    def ingest(self, kind: str, source: Any, *, mapping: dict[str, str] | None = None,
               format: str | None = None, dedupe: bool | str | list[str] = False,
               allow_future: bool = False) -> dict:
        """Load rows into ``interactions`` (append) or ``items``/``users`` (upsert).

        ``source`` is a file path (CSV, TSV, Parquet, JSON/NDJSON), a list of
        paths, a Polars or pandas DataFrame, or an Arrow table. The whole
        source is validated and committed at once, or rejected with an
        :class:`~dynstore.errors.IngestError` naming file, row and column.
        ``dedupe`` (interactions): ``True`` skips rows already stored (equal
        in every column), a column name or list compares only those (an
        ``event_id``); see :func:`dynstore.ingest.ingest`. Interactions more
        than a day after the ingest are refused unless ``allow_future``;
        ``label`` and names starting with ``__`` are reserved (rename them
        with ``mapping``). A glob pattern (``"day-*.csv"``) names every match.

        Examples
        --------
        >>> import tempfile, dynstore, polars as pl
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
        >>> store.ingest("items", pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"]}))["rows"]
        2
        """
        from .ingest import ingest

        self._require_writable("ingest")
        sources = list(source) if isinstance(source, (list, tuple)) else [source]
        with self._writing("ingest"), writer_lock(self.path, f"ingest-{kind}" if kind in TABLES else "ingest"):
            result = ingest(self, kind, sources, mapping=mapping, fmt=format, dedupe=dedupe,
                            allow_future=allow_future)
            if kind in TABLES:
                from .compaction import maybe_compact

                maybe_compact(self, kind)
        self._con_state = None
        return result

    def delete(self, kind: str, where: str, *, dry_run: bool = False) -> dict:
        """Delete the rows of ``kind`` matching the SQL condition ``where``, in one commit.

        A deleted item is never recommended again (at once) and leaves the
        next version; see :mod:`dynstore.delete`.

        Examples
        --------
        >>> import tempfile, dynstore, polars as pl
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
        >>> _ = store.ingest("users", pl.DataFrame({"user_id": [1, 2], "region": ["north", "south"]}))
        >>> store.delete("users", "region = 'north'")["deleted"]
        1
        """
        from .delete import delete_rows

        self._require_writable("delete")
        with self._writing("delete"), writer_lock(self.path, f"ingest-{kind}" if kind in TABLES else "ingest"):
            out = delete_rows(self, kind, where, dry_run=dry_run)
        self._con_state = None
        return out

    def configure(self, **changes: Any) -> StoreConfig:
        """Change labelling rules, the item document or the encoder.

        Examples
        --------
        >>> import tempfile, dynstore
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
        >>> store.configure(positive="value >= 4").positive
        'value >= 4'
        """
        self._require_writable("change the config")
        allowed = {"positive", "negative", "item_text", "behaviour_summary", "model", "max_length", "precision", "index_min_items",
                   "compact_fragments", "retain_seconds"}
        unknown = set(changes) - allowed
        if unknown:
            raise ConfigError(f"unknown setting {sorted(unknown)[0]!r}; settable: {', '.join(sorted(allowed))}")
        if changes.get("precision") is not None:
            from .encoders import check_precision

            changes["precision"] = check_precision(changes["precision"])
        with self._writing("config"), writer_lock(self.path, "config"):
            self._reload_config()
            new = StoreConfig(**self.config.as_dict())
            for key, val in changes.items():
                if val is not None:
                    setattr(new, key, val)
            validate_rules(new)
            if ("model" in changes and changes["model"]) or changes.get("precision") == "int8":
                from .encoders import get_encoder  # an unusable encoder fails here, not at the next encode

                get_encoder(new.encoder_spec(self.path), max_length=new.max_length, precision=new.precision)
            old, self.config = self.config, new
            try:
                from .documents import check_item_text

                check_item_text(self)
            except Exception:
                self.config = old
                raise
            self.config.save(self.path / CONFIG_NAME)
        self._con_state = None
        if "model" in changes or "max_length" in changes or "precision" in changes:
            from .semantic import record_encoder

            record_encoder(self)
        return self.config

    # -- the recommender (implemented in their own modules) -------------------------
    def encode(self, *, all: bool = False, batch_size: int = 64, device: str | None = None,
               progress: bool = False, precision: str | None = None) -> dict:
        """Encode stale items (or every item with ``all=True``); see :mod:`dynstore.semantic`.

        ``precision`` (e.g. ``"int8"``), when given, first becomes the store's
        encoder precision (as ``configure(precision=...)``): an int8 encoder
        has its own id and cache, so every item is stale for it once.
        """
        from .semantic import encode

        self._require_writable("encode")
        if precision is not None:
            from .encoders import check_precision

            if check_precision(precision) != self.config.precision:
                self.configure(precision=precision)
        with self._writing("encode"), writer_lock(self.path, "encode"):
            out = encode(self, all=all, batch_size=batch_size, device=device, progress=progress)
        self._con_state = None
        return out

    def recommend(self, user_id: Any, k: int = 10, *, version: int | None = None,
                  candidates: Iterable[Any] | None = None, exact: bool = False) -> list[dict]:
        """Top-``k`` items for ``user_id`` as ``[{"item_id", "score"}, ...]``, best first.

        Large catalogues are served from the version's vector index unless ``exact``.
        """
        from .recommend import recommend

        view = self if self._pins is not None else self.pinned()  # one snapshot per call
        return recommend(view, user_id, k, version=version, candidates=candidates, exact=exact)

    def refresh(self, **options: Any) -> dict:
        """Retrain from recent positives and negatives; see :func:`dynstore.refresh.refresh`."""
        from .refresh import refresh

        self._require_writable("refresh")
        with self._writing("refresh"), writer_lock(self.path, "refresh"):
            out = refresh(self, **options)
        self._con_state = None
        return out

    def log_impressions(self, user_id: Any, items: Iterable[Any]) -> int:
        """Record that ``items`` were shown to ``user_id`` (see :mod:`dynstore.feedback`)."""
        from .feedback import log_impressions

        self._require_writable("log impressions")
        return log_impressions(self, user_id, list(items))

    def compact(self, *, retain_seconds: float | None = None) -> dict:
        """Merge small fragments, drop dataset versions superseded more than
        ``retain_seconds`` ago (config default: an hour) and orphans of killed
        refreshes; see :mod:`dynstore.compaction`.

        Examples
        --------
        >>> import tempfile, dynstore
        >>> sorted(dynstore.init(tempfile.mkdtemp() + "/s", model="fake").compact())
        ['datasets', 'encoders_removed', 'orphans', 'retain_seconds', 'skipped']
        """
        from .compaction import compact

        self._require_writable("compact")
        with self._writing("compact"):
            return compact(self, retain_seconds=retain_seconds)

    def inspect(self) -> dict:
        """Counts, sizes, fragments, versions, encoder, stale items, last refresh and
        what a refresh would do now (JSON-able); see :mod:`dynstore.inspection`."""
        from .inspection import inspect_store

        return inspect_store(self)

    def versions(self) -> list[dict]:
        """Every embedding version, newest first."""
        from .versions import list_versions

        return list_versions(self)

    def rollback(self, version: int) -> dict:
        """Make an older version ``current`` again."""
        from .versions import rollback

        self._require_writable("roll back")
        with self._writing("rollback"), writer_lock(self.path, "refresh"):
            out = rollback(self, version)
        self._con_state = None
        return out


class _PinnedStore(Store):
    """What :meth:`Store.pinned` returns: reads one snapshot, writes through the store."""

    _statements_checked = False

    def pinned(self) -> "Store":
        return self._base.pinned()

    def ingest(self, *args: Any, **kwargs: Any) -> dict:
        return self._base.ingest(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> dict:
        return self._base.delete(*args, **kwargs)

    def configure(self, **changes: Any) -> StoreConfig:
        return self._base.configure(**changes)

    def encode(self, **options: Any) -> dict:
        return self._base.encode(**options)

    def refresh(self, **options: Any) -> dict:
        return self._base.refresh(**options)

    def rollback(self, version: int) -> dict:
        return self._base.rollback(version)

    def log_impressions(self, user_id: Any, items: Iterable[Any]) -> int:
        return self._base.log_impressions(user_id, items)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
