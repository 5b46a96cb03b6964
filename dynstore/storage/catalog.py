"""The store as typed storage: paths, config, opened Lance datasets and a memo.

Every module below :class:`~dynstore.Store` receives a :class:`Catalog`: where
the store lives, the config it runs with, its datasets (latest, or pinned to
one snapshot), the per-process memo and the writer checks. ``Store`` is the
public façade over one.

Layout of a store directory::

    dynstore.toml            format version, id types, rules, encoder
    tables/<name>.lance      interactions, items, users (Lance, MVCC)
    cache/<encoder>.lance    semantic vectors keyed by doc_hash, one per encoder
    embeddings.lance         fused item embeddings, one row per version x item
    versions.lance           the version registry
    index/v<N>.lance         a version's vector index (large catalogues)
    models/v<N>.safetensors  per-version model parameters (+ v<N>.json)
    locks/<kind>.lock        writer locks (flock; released when a process dies)
    locks/<kind>.lease       the same on object storage (leases, see dynstore.storage.objectstore)

The store may be a local directory or a prefix on object storage
(``s3://bucket/shop``): :class:`~dynstore.storage.backend.Storage` hides which.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from dynstore.storage.config import CONFIG_NAME, StoreConfig
from dynstore.errors import (DynstoreError, ReadOnlyError, StorageError, StoreCorrupt, StoreFormatError, StoreNotFound,
                     first_line)
from dynstore.storage.lancescan import install_scan_patches
from dynstore.storage.backend import Storage, open_storage
from dynstore.storage.switch import effective

__all__ = ["Catalog", "Memo", "TABLES", "open_catalog", "unfinished_init", "is_init_leftover"]

TABLES = ("interactions", "items", "users")
#: Default scan options of the tables' Lance datasets: DuckDB pulls 64k-row
#: batches through the Arrow stream (Lance's default is 8k), ~1.3x faster scans.
TABLE_SCAN = {"batch_size": 64 * 1024}


@dataclass
class Memo:
    """What one process keeps between calls, in named slots that the modules filling
    them own (the registry's rows, the semantic index, loaded versions, serving
    states ...): the catalog knows no module above it.

    A slot usually holds ``(key, value)`` where the key names the dataset versions
    (and settings) the value was built from, so a pinned view and the latest view
    share the memo safely: a stale entry is simply rebuilt.

    Examples
    --------
    >>> memo = Memo()
    >>> _ = memo.put("docs", ("k", {})); memo.get("docs")
    ('k', {})
    >>> memo.invalidate("docs"); memo.get("docs") is None
    True
    >>> memo.setdefault("versions", dict)["v1"] = 1; memo.get("versions")
    {'v1': 1}
    """

    slots: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        """The slot's value (None when empty)."""
        return self.slots.get(name)

    def put(self, name: str, value: Any) -> Any:
        """Fill the slot; returns ``value``."""
        self.slots[name] = value
        return value

    def setdefault(self, name: str, factory: Callable[[], Any]) -> Any:
        """The slot's value, made by ``factory()`` when empty (a dict or list the owner fills)."""
        if name not in self.slots:
            self.slots[name] = factory()
        return self.slots[name]

    def invalidate(self, *names: str) -> None:
        """Forget the named slots (every slot when none is named)."""
        for name in names or tuple(self.slots):
            self.slots.pop(name, None)


