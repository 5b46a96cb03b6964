"""Run a ``dynstore`` command and ``kill -9`` it at a chosen write (for tests/test_reliability_kill.py).

Every call that writes to disk -- a Lance commit (``write_dataset``,
``merge_insert``, ``delete``, ``compact_files``, ``cleanup_old_versions``,
``create_index``), a config replace (``os.replace``), a safetensors file, a
JSON file, a fine-tuned encoder's files, the ``fsync`` of a small file and the
``os.link`` that publishes a new store's config -- is a *write event*. ``kill_at = k``
with ``phase`` ``before`` (the k-th write never starts), ``during`` (SIGKILL
from a timer thread ``delay`` seconds into it) or ``after`` (it finished, the
next has not begun) sends the process a real ``SIGKILL``. ``kill_at = 0``
runs to the end and reports how many write events there were.

Two ways to run it:

* ``python tests/crashpoint.py '{"args": [...], "kill_at": 3, "phase": "during", "delay": 0.01}'``
  runs one command in a fresh interpreter;
* ``python tests/crashpoint.py serve`` imports dynstore, torch and transformers
  once and forks one child per request line (the same JSON) on stdin, answering
  one JSON line per child: its exit (``{"signal": 9}`` or ``{"code": n}``) and
  its seconds. A line holding a JSON list runs its requests side by side and
  answers a list. The children are real processes killed with a real SIGKILL; the
  fork only saves the seconds of importing torch for each of them. It refuses
  to fork once the server has more than one thread (fork-safety).

``tune`` adjusts a command for the test (e.g. always promote a fine-tuned
encoder, so the encoder switch is exercised).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

WRITE_EVENTS: list[str] = []


def _arm(kill_at: int, phase: str, delay: float, count_file: str | None, args: list) -> None:
    """Wrap every disk-writing call so the ``kill_at``-th one triggers a SIGKILL."""
    import os as _os
    import pathlib
    import shutil

    import lance
    import safetensors.numpy

    ld = sys.modules["lance.dataset"]  # the module: `lance.dataset` is also a function

    state = {"n": 0}

    def record(name: str) -> None:
        state["n"] += 1
        WRITE_EVENTS.append(name)
        if count_file:
            with open(count_file, "a") as fh:
                fh.write(name + "\n")

    def wrap(owner, attr: str, name: str) -> None:
        orig = getattr(owner, attr)

        def patched(*args, **kwargs):
            record(name)
            hit = state["n"] == kill_at
            if hit and phase == "before":
                _os.kill(_os.getpid(), signal.SIGKILL)
            if hit and phase == "during":
                threading.Timer(delay, _os.kill, (_os.getpid(), signal.SIGKILL)).start()
            out = orig(*args, **kwargs)
            if hit:  # "after", or a "during" that finished before the timer fired
                _os.kill(_os.getpid(), signal.SIGKILL)
            return out

        setattr(owner, attr, patched)

    wrap(lance, "write_dataset", "lance.write_dataset")
    wrap(ld.MergeInsertBuilder, "execute", "lance.merge_insert")
    wrap(ld.LanceDataset, "delete", "lance.delete")
    wrap(ld.LanceDataset, "cleanup_old_versions", "lance.cleanup")
    wrap(ld.LanceDataset, "create_index", "lance.create_index")
    wrap(ld.DatasetOptimizer, "compact_files", "lance.compact")
    wrap(_os, "replace", "os.replace")
    wrap(_os, "link", "os.link")  # an exclusive create (init's config)
    wrap(_os, "fsync", "os.fsync")  # a small file written whole, before its replace or link
    wrap(safetensors.numpy, "save_file", "safetensors.save_file")
    wrap(pathlib.Path, "write_text", "Path.write_text")
    wrap(pathlib.Path, "rename", "Path.rename")
    wrap(shutil, "copy2", "shutil.copy2")
    if "--finetune-encoder" in args:  # importing transformers' models costs seconds: only when used
        from transformers import PreTrainedModel

        wrap(PreTrainedModel, "save_pretrained", "save_pretrained")


def _tune(tune: str | None) -> None:
    if tune == "promote":
        # judge every candidate good enough: a fine-tuned encoder is then always
        # promoted, and its switch always happens
        import dataclasses

        from dynstore.versions import refresh

        plain = refresh.refresh
        refresh.refresh = lambda catalog, opts=None: plain(
            catalog, dataclasses.replace(opts or refresh.RefreshOptions(), tolerance=1e9))


def run(request: dict) -> int:
    """Run one request in this process; returns the CLI's exit code (unless killed)."""
    os.environ.update(request.get("env", {}))
    if request.get("kill_after") is not None:  # a moment in time rather than at a write
        threading.Timer(float(request["kill_after"]), os.kill, (os.getpid(), signal.SIGKILL)).start()
    _tune(request.get("tune"))
    _arm(int(request.get("kill_at", 0)), request.get("phase", "after"), float(request.get("delay", 0.0)),
         request.get("count_file"), list(request["args"]))
    from dynstore.cli import main

    try:
        main.main(args=list(map(str, request["args"])), prog_name="dynstore", standalone_mode=False)
        return 0
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # standalone_mode=False lets click errors through
        code = getattr(exc, "exit_code", 1)
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return int(code)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def serve() -> None:
    """Fork one child per request line on stdin; answer one JSON line each."""
    os.environ.setdefault("LANCE_LOG", "error")
    # What every child would import again, minus what starts threads (Lance, Arrow's
    # dataset module, Polars): those the children import. OpenBLAS would start one
    # thread per core at import; one thread keeps the server single-threaded.
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModel, AutoTokenizer, BertModel, PreTrainedModel  # noqa: F401

    import dynstore.cli  # noqa: F401
    import dynstore.encoders  # noqa: F401
    import dynstore.model.fusion  # noqa: F401
    import dynstore.model.training  # noqa: F401
    # not dynstore.store: it imports pyarrow, whose import starts a thread

    out = sys.stdout
    for line in sys.stdin:
        batch = json.loads(line)
        requests = batch if isinstance(batch, list) else [batch]
        if _threads() > 1:
            out.write(json.dumps({"error": f"server has {_threads()} threads: cannot fork safely"}) + "\n")
            out.flush()
            continue
        import time

        t0 = time.perf_counter()
        pids = [_fork(request) for request in requests]  # a batch runs side by side
        replies = {}
        while len(replies) < len(pids):
            pid, status = os.wait()
            if pid in pids:
                reply = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                         else {"code": os.WEXITSTATUS(status)})
                reply["seconds"] = round(time.perf_counter() - t0, 3)
                replies[pid] = reply
        answer = [replies[p] for p in pids]
        out.write(json.dumps(answer if isinstance(batch, list) else answer[0]) + "\n")
        out.flush()


def _fork(request: dict) -> int:
    pid = os.fork()
    if pid:
        return pid
    fd = os.open(request.get("log", os.devnull), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        code = run(request)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        sys.exit(run(json.loads(sys.argv[1])))
