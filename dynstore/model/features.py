"""Attribute features: turn an Arrow table of item or user attributes into a dense matrix.

The fused item embedding ``w_i = v_i + alpha * W a_i + r_i`` (see :mod:`dynstore.model.fusion`)
and the user segment term ``U a_u`` need a fixed-width numeric vector per row. A
:class:`FeatureSpec` is *fitted* once on a table (it decides a rule per column and keeps
the statistics it needs), is saved as JSON in a version's metadata, and *transforms* any
later table with the same meaning -- columns may be missing, categories may be new and
values may be NULL -- into the same layout.

Rules, decided per column at fit time:

=====================  ============================================================
column                 features
=====================  ============================================================
id column, ``exclude``  skipped
string, <= max_onehot   one-hot over the fitted vocabulary + one "unknown" slot
distinct values
string, more distinct   hashed (blake2b, stable across processes) into ``hash_width``
values                  buckets
list<...> column, or    multi-hot with the same vocabulary / hashing rule over the
strings with "|" in     list elements (strings are split on "|", trimmed)
most non-null rows
long free text          skipped: mean length > 40 characters, or more than half the
                        (>= 20) non-null values are unique and there are more than
                        ``max_onehot`` of them. Text belongs to the document encoder.
numeric                 standardised; ``log1p`` first when the column is non-negative
                        and right-skewed (sample skewness > 1, e.g. prices, counts);
                        clipped to +-5; plus one-hot quantile buckets (up to
                        ``buckets``, edges fitted on the table) so that a non-linear
                        effect -- a release-year band, a price range, an age band --
                        is learnable, not only one slope
boolean                 0/1
timestamp / date        days since the Unix epoch, standardised, clipped and bucketed
                        like a numeric column. Standardising makes this the item's *age*
                        relative to the fitted catalogue (an affine map of age in
                        days) while staying independent of the wall clock, so a
                        transform is reproducible.
anything else           skipped (binary, structs, fixed-size vectors ...)
=====================  ============================================================

NULL (and NaN) values give all-zero features; numeric, boolean and timestamp columns that
had NULLs at fit time also get a 0/1 "missing" indicator. A column absent from the table
given to :meth:`FeatureSpec.transform` gives zeros for all its features (indicator
included), as does a NULL category for one-hot columns; an unseen category lights the
"unknown" slot (one-hot) or its hash bucket (hashed).

Examples
--------
>>> import pyarrow as pa
>>> t = pa.table({"id": [1, 2, 3], "color": ["red", "blue", None], "price": [1.0, 2.0, 3.0]})
>>> spec = FeatureSpec.fit(t, "id")
>>> spec.feature_names()
['color=blue', 'color=red', 'color=<unknown>', 'price']
>>> spec.transform(pa.table({"color": ["green"]})).tolist()
[[0.0, 0.0, 1.0, 0.0]]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["FeatureSpec", "stable_hash"]

_FORMAT = "dynstore.model.features/1"
_CLIP = 5.0
_TEXT_MEAN_LEN = 40.0
_TEXT_UNIQUE_RATIO = 0.5
_TEXT_MIN_ROWS = 20
_SKEW_LOG = 1.0
_SEP = "|"
BUCKETS = 8
_BUCKET_ROWS = 10


def stable_hash(value: str, width: int) -> int:
    """Bucket of ``value`` among ``width`` buckets, identical in every process.

    Python's ``hash()`` is salted per process, so it cannot be used for features that
    are saved and reused.

    >>> stable_hash("red", 64) == stable_hash("red", 64)
    True
    """
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % width


def _as_table(table: Any) -> pa.Table:
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    if hasattr(table, "to_arrow"):  # polars
        return table.to_arrow()
    return pa.table(table)  # pandas, dict, __arrow_c_stream__ objects


def _plain(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """Decode dictionary arrays and widen large types so one code path handles them."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        arr = arr.cast(pa.string())
    elif pa.types.is_large_list(t) or pa.types.is_list_view(t):
        arr = arr.cast(pa.list_(t.value_type))
    return arr


