"""The Ray engine: batch work of ``encode`` and ``score-all`` on a Ray cluster.

Ray is optional (``pip install 'dynstore[ray]'``) and imported only here, and
only when ``--engine ray`` runs: importing dynstore never imports ray. The
driver (the process that runs the command) reads what needs doing from the
store, hands it to a Ray Data actor pool as Arrow blocks and commits what comes
back; each actor opens the store read-only and runs the same code as the local
engine. ``RAY_ADDRESS`` names an existing cluster (``ray://host:10001`` or
``auto``); without it a local cluster starts in the process.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterator

import pyarrow as pa

from dynstore.errors import DynstoreError
from dynstore.lazy import attempt_import

__all__ = ["ENGINES", "check_engine", "require_ray", "init_ray", "cluster_gpus", "pool_size", "map_actors",
           "blocks", "block_rows"]

ENGINES = ("local", "ray")


def check_engine(engine: str) -> str:
    """``engine`` if it is one of :data:`ENGINES`.

    >>> check_engine("ray")
    'ray'
    """
    if engine not in ENGINES:
        raise DynstoreError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


def require_ray():
    """The ``ray`` module, or a one-line :class:`DynstoreError` saying how to install it."""
    try:
        ray = attempt_import("ray")
        attempt_import("ray.data")
    except ImportError:
        raise DynstoreError("--engine ray needs Ray: pip install 'dynstore[ray]' "
                            "(or run with --engine local)") from None
    return ray


def init_ray():
    """Ray, connected: the cluster already initialised in this process, the one
    ``RAY_ADDRESS`` names, or a new local one (every core of this machine)."""
    ray = require_ray()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        kwargs: dict[str, Any] = {"address": address, "log_to_driver": False, "configure_logging": False}
        if address is None:
            kwargs["include_dashboard"] = False
        with warnings.catch_warnings():
            # Ray starts its processes by fork + exec, which Lance's fork warning does not concern
            warnings.filterwarnings("ignore", message="lance is not fork-safe")
            ray.init(**kwargs)
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # stderr stays the command's
    ctx = attempt_import("ray.data").DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def cluster_gpus() -> int:
    """GPUs in the connected cluster."""
    return int(require_ray().cluster_resources().get("GPU", 0))


def pool_size(workers: int | None, n_blocks: int) -> int:
    """Actors to start: ``workers``, else one per GPU (or CPU) of the cluster; never more than blocks."""
    if workers is None:
        res = init_ray().cluster_resources()
        workers = int(res.get("GPU", 0)) or max(1, int(res.get("CPU", 1)))
    return max(1, min(int(workers), max(n_blocks, 1)))


def block_rows(n: int, workers: int | None, low: int, high: int) -> int:
    """Rows per actor call: about four calls per actor (the pool stays balanced), within
    ``[low, high]`` (a call's fixed cost stays small; a block's memory bounded).

    >>> block_rows(2000, 2, 64, 2048), block_rows(20_000, 2, 64, 2048), block_rows(10, 2, 64, 2048)
    (250, 2048, 64)
    """
    pool = pool_size(workers, n) if workers is None else max(1, workers)
    return int(min(high, max(low, -(-n // (4 * pool)))))


def blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """``table`` cut into blocks of ``rows`` rows: each becomes one actor call.

    >>> [b.num_rows for b in blocks(pa.table({"x": list(range(5))}), 2)]
    [2, 2, 1]
    """
    return [table.slice(s, rows) for s in range(0, table.num_rows, max(1, rows))] or [table]


def map_actors(parts: list[pa.Table], actor: type, kwargs: dict, *, workers: int | None,
               num_gpus: float = 0) -> Iterator[pa.Table]:
    """Run ``actor(**kwargs)(block)`` over ``parts`` in a pool of actors; yield what they
    return as it arrives (in no particular order).

    Each actor is constructed once (loads the encoder, opens the store) and
    called for one block at a time: ``map_batches`` with a class and a fixed pool
    (``ActorPoolStrategy(size=n)``, what ``concurrency=n`` was before Ray 2.51), one CPU (or ``num_gpus`` GPUs) each.
    """
    init_ray()
    rd = attempt_import("ray.data")
    ds = rd.from_arrow(parts)
    n = pool_size(workers, len(parts))
    remote: dict[str, Any] = {"num_gpus": num_gpus} if num_gpus else {"num_cpus": 1}
    out = ds.map_batches(actor, fn_constructor_kwargs=kwargs, compute=rd.ActorPoolStrategy(size=n), batch_size=None,
                         batch_format="pyarrow", zero_copy_batch=True, **remote)
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        if batch.num_rows:
            yield batch
