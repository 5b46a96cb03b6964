"""Where an encoder runs: the CUDA probe and what the CPU can do.

CUDA availability is probed once per process (importing torch to ask
costs seconds); asking for CUDA where there is none warns once and falls
back to the CPU rather than failing a job that would work there.
"""
from __future__ import annotations

import os
import re
import threading
import warnings
from functools import lru_cache

from dynstore.errors import EncoderError
from dynstore.lazy import attempt_import

__all__ = ["probe_device", "cpu_runs_bf16", "cpu_threads"]

_CUDA_AVAILABLE: bool | None = None
_CUDA_WARNED = False
_PROBE_LOCK = threading.Lock()


def _cuda_available() -> bool:
    """Whether torch sees a CUDA device, asked once per process (call under ``_PROBE_LOCK``)."""
    global _CUDA_AVAILABLE
    if _CUDA_AVAILABLE is None:
        try:
            _CUDA_AVAILABLE = bool(attempt_import("torch").cuda.is_available())
        except Exception:  # a broken CUDA install must not stop CPU use
            _CUDA_AVAILABLE = False
    return _CUDA_AVAILABLE


def probe_device(requested: str | None = None) -> str:
    """Pick the device an encoder should run on.

    CUDA availability is probed once per process and cached.  Asking for
    CUDA on a machine without it is not an error: a ``RuntimeWarning`` is
    issued (once per process) and ``"cpu"`` is returned.

    Parameters
    ----------
    requested : str or None
        ``None`` or ``"auto"``: CUDA when available, else CPU.  ``"cpu"``
        forces the CPU (and never imports torch).  ``"cuda"`` / ``"cuda:N"``:
        that GPU when CUDA is available, else CPU with a warning.

    Returns
    -------
    str
        ``"cpu"``, ``"cuda"`` or the requested ``"cuda:N"``.

    Raises
    ------
    EncoderError
        For any other device name.

    Examples
    --------
    >>> from dynstore.encoders import probe_device
    >>> probe_device("cpu")
    'cpu'
    """
    global _CUDA_WARNED
    req = "auto" if requested is None else str(requested).strip().lower()
    if req == "cpu":
        return "cpu"
    if req != "auto" and not re.fullmatch(r"cuda(:\d+)?", req):
        raise EncoderError(f"unknown device {requested!r}: use None, 'auto', 'cpu', 'cuda' or 'cuda:N'")
    with _PROBE_LOCK:
        if _cuda_available():
            return "cuda" if req == "auto" else req
        if req != "auto" and not _CUDA_WARNED:
            _CUDA_WARNED = True
            warnings.warn(
                f"device {requested!r} requested but no CUDA device is available; using the CPU",
                RuntimeWarning,
                stacklevel=2,
            )
    return "cpu"


@lru_cache(maxsize=1)
def _cpu_flags_bf16() -> bool:
    """True when /proc/cpuinfo lists AVX512-BF16 or AMX-BF16."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def cpu_runs_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware and torch's oneDNN uses it.

    Without it oneDNN emulates bf16 and it is slower than fp32, so the
    answer decides the CPU precision of :class:`~dynstore.encoders.HFEncoder`.
    The cpuinfo flags are read first, so torch is asked only where the
    hardware could say yes.
    """
    if not _cpu_flags_bf16():
        return False
    # torch has no public probe for this; THIRD_PARTY_PRIVATE in tests/test_architecture.py
    mkldnn = attempt_import("torch").ops.mkldnn
    return bool(mkldnn._is_mkldnn_bf16_supported())


def cpu_threads() -> int:
    """CPUs this process may run on (honours container CPU pinning)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