def _kind_of(t: pa.DataType) -> str | None:
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "numeric"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "time"
    if pa.types.is_string(t):
        return "string"
    if pa.types.is_list(t):
        vt = t.value_type
        if pa.types.is_dictionary(vt):
            vt = vt.value_type
        if (
            pa.types.is_string(vt)
            or pa.types.is_large_string(vt)
            or pa.types.is_integer(vt)
            or pa.types.is_boolean(vt)
        ):
            return "list"
    return None


def _explode(arr: pa.ChunkedArray, split: bool) -> tuple[np.ndarray, list]:
    """(row index, string value) pairs of a multi-valued column, empty tokens dropped."""
    if split:
        parts = pc.split_pattern(arr, _SEP).combine_chunks()
    else:
        parts = arr.combine_chunks()
        if not pa.types.is_string(parts.type.value_type):
            parts = parts.cast(pa.list_(pa.string()))
    rows = pc.list_parent_indices(parts).to_numpy(zero_copy_only=False)
    values = parts.flatten()
    if split:
        values = pc.utf8_trim_whitespace(values)
    values = values.to_pylist()
    keep = [i for i, v in enumerate(values) if v]  # NULL or "" tokens carry nothing
    return rows[keep].astype(np.int64), [values[i] for i in keep]


def _sorted_vocab(values: Iterable[str]) -> list[str]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    # most frequent first, ties by value: deterministic and stable under row order
    return [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _to_float(arr: pa.ChunkedArray, kind: str) -> np.ndarray:
    """Float64 values with NaN for NULL (days since epoch for time columns)."""
    if kind == "time":
        t = arr.type
        if pa.types.is_date(t):
            arr = arr.cast(pa.date32()).cast(pa.int32())
            scale = 1.0
        else:
            arr = arr.cast(pa.timestamp("us", tz=t.tz)).cast(pa.int64())
            scale = 1.0 / 86_400e6
        out = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        mask = arr.is_null().to_numpy(zero_copy_only=False)
        out = out * scale
        out[mask] = np.nan
        return out
    if kind == "bool":
        arr = arr.cast(pa.int8())
    elif pa.types.is_decimal(arr.type):
        arr = arr.cast(pa.float64())
    mask = arr.is_null().to_numpy(zero_copy_only=False)
    out = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
    out[mask] = np.nan
    return out


@dataclass
class FeatureSpec:
    """Fitted per-column feature rules; see the module docstring for the rules.

    Build one with :meth:`fit`, apply it with :meth:`transform`, persist it with
    :meth:`to_dict` / :meth:`from_dict`.

    Attributes
    ----------
    id_column : str
        Column that was skipped as the row id.
    columns : list of dict
        One JSON-able rule per used column, in output order.
    max_onehot, hash_width : int
        The fit options.
    """

    id_column: str
    columns: list[dict] = field(default_factory=list)
    max_onehot: int = 32
    hash_width: int = 64
    buckets: int = BUCKETS

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(
        cls,
        table: Any,
        id_column: str,
        *,
        exclude: Iterable[str] = (),
        max_onehot: int = 32,
        hash_width: int = 64,
        buckets: int = BUCKETS,
    ) -> "FeatureSpec":
        """Decide a rule for every column of ``table``.

        Parameters
        ----------
        table : pyarrow.Table (or anything ``pyarrow.table`` accepts, or a Polars frame)
        id_column : str
            Skipped (ids are not features).
        exclude : iterable of str
            Other columns to skip (e.g. the document text, which the encoder reads).
        max_onehot : int
            Categorical columns with at most this many distinct values are one-hot.
        hash_width : int
            Buckets for hashed categorical columns.
        buckets : int
            Quantile buckets of numeric and time columns (0: none).

        Examples
        --------
        >>> import pyarrow as pa
        >>> t = pa.table({"id": [1, 2], "tags": ["a|b", "b|c"], "ok": [True, None]})
        >>> [c["kind"] for c in FeatureSpec.fit(t, "id").columns]
        ['multi_onehot', 'bool']
        """
        table = _as_table(table)
        skip = set(exclude) | {id_column}
        cols: list[dict] = []
        for name in table.column_names:
            if name in skip:
                continue
            arr = _plain(table.column(name))
            kind = _kind_of(arr.type)
            rule = None
            if kind in ("numeric", "bool", "time"):
                rule = cls._fit_numeric(name, arr, kind, buckets)
            elif kind in ("string", "list"):
                rule = cls._fit_categorical(name, arr, kind, max_onehot, hash_width)
            if rule is not None:
                cols.append(rule)
        return cls(id_column=id_column, columns=cols, max_onehot=max_onehot, hash_width=hash_width,
                   buckets=buckets)

    @staticmethod
    def _fit_numeric(name: str, arr: pa.ChunkedArray, kind: str, buckets: int = 0) -> dict | None:
        x = _to_float(arr, kind)
        ok = np.isfinite(x)
        if not ok.any():
            return None  # all NULL: nothing to learn
        has_missing = bool((~ok).any())
        if kind == "bool":
            return {"name": name, "kind": "bool", "missing": has_missing}
        v = x[ok]
        edges: list[float] = []
        buckets = min(buckets, v.size // _BUCKET_ROWS)  # a bucket needs rows to learn from
        if buckets > 1 and np.unique(v).size > 2:
            edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, buckets + 1)[1:-1])).tolist()
        log = False
        if kind == "numeric" and v.min() >= 0 and v.size > 2:
            sd = v.std()
            if sd > 0:
                skew = float(np.mean(((v - v.mean()) / sd) ** 3))
                log = skew > _SKEW_LOG
        if log:
            v = np.log1p(v)
        mean, std = float(v.mean()), float(v.std())
        return {
            "name": name,
            "kind": "time" if kind == "time" else "numeric",
            "log1p": log,
            "mean": mean,
            "std": std if std > 0 else 1.0,
            "missing": has_missing,
            "edges": edges,
        }

    @staticmethod
    def _fit_categorical(
        name: str, arr: pa.ChunkedArray, kind: str, max_onehot: int, hash_width: int
    ) -> dict | None:
        multi = kind == "list"
        split = False
        if kind == "string":
            nonnull = pc.drop_null(arr)
            n = len(nonnull)
            if n == 0:
                return None
            with_sep = pc.sum(pc.match_substring(nonnull, _SEP).cast(pa.int64())).as_py() or 0
            if with_sep > n / 2:
                multi = split = True
            else:
                mean_len = pc.mean(pc.utf8_length(nonnull)).as_py() or 0.0
                n_unique = len(pc.unique(nonnull))
                if mean_len > _TEXT_MEAN_LEN:
                    return None
                if (
                    n >= _TEXT_MIN_ROWS
                    and n_unique > _TEXT_UNIQUE_RATIO * n
                    and n_unique > max_onehot
                ):
                    return None
                values = [v for v in nonnull.to_pylist() if v != ""]
        if multi:
            _, values = _explode(arr, split)
            if not values:
                return None
            if float(np.mean([len(v) for v in values])) > _TEXT_MEAN_LEN:
                return None
        vocab = _sorted_vocab(values)
        if not vocab:
            return None
        prefix = "multi_" if multi else ""
        rule: dict = {"name": name, "split": split}
        if len(vocab) <= max_onehot:
            rule.update(kind=prefix + "onehot", vocab=vocab)
        else:
            rule.update(kind=prefix + "hash", width=hash_width)
        return rule

    # ------------------------------------------------------------ transform
    @staticmethod
    def _rule_width(rule: dict) -> int:
        k = rule["kind"]
        if k.endswith("onehot"):
            return len(rule["vocab"]) + 1
        if k.endswith("hash"):
            return int(rule["width"])
        edges = rule.get("edges") or []
        return 1 + int(rule.get("missing", False)) + (len(edges) + 1 if edges else 0)

    @property
    def width(self) -> int:
        """Number of output features."""
        return sum(self._rule_width(r) for r in self.columns)

    def feature_names(self) -> list[str]:
        """Human-readable name of each output feature, in output order.

        >>> import pyarrow as pa
        >>> FeatureSpec.fit(pa.table({"id": [1], "x": [2.0]}), "id").feature_names()
        ['x']
        """
        names: list[str] = []
        for r in self.columns:
            n, k = r["name"], r["kind"]
            if k.endswith("onehot"):
                names += [f"{n}={v}" for v in r["vocab"]] + [f"{n}=<unknown>"]
            elif k.endswith("hash"):
                names += [f"{n}#{b}" for b in range(r["width"])]
            else:
                names.append(n)
                if r.get("missing"):
                    names.append(f"{n}<missing>")
                edges = r.get("edges") or []
                if edges:
                    names += [f"{n}<{edges[0]:g}"] + [f"{n}[{a:g},{b:g})" for a, b in zip(edges, edges[1:])]
                    names.append(f"{n}>={edges[-1]:g}")
        return names

    def transform(self, table: Any) -> np.ndarray:
        """Feature matrix ``float32 [n_rows, width]`` for ``table``.

        Examples
        --------
        >>> import pyarrow as pa
        >>> spec = FeatureSpec.fit(pa.table({"id": [1, 2], "x": [0.0, 2.0]}), "id")
        >>> spec.transform(pa.table({"x": [1.0, None]})).tolist()
        [[0.0], [0.0]]
        """
        table = _as_table(table)
        n = table.num_rows
        out = np.zeros((n, self.width), dtype=np.float32)
        col = 0
        present = set(table.column_names)
        for rule in self.columns:
            w = self._rule_width(rule)
            if rule["name"] in present and n:
                arr = _plain(table.column(rule["name"]))
                self._transform_column(rule, arr, out[:, col : col + w])
            col += w
        return out

    def _transform_column(self, rule: dict, arr: pa.ChunkedArray, block: np.ndarray) -> None:
        kind = rule["kind"]
        if kind in ("numeric", "time", "bool"):
            src_kind = "bool" if kind == "bool" else _kind_of(arr.type)
            if src_kind not in ("numeric", "bool", "time"):
                return  # the column changed type: treat as absent rather than guess
            x = _to_float(arr, src_kind if kind != "bool" else "bool")
            ok = np.isfinite(x)
            if kind == "bool":
                val = np.where(ok, (x != 0).astype(np.float64), 0.0)
            else:
                v = np.where(ok, x, 0.0)
                if rule["log1p"]:
                    v = np.log1p(np.maximum(v, 0.0))
                val = np.clip((v - rule["mean"]) / rule["std"], -_CLIP, _CLIP)
                val = np.where(ok, val, 0.0)
            block[:, 0] = val
            col = 1
            if rule.get("missing"):
                block[:, 1] = (~ok).astype(np.float32)
                col = 2
            bucket = self._bucket(rule, x, ok)
            if bucket is not None:
                rows = np.flatnonzero(bucket >= 0)
                block[rows, col + bucket[rows]] = 1.0
            return
        # categorical
        if kind.startswith("multi_"):
            src_kind = _kind_of(arr.type)
            if src_kind == "list":
                rows, values = _explode(arr, split=False)
            elif src_kind == "string":
                rows, values = _explode(arr, split=True)
            else:
                return
        else:
            if not pa.types.is_string(arr.type):
                arr = arr.cast(pa.string())
            mask = arr.is_valid().to_numpy(zero_copy_only=False)
            vals = arr.to_pylist()
            rows = np.flatnonzero(mask)
            values = [vals[i] for i in rows]
        if not values:
            return
        # look up / hash each distinct value once
        uniq, inv = np.unique(np.asarray(values, dtype=object), return_inverse=True)
        if kind.endswith("onehot"):
            index = {v: i for i, v in enumerate(rule["vocab"])}
            unk = len(rule["vocab"])
            codes = np.array([index.get(v, unk) for v in uniq], dtype=np.int64)
        else:
            width = int(rule["width"])
            codes = np.array([stable_hash(str(v), width) for v in uniq], dtype=np.int64)
        # multi-hot is a set: repeated tokens light the slot once
        block[rows, codes[inv]] = 1.0

    @staticmethod
    def _bucket(rule: dict, x: np.ndarray, ok: np.ndarray) -> np.ndarray | None:
        """Quantile bucket of each value (-1 where missing); None without buckets."""
        edges = rule.get("edges") or []
        if not edges:
            return None
        return np.where(ok, np.searchsorted(np.asarray(edges), np.where(ok, x, 0.0), side="right"), -1)

    # ------------------------------------------------------------- segments
    def segment_columns(self) -> list[tuple[str, int]]:
        """``(name, n_keys)`` of each column that splits rows into segments: one-hot
        categories and bucketed numbers (an age band, a region ...).

        >>> import pyarrow as pa
        >>> t = pa.table({"id": range(30), "region": ["n", "s", "n"] * 10, "age": list(range(20, 50))})
        >>> FeatureSpec.fit(t, "id", buckets=2).segment_columns()
        [('region', 2), ('age', 2)]
        """
        out = []
        for r in self.columns:
            if r["kind"] == "onehot":
                out.append((r["name"], len(r["vocab"])))
            elif r["kind"] == "bool":
                out.append((r["name"], 2))
            elif r["kind"] in ("numeric", "time") and r.get("edges"):
                out.append((r["name"], len(r["edges"]) + 1))
        return out

    def segments(self, table: Any) -> np.ndarray:
        """Segment key of every row in each :meth:`segment_columns` column, ``int64
        [n_rows, n_columns]``; keys are numbered across columns (column c's keys follow
        column c-1's), -1 where the value is missing or unknown.

        >>> import pyarrow as pa
        >>> t = pa.table({"id": range(30), "region": ["n", "s", "n"] * 10, "age": list(range(20, 50))})
        >>> spec = FeatureSpec.fit(t, "id", buckets=2)
        >>> spec.segments(pa.table({"region": ["s", "x"], "age": [70, None]})).tolist()
        [[1, 3], [-1, -1]]
        """
        table = _as_table(table)
        cols = self.segment_columns()
        out = np.full((table.num_rows, len(cols)), -1, np.int64)
        rules = {r["name"]: r for r in self.columns}
        base = 0
        for c, (name, n_keys) in enumerate(cols):
            rule = rules[name]
            if name in table.column_names and table.num_rows:
                arr = _plain(table.column(name))
                if rule["kind"] == "onehot":
                    index = {v: i for i, v in enumerate(rule["vocab"])}
                    vals = arr.cast(pa.string()).to_pylist() if not pa.types.is_string(arr.type) else arr.to_pylist()
                    key = np.array([index.get(v, -1) for v in vals], np.int64)
                else:
                    src = _kind_of(arr.type)
                    if src in ("numeric", "bool", "time"):
                        x = _to_float(arr, src)
                        ok = np.isfinite(x)
                        key = (np.where(ok, (x != 0).astype(np.int64), -1) if rule["kind"] == "bool"
                               else self._bucket(rule, x, ok))
                    else:
                        key = np.full(table.num_rows, -1, np.int64)
                out[:, c] = np.where(key >= 0, key + base, -1)
            base += n_keys
        return out

    @property
    def n_segment_keys(self) -> int:
        return sum(n for _, n in self.segment_columns())

    # ---------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        """JSON-serialisable form (the store keeps it in version metadata).

        >>> import json, pyarrow as pa
        >>> s = FeatureSpec.fit(pa.table({"id": [1], "c": ["a"]}), "id")
        >>> FeatureSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
        True
        """
        return {
            "format": _FORMAT,
            "id_column": self.id_column,
            "max_onehot": self.max_onehot,
            "hash_width": self.hash_width,
            "buckets": self.buckets,
            "width": self.width,
            "columns": [dict(r) for r in self.columns],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        """Inverse of :meth:`to_dict`."""
        fmt = d.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"unsupported feature spec format {fmt!r}")
        spec = cls(
            id_column=d["id_column"],
            columns=[dict(r) for r in d["columns"]],
            max_onehot=int(d.get("max_onehot", 32)),
            hash_width=int(d.get("hash_width", 64)),
            buckets=int(d.get("buckets", 0)),
        )
        if "width" in d and int(d["width"]) != spec.width:
            raise ValueError("feature spec width does not match its columns")
        return spec

    def __repr__(self) -> str:
        kinds = ", ".join(f"{r['name']}:{r['kind']}" for r in self.columns)
        return f"FeatureSpec(width={self.width}, columns=[{kinds}])"