class Catalog:
    """Where a store's data lives and how to open it.

    Parameters
    ----------
    storage : Storage
        Where the store lives (it holds ``dynstore.toml``): a local directory
        or a prefix on object storage.
    config : StoreConfig
        The config the store runs with (a pending encoder switch resolved).
    read_only : bool
        Refuse every write.

    Examples
    --------
    >>> import tempfile, dynstore
    >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
    >>> cat = store.catalog
    >>> cat.dataset("users") is None, cat.uri("users").endswith("tables/users.lance")
    (True, True)
    """

    def __init__(self, storage: Storage, config: StoreConfig, *, read_only: bool = False,
                 view_of: "Catalog | None" = None):
        self.storage = storage
        #: the store's root: a ``Path`` for a local store, the URI (``s3://...``) on object storage
        self.path: Any = storage.root
        self.config = config
        self.read_only = read_only
        #: shared with every pinned view: entries are keyed by dataset versions
        self.memo = view_of.memo if view_of is not None else Memo()
        #: statements on this view were checked (Store.sql, SqlSession): write functions may run
        self.writes_checked = False
        self._open: dict[str, tuple[int, Any]] = {}
        #: uri -> dataset (or None) of a pinned view; None: follow the latest commits
        self._pins: dict[str, Any] | None = None if view_of is None else {}
        self._base: Catalog = self if view_of is None else view_of

    # -- locations -----------------------------------------------------------------
    def uri(self, name: str) -> str:
        """Location of the dataset ``name`` (a table, ``embeddings`` or ``versions``)."""
        if name in TABLES:
            return self.storage.uri(f"tables/{name}.lance")
        return self.storage.uri(f"{name}.lance")

    def cache_uri(self, encoder_id: str) -> str:
        """Location of an encoder's semantic cache."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_id)
        return self.storage.uri(f"cache/{slug}.lance")

    def index_uri(self, version: int) -> str:
        """Location of a version's vector index."""
        return self.storage.uri(f"index/v{int(version)}.lance")

    def model_name(self, version: int, suffix: str = ".safetensors") -> str:
        """A version's model file (``.safetensors`` parameters or ``.json`` settings),
        relative to the store (read and write it through :attr:`storage`)."""
        return f"models/v{int(version)}{suffix}"

    def where(self, name: str) -> str:
        """The full location of ``name`` (relative to the store), for messages."""
        return self.storage.uri(name)

    def relative(self, uri: str) -> str:
        """``uri`` (under the store) relative to the store's root."""
        return uri[len(self.storage.uri("")):].strip("/")

    @property
    def storage_options(self) -> dict[str, str] | None:
        """Lance's ``storage_options`` for this store's datasets (None locally)."""
        return self.storage.storage_options

    def lock(self, kind: str, wait: float = 2.0):
        """The ``kind`` writer lock (a context manager; :class:`StoreBusy` after ``wait`` seconds)."""
        return self.storage.lock(kind, wait=wait)

    # -- datasets ------------------------------------------------------------------
    def dataset(self, name: str, version: int | None = None):
        """The latest (or pinned, or the given) version of a dataset, or None."""
        return self.open(self.uri(name), version)

    def cache_dataset(self, encoder_id: str):
        """An encoder's semantic cache, or None before its first encode."""
        return self.open(self.cache_uri(encoder_id))

    def open(self, uri: str, version: int | None = None):
        """The Lance dataset at ``uri`` (None when absent), reused until someone commits."""
        import lance

        install_scan_patches()  # DuckDB's WHERE on dictionary columns; row estimates for its joins
        if self._pins is not None and version is None:
            # A pinned view answers every later call with the version it saw
            # first, so one statement never mixes commits.
            if uri not in self._pins:
                self._pins[uri] = self._base.open(uri)
            return self._pins[uri]
        # changes with every commit: a cheap way to reuse the open dataset
        stamp = self.storage.dataset_stamp(uri)
        if stamp is None:
            return None
        options = TABLE_SCAN if os.path.basename(os.path.dirname(uri)) == "tables" else None
        so = self.storage.storage_options
        if version is not None:
            with self.reading(uri, version):
                return lance.dataset(uri, version=version, default_scan_options=options, storage_options=so)
        hit = self._open.get(uri)
        if hit is None or hit[0] != stamp:
            with self.reading(uri):
                hit = self._open[uri] = (stamp, lance.dataset(uri, default_scan_options=options, storage_options=so))
        return hit[1]

    @contextmanager
    def reading(self, uri: str, version: int | None = None) -> Iterator[None]:
        """Turn Lance's refusal to read a damaged dataset (a truncated manifest or data
        file) into :class:`StoreCorrupt` naming the file and the way out."""
        try:
            yield
        except DynstoreError:
            raise
        except Exception as exc:
            if not is_damage(exc):
                raise
            raise corrupt(self.storage, self.relative(uri), exc, version) from None

    def version_of(self, name: str) -> int:
        """Committed version of a dataset as this view sees it (0 when absent)."""
        ds = self.dataset(name)
        return ds.version if ds is not None else 0

    # -- snapshots -----------------------------------------------------------------
    @property
    def is_pinned(self) -> bool:
        """True for a view frozen at one snapshot (see :meth:`pinned`)."""
        return self._pins is not None

    def pinned(self, at: dict[str, int] | None = None) -> "Catalog":
        """A read view frozen at the latest commits of every dataset it opens.

        The first open of a dataset fixes its version for the view's life;
        writers always use the latest (they never build on a stale snapshot).
        The view shares the memo, whose entries are keyed by dataset versions.
        ``at`` (``{name: version}`` as :func:`dynstore.encoders.cache.snapshot` gives it, for
        the tables, ``embeddings`` and ``versions``) pins those datasets at those
        versions instead: how another process reads the snapshot a driver saw.
        """
        base = self._base
        config = base.config.copy()
        view = Catalog(base.storage, config, read_only=base.read_only, view_of=base)
        for name in TABLES + ("embeddings", "versions"):
            version = (at or {}).get(name)
            if version:
                view.pin(view.uri(name), base.open(view.uri(name), version))
            view.dataset(name)
        return view

    def pin(self, uri: str, dataset: Any) -> None:
        """Make a pinned view read ``dataset`` (an opened Lance dataset) for ``uri``."""
        if self._pins is None:
            raise DynstoreError("only a pinned view can pin a dataset")
        self._pins[uri] = dataset

    @property
    def latest(self) -> "Catalog":
        """The catalog that follows every commit (this one, unless pinned)."""
        return self._base

    # -- config --------------------------------------------------------------------
    def reload_config(self) -> None:
        """Read the config file again (another process may have changed it)."""
        self.config = effective(self.storage, self.load_config())
        if self._base is not self:
            self._base.config = self.config

    def load_config(self) -> StoreConfig:
        """The config file as written (a pending encoder switch not resolved)."""
        return load_config(self.storage)

    def save_config(self, config: StoreConfig) -> None:
        """Replace the config file (atomically); the caller holds the ``config`` lock."""
        self.storage.write_bytes(CONFIG_NAME, config.to_text().encode("utf-8"))

    def config_stamp(self) -> Any:
        """Changes when anyone writes the config file (mtime, or ETag on object storage)."""
        return self.storage.stamp(CONFIG_NAME)

    def id_types(self) -> dict[str, str]:
        """``{"user": "int"|"string", "item": ...}`` as the stored data fixes them.

        Read from the tables' schemas: the Lance commit that stored the first ids
        records their type with them, so a crash, or a config another process
        holds, can never leave a type apart from the data. A kind no table holds
        yet falls back to the config's ``[ids]`` (stores written before types were
        read from the tables). A pinned view answers for its snapshot.

        Examples
        --------
        >>> import tempfile, dynstore, polars as pl
        >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
        >>> _ = store.ingest("items", pl.DataFrame({"item_id": ["a"], "title": ["x"]}))
        >>> store.catalog.id_types()
        {'item': 'string'}
        """
        tables = [self.dataset(name) for name in ("users", "items", "interactions")]
        # a Lance schema costs ~2 ms a call and SQL types ask often: kept per opened
        # dataset objects (held in the slot, so their ids stay theirs) and version
        key = tuple((id(ds), ds.version) if ds is not None else None for ds in tables)
        hit = self.memo.get("id_types")
        if hit is None or hit[0] != key:
            hit = self.memo.put("id_types", (key, _stored_id_types(tables), tables))
        found = hit[1]
        return {**{k: v for k, v in self.config.id_types.items() if k not in found}, **found}

    def id_type(self, kind: str) -> str:
        """``"int"`` or ``"string"``: the stored type of ``user``/``item`` ids (int before any ingest)."""
        return self.id_types().get(kind) or "int"

    def sql_id_type(self, kind: str) -> str:
        """The SQL type of ``user``/``item`` ids: ``VARCHAR`` or ``BIGINT``."""
        return "VARCHAR" if self.id_type(kind) == "string" else "BIGINT"

    # -- writes --------------------------------------------------------------------
    def require_writable(self, what: str) -> None:
        """Raise :class:`ReadOnlyError` on a read-only store."""
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: opened read-only; cannot {what}")

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Turn a refused write (disk full, read-only files) into :class:`StorageError`:
        every writer commits atomically, so the last commit stands."""
        try:
            yield
        except DynstoreError:
            raise
        except Exception as exc:
            if not isinstance(exc, OSError) and type(exc).__name__ != "SafetensorError":
                raise
            raise StorageError(f"{self.path}: {what} could not write ({storage_reason(exc)}); the last commit "
                               "stands: free space or fix permissions, then run it again") from None


def _stored_id_types(tables: list) -> dict[str, str]:
    """The id kinds the schemas of ``[users, items, interactions]`` (None: absent) fix."""
    found: dict[str, str] = {}
    # a kind's own table first, then the interactions
    for ds, columns in zip(tables, (("user_id",), ("item_id",), ("user_id", "item_id"))):
        if ds is None:
            continue
        schema = ds.schema
        for col in columns:
            if col[:-3] not in found and col in schema.names:
                found[col[:-3]] = _id_kind(schema.field(col).type)
    return found


def _id_kind(arrow_type) -> str:
    """``"string"`` for a text id column's Arrow type, else ``"int"``.

    >>> import pyarrow as pa
    >>> _id_kind(pa.large_string()), _id_kind(pa.int64())
    ('string', 'int')
    """
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return "string" if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) else "int"


#: what Lance says when a file it reads is damaged (not when a disk or network refuses)
_DAMAGE = re.compile(r"sufficient data|too small|protobuf|decode|corrupt|unexpected end|unexpected eof|invalid|"
                     r"not found|no such file|out of range|checksum|magic|fill whole buffer", re.I)
_ENVIRONMENT = re.compile(r"permission denied|timed out|timeout|connection|credential|access denied|"
                          r"no space|too many open files", re.I)


def is_damage(exc: BaseException) -> bool:
    """True when ``exc`` (raised by Lance reading a dataset) says a file is damaged or missing.

    >>> is_damage(ValueError("LanceError(IO): file size is too small, /src/utils.rs:1:1"))
    True
    >>> is_damage(OSError("LanceError(IO): Permission denied (os error 13)"))
    False
    """
    text = str(exc)
    if "LanceError" not in text and "lance" not in type(exc).__module__.lower():
        return False
    return bool(_DAMAGE.search(text)) and not _ENVIRONMENT.search(text)


def manifest_versions(storage: Storage, dataset: str) -> dict[int, str]:
    """``{version: manifest file}`` of the Lance dataset ``dataset`` (relative to the store).

    Lance names a manifest ``<version>.manifest`` or, in its newer scheme,
    ``<2**64 - 1 - version>.manifest`` (20 digits, so the newest sorts first).
    """
    out: dict[int, str] = {}
    for name in storage.names(f"{dataset}/_versions"):
        stem, _, ext = name.partition(".")
        if ext != "manifest" or not stem.isdigit():
            continue
        n = int(stem)
        out[(2**64 - 1 - n) if n >= 2**63 else n] = f"{dataset}/_versions/{name}"
    return out


def corrupt(storage: Storage, dataset: str, exc: BaseException, version: int | None = None) -> StoreCorrupt:
    """The :class:`StoreCorrupt` for a dataset Lance could not read: it names the damaged
    manifest (the one read: the given or the latest version) and the way out."""
    manifests = manifest_versions(storage, dataset)
    read = version if version is not None else max(manifests, default=None)
    why = storage_reason(exc).split(", bytes:")[0]
    if read is None or read not in manifests:
        return StoreCorrupt(f"{storage.uri(dataset)}: damaged, cannot be read ({why}); restore it from a backup")
    older = [v for v in manifests if v < read]
    file = storage.uri(manifests[read])
    if version is not None or not older:
        way = "restore it from a backup" + (f", or use a version after {read}" if version is not None else "")
    else:
        way = (f"move that file out of _versions/ to reopen {dataset} at its previous commit (version "
               f"{max(older)}), then rerun the command that wrote version {read}; or restore it from a backup")
    return StoreCorrupt(f"{file}: damaged, version {read} of {dataset} cannot be read ({why}); {way}")


def find_damage(path: str | os.PathLike, exc: BaseException) -> StoreCorrupt | None:
    """After Lance failed reading the store at ``path`` with ``exc``: the damaged
    file of the store, as :class:`StoreCorrupt` naming it and the way out, or None
    when ``exc`` is no damage or no damaged file is found.

    A data file is damaged when its size differs from the one its manifest recorded
    (truncated, overwritten) or it is missing; checked on a local store only.
    """
    text = str(exc)
    if "LanceError" not in text and not (_DAMAGE.search(text) and not _ENVIRONMENT.search(text)):
        return None
    import lance

    try:
        storage = open_storage(path)
    except Exception:
        return None
    datasets = [f"tables/{t}.lance" for t in TABLES] + ["embeddings.lance", "versions.lance"]
    datasets += [f"cache/{n}" for n in storage.names("cache") if n.endswith(".lance")]
    for rel in datasets:
        if not storage.exists(f"{rel}/_versions"):
            continue
        try:
            ds = lance.dataset(storage.uri(rel), storage_options=storage.storage_options)
        except Exception as err:
            if is_damage(err):
                return corrupt(storage, rel, err)
            continue
        found = _damaged_data_file(storage, rel, ds)
        if found is not None:
            return found
    return None


def _damaged_data_file(storage: Storage, rel: str, ds: Any) -> StoreCorrupt | None:
    """The first data file of ``ds`` whose size is not the recorded one (local stores)."""
    for fragment in ds.get_fragments():
        for f in fragment.metadata.files:
            local = storage.local_dir(f"{rel}/data/{f.path}")
            expected = getattr(f, "file_size_bytes", None)
            if local is None:
                return None
            size = local.stat().st_size if local.exists() else None
            if size is not None and (not expected or size == expected):
                continue
            state = "missing" if size is None else f"{size} bytes, its manifest says {expected}"
            older = [v for v in manifest_versions(storage, rel) if v < ds.version]
            way = "restore it from a backup"
            if older:
                way = (f"restore it from a backup, or, if the latest commit wrote it, move "
                       f"{storage.uri(manifest_versions(storage, rel)[ds.version])} out of _versions/ "
                       f"to reopen {rel} at version {max(older)} and rerun the command that wrote it")
            return StoreCorrupt(f"{storage.uri(f'{rel}/data/{f.path}')}: damaged data file of {rel} "
                                f"({state}); {way}")
    return None


def storage_reason(exc: BaseException) -> str:
    """An OS or Lance error in a few words: first line, without Rust source locations.

    >>> storage_reason(OSError("LanceError(IO): File too large (os error 27), /src/writer.rs:254:9"))
    'File too large (os error 27)'
    """
    text = first_line(exc)
    text = text.split("LanceError(IO): ", 1)[-1]
    return text.split(", /", 1)[0].strip()


def load_config(storage: Storage) -> StoreConfig:
    """The config file of the store in ``storage``, its ``[storage]`` table applied to it."""
    try:
        text = storage.read_bytes(CONFIG_NAME).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreFormatError(f"{storage.uri(CONFIG_NAME)}: unreadable store config ({exc})") from None
    config = StoreConfig.parse(text, storage.uri(CONFIG_NAME))
    storage.configure(config.storage)
    return config


#: What ``init`` creates before it publishes the config (see :func:`unfinished_init`).
LAYOUT_DIRS = ("tables", "cache", "models", "locks")


def is_init_leftover(name: str) -> bool:
    """True for a temporary config file an interrupted write or ``init`` leaves.

    >>> is_init_leftover("dynstore.toml.tmp"), is_init_leftover("dynstore.toml.3fa9c2d1e0b4.tmp")
    (True, True)
    """
    return name.startswith(CONFIG_NAME + ".") and name.endswith(".tmp")


def unfinished_init(storage: Storage) -> bool:
    """True when ``storage`` holds only what an interrupted ``init`` leaves: no
    config, and nothing but the empty layout folders, locks and temporary config
    files. ``init`` may finish such a store; opening it says so.

    >>> import tempfile, pathlib
    >>> from dynstore.storage.backend import LocalStorage
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "tables").mkdir(); _ = (d / "dynstore.toml.tmp").write_text("")
    >>> unfinished_init(LocalStorage(d)), unfinished_init(LocalStorage(tempfile.mkdtemp()))
    (True, False)
    """
    if storage.exists(CONFIG_NAME):
        return False
    names = storage.names("")
    for name in names:
        if is_init_leftover(name) or name == "locks":
            continue
        if name in LAYOUT_DIRS and not storage.names(name):
            continue
        return False
    return bool(names)


def open_catalog(path: str | os.PathLike, *, read_only: bool = False,
                 storage_options: dict | None = None) -> Catalog:
    """The catalog of the store at ``path`` (a directory or ``s3://bucket/prefix``);
    :class:`StoreNotFound` if there is none."""
    storage = open_storage(path, storage_options)
    if not storage.exists(CONFIG_NAME):
        if unfinished_init(storage):
            raise StoreNotFound(f"{storage.root}: an unfinished store (its `dynstore init` was interrupted); "
                                "run `dynstore init` on it again")
        why = "does not exist" if not storage.exists("") else "is not a dynstore store (no dynstore.toml)"
        raise StoreNotFound(f"{storage.root}: {why}; create one with `dynstore init`")
    return Catalog(storage, effective(storage, load_config(storage)), read_only=read_only)
