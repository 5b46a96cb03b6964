"""A store on object storage (``s3://bucket/prefix``) and its writer leases.

Datasets are read and written by Lance's own object-store support (with the
settings of :func:`dynstore.storage.backend.storage_settings` as ``storage_options``);
this module handles the rest through ``boto3``, imported on first use (an
optional dependency: ``pip install 'dynstore[s3]'``): small files (the config,
model parameters) are single objects, a put replaces one atomically.

Writer locks are **leases**: ``locks/<kind>.lease`` holds the owner's id and a
time to live (``lease_ttl`` seconds, default 60).

* Taking it is a conditional put (``If-None-Match: *``): of two writers, one
  wins and the other sees ``412`` and waits (``StoreBusy`` after ``wait``).
* A heartbeat thread rewrites it every ``ttl/3`` seconds with ``If-Match`` on
  the ETag it last wrote, so a writer keeps it as long as it runs.
* A writer killed with ``kill -9`` stops renewing; once the object is older
  than its ttl, the next writer takes it over with ``If-Match`` on the ETag it
  read (two takers: one wins). Age is judged by the object store's clock alone
  (the object's ``Last-Modified`` against the ``Date`` of the response), so the
  writers' clocks may disagree; a skew of the store's clock between requests
  (it is one service) is the only clock that matters.
* Release deletes the object if its ETag is still ours.

Change checks: a reader learns of new commits by listing a dataset's
``_versions/`` (one request per dataset) and of config changes by the config's
ETag. On object storage these answers are reused for ``refresh_interval``
seconds (default 1; 0 asks every statement): a reader may see another
process's commit up to that much later. Within one process nothing is stale:
taking or releasing any writer lock forgets every reused answer, and a writer
holding a lock always asks.

What it guarantees: while a writer renews its lease, no other dynstore writer
of that kind runs. A holder paused longer than the ttl (a frozen VM, a stopped
process) loses the lease and may overlap the next writer; its Lance commits
still cannot corrupt a dataset (each commit is atomic, conflicting ones are
refused). The version registry, a read-modify-write, is guarded twice: a
version number is *claimed* with a conditional put (``locks/versions/v<N>.claim``,
:meth:`ObjectStorage.claim`) before any row is written under it, so two writers
never share a number, and the registry commit first checks that the lease is
still the writer's own (:meth:`ObjectStorage.confirm_lock`), so a writer that
lost it commits nothing (``StoreBusy``). A number claimed by a writer that then
died stays unused (the next version skips it). Readers take no lock, as on a
local store.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from dynstore.errors import ConfigError, StoreBusy

__all__ = ["ObjectStorage", "Lease", "LEASE_TTL", "storage_settings"]

#: Seconds a lease lives without renewal (a killed writer's lease expires after this).
LEASE_TTL = 60.0

#: Seconds a reader reuses a dataset's or the config's change stamp (see the module docstring).
REFRESH_INTERVAL = 1.0

#: Settings that configure dynstore or boto3 only, not Lance.
OWN_SETTINGS = ("lease_ttl", "refresh_interval")


class _Stamps:
    """This process's change stamps, reused for ``refresh_interval`` seconds, and
    how many writer locks it holds (while any is held, nothing is reused)."""

    def __init__(self):
        self.seen: dict[str, tuple[float, Any]] = {}
        self.writing = 0

    def get(self, key: str, interval: float, fetch) -> Any:
        now = time.monotonic()
        hit = self.seen.get(key)
        if hit is not None and not self.writing and now - hit[0] < interval:
            return hit[1]
        value = fetch()
        self.seen[key] = (now, value)
        return value

    def forget(self) -> None:
        self.seen.clear()


STAMPS = _Stamps()


#: Environment variables read for an object store, by setting.
ENVIRONMENT = {
    "aws_endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
    "aws_region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "allow_http": ("AWS_ALLOW_HTTP",),
}


def storage_settings(explicit: dict | None = None, table: dict | None = None) -> dict[str, str]:
    """An object store's settings: ``explicit`` over the environment over ``table``.

    >>> storage_settings({"aws_region": "eu-west-1"}, {"lease_ttl": 30})["lease_ttl"]
    '30'
    """
    out = {str(k).lower(): str(v) for k, v in (table or {}).items()}
    for key, names in ENVIRONMENT.items():
        value = next((os.environ[n] for n in names if os.environ.get(n)), None)
        if value is not None:
            out[key] = value
    out.update({str(k).lower(): str(v) for k, v in (explicit or {}).items()})
    return out


def _client(settings: dict[str, str]):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("stores on object storage need boto3: pip install 'dynstore[s3]'") from None
    return boto3.client(
        "s3", endpoint_url=settings.get("aws_endpoint") or None, region_name=settings.get("aws_region") or None,
        aws_access_key_id=settings.get("aws_access_key_id"), aws_secret_access_key=settings.get("aws_secret_access_key"),
        aws_session_token=settings.get("aws_session_token"),
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30))


def _code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` ("" for anything else)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class ObjectStorage:
    """A store under ``s3://bucket/prefix``."""

    def __init__(self, location: str, options: dict | None = None):
        scheme, _, rest = location.partition("://")
        if scheme not in ("s3", "s3a"):
            raise ConfigError(f"{location}: only s3:// object stores are supported")
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/")
        self.root = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.explicit = dict(options or {})
        self.settings = storage_settings(self.explicit)
        self.lease_ttl = float(self.settings.get("lease_ttl", LEASE_TTL))
        self.refresh_interval = float(self.settings.get("refresh_interval", REFRESH_INTERVAL))
        self.client_lock = threading.Lock()
        self.s3: Any = None
        #: the leases this process holds, by kind (see :meth:`confirm_lock`)
        self.leases: dict[str, Lease] = {}

    # -- settings --------------------------------------------------------------
    @property
    def storage_options(self) -> dict[str, str]:
        return {k: v for k, v in self.settings.items() if k not in OWN_SETTINGS}

    def configure(self, table: dict) -> None:
        """Apply the config's ``[storage]`` table under the argument and the environment."""
        self.settings = storage_settings(self.explicit, table)
        self.lease_ttl = float(self.settings.get("lease_ttl", LEASE_TTL))
        self.refresh_interval = float(self.settings.get("refresh_interval", REFRESH_INTERVAL))

    @property
    def client(self):
        with self.client_lock:
            if self.s3 is None:
                self.s3 = _client(self.settings)
            return self.s3

    # -- names -----------------------------------------------------------------
    def key(self, name: str) -> str:
        name = name.strip("/")
        return f"{self.prefix}/{name}" if self.prefix and name else (name or self.prefix)

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def key_of(self, uri: str) -> str:
        """The object key of a full URI under this store."""
        return uri[len(f"s3://{self.bucket}/"):].strip("/")

    # -- small files -------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
        except Exception as exc:
            raise self._os_error(exc, name) from None

    def _os_error(self, exc: Exception, name: str) -> OSError:
        if _code(exc) in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"{self.uri(name)}: no such object")
        if _code(exc) == "NoSuchBucket":
            return FileNotFoundError(f"s3://{self.bucket}: no such bucket")
        if isinstance(exc, OSError):
            return exc
        return OSError(f"{self.uri(name)}: {type(exc).__name__}: {exc}")

    def exists(self, name: str) -> bool:
        """True for an object, or a prefix with objects under it ("" : the store's root)."""
        if not name:
            return not self.is_empty()
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name))
            return True
        except Exception as exc:
            if _status(exc) == 404:
                return bool(self._list(self.key(name) + "/", limit=1))
            raise self._os_error(exc, name) from None

    def _list(self, prefix: str, *, limit: int | None = None, delimiter: str | None = None) -> list[dict]:
        """Objects (and common prefixes as ``{"Prefix": ...}``) under a key prefix."""
        out: list[dict] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kw["Delimiter"] = delimiter
        if limit:
            kw["MaxKeys"] = limit
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
                out += page.get("Contents", []) + page.get("CommonPrefixes", [])
                if limit and len(out) >= limit:
                    break
        except Exception as exc:
            raise self._os_error(exc, prefix) from None
        return out

    def names(self, prefix: str) -> list[str]:
        """Entries directly under ``prefix`` (files, and "directories" such as ``v3.lance``)."""
        base = self.key(prefix).rstrip("/") + "/"
        found = {(o.get("Key") or o.get("Prefix"))[len(base):].strip("/") for o in self._list(base, delimiter="/")}
        return sorted(n for n in found if n)

    def remove(self, name: str) -> None:
        """Delete an object, or every object under a prefix."""
        key = self.key(name)
        keys = [o["Key"] for o in self._list(key.rstrip("/") + "/")]
        if self.exists(name) and not keys:
            keys = [key]
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[i:i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

    def size(self, name: str) -> int:
        return sum(int(o.get("Size", 0)) for o in self._list(self.key(name).rstrip("/") + "/"))

    def stamp(self, name: str) -> str:
        """The ETag of an object: changes when anyone rewrites it (reused for ``refresh_interval``)."""
        return STAMPS.get(self.uri(name), self.refresh_interval, lambda: self._etag(name))

    def _etag(self, name: str) -> str:
        try:
            return str(self.client.head_object(Bucket=self.bucket, Key=self.key(name))["ETag"])
        except Exception as exc:
            raise self._os_error(exc, name) from None

    def write_bytes(self, name: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data)
        except Exception as exc:
            raise self._os_error(exc, name) from None
        finally:
            STAMPS.forget()

    def create(self, name: str, data: bytes) -> None:
        """Put ``name`` unless it exists (:class:`FileExistsError`): a conditional put
        (``If-None-Match: *``), so of two writers exactly one succeeds."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data, IfNoneMatch="*")
        except Exception as exc:
            if _status(exc) in (409, 412):
                raise FileExistsError(f"{self.uri(name)}: already exists") from None
            raise self._os_error(exc, name) from None
        finally:
            STAMPS.forget()

    def dataset_stamp(self, uri: str) -> str | None:
        """Changes with every commit to the Lance dataset at ``uri``; None when absent
        (reused for ``refresh_interval``)."""
        return STAMPS.get(uri, self.refresh_interval, lambda: self._newest_manifest(uri))

    def _newest_manifest(self, uri: str) -> str | None:
        """One list request: Lance names manifests so that the newest sorts first."""
        first = self._list(self.key_of(uri) + "/_versions/", limit=1)
        if not first:
            return None
        key = first[0]["Key"]
        if len(key.rsplit("/", 1)[-1].split(".")[0]) < 20:  # old-style names sort oldest first
            every = self._list(self.key_of(uri) + "/_versions/")
            return f"{len(every)}:{every[-1]['Key']}"
        return key

    def is_empty(self) -> bool:
        return not self._list(self.key("") + "/" if self.prefix else "", limit=1)

    def prepare(self) -> None:
        """Nothing to create: prefixes exist with their first object. Checks the bucket."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._os_error(exc, "") from None

    def local_dir(self, name: str) -> None:
        """None: nothing of this store is a local directory."""
        return None

    @contextmanager
    def lock(self, kind: str, wait: float = 2.0) -> Iterator[None]:
        lease = Lease(self.client, self.bucket, self.key(f"locks/{kind}.lease"), ttl=self.lease_ttl)
        lease.acquire(wait, what=f"store {self.root} is busy: another {kind}")
        STAMPS.writing += 1
        self.leases[kind] = lease
        try:
            yield
        finally:
            self.leases.pop(kind, None)
            STAMPS.writing -= 1
            STAMPS.forget()
            lease.release()

    def confirm_lock(self, kind: str) -> None:
        """Raise :class:`StoreBusy` unless this process still holds the ``kind`` lease:
        a writer paused past the ttl whose lease another writer took over must not
        commit (one request; called right before a commit that replaces a whole file)."""
        lease = self.leases.get(kind)
        if lease is not None and not lease.still_ours():
            raise StoreBusy(f"store {self.root}: this {kind} writer was paused longer than its lease "
                            f"({lease.ttl:g} s) and another writer took over; nothing was committed, run it again")

    def claim(self, name: str) -> bool:
        """Create the marker ``name`` unless it exists: True for the one caller that
        created it. A version number is claimed so: a paused writer whose lease was
        taken over can never write rows under a number another writer uses."""
        try:
            self.create(name, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
            return True
        except FileExistsError:
            return False


class Lease:
    """A lease on one object (see the module docstring); ``heartbeat=False`` never
    renews (a writer that was killed, in tests)."""

    def __init__(self, client, bucket: str, key: str, *, ttl: float = LEASE_TTL, heartbeat: bool = True):
        self.client, self.bucket, self.key = client, bucket, key
        self.ttl, self.heartbeat = float(ttl), heartbeat
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.etag: str | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.lost = False

    def body(self) -> bytes:
        return json.dumps({"owner": self.owner, "ttl": self.ttl, "pid": os.getpid()}).encode()

    def acquire(self, wait: float, what: str = "another writer") -> None:
        """Take the lease, waiting up to ``wait`` seconds; :class:`StoreBusy` if someone keeps it."""
        deadline = time.monotonic() + wait
        while True:
            holder = self._try()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise StoreBusy(f"{what} ({holder.get('owner', '?')}) is writing; try again when it finishes "
                                f"(a writer that died releases it after {holder.get('ttl', LEASE_TTL):g} s)")
            time.sleep(0.1)
        if self.heartbeat:
            self.thread = threading.Thread(target=self._renew, name=f"dynstore-lease-{self.key}", daemon=True)
            self.thread.start()

    def _try(self) -> dict | None:
        """One attempt: None when taken, else what the holder wrote."""
        try:
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self.body(),
                                               IfNoneMatch="*")["ETag"]
            return None
        except Exception as exc:
            if _status(exc) not in (409, 412):
                raise
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _status(exc) == 404:
                return {"owner": "just released"}  # released in between: try again
            raise
        try:
            holder = json.loads(got["Body"].read())
        except ValueError:
            holder = {}
        now = got["ResponseMetadata"]["HTTPHeaders"].get("date")
        age = _age(got["LastModified"], now)
        if age is None or age <= float(holder.get("ttl", LEASE_TTL)):
            return holder
        try:  # expired: take it over, unless someone else did first
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self.body(),
                                               IfMatch=got["ETag"])["ETag"]
            return None
        except Exception as exc:
            if _status(exc) not in (404, 409, 412):
                raise
            return holder

    def still_ours(self) -> bool:
        """True while the lease object names this owner (one request)."""
        if self.lost or self.etag is None:
            return False
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return json.loads(got["Body"].read()).get("owner") == self.owner
        except Exception as exc:
            if _status(exc) == 404:
                return False
            raise

    def _renew(self) -> None:
        while not self.stop.wait(self.ttl / 3):
            try:
                self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self.body(),
                                                   IfMatch=self.etag)["ETag"]
            except Exception as exc:
                if _status(exc) in (404, 412):
                    self.lost = True  # taken over after a pause longer than the ttl
                    return
                # a network hiccup: try again at the next beat, while the lease lasts

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.lost or self.etag is None:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as exc:
            if _status(exc) in (400, 501):  # a store without conditional deletes
                head = self.client.head_object(Bucket=self.bucket, Key=self.key)
                if head["ETag"] == self.etag:
                    self.client.delete_object(Bucket=self.bucket, Key=self.key)
            # 404/412: someone took it over; nothing of ours to delete


def _age(last_modified, date_header: str | None) -> float | None:
    """Seconds between an object's ``Last-Modified`` and the server's ``Date`` (None if unknown)."""
    if not date_header:
        return None
    from email.utils import parsedate_to_datetime

    try:
        return (parsedate_to_datetime(date_header) - last_modified).total_seconds()
    except (TypeError, ValueError):
        return None
