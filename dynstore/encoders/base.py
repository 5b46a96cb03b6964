"""What every encoder shares: the :class:`Encoder` protocol and its argument checks.

Texts are cleaned the same way by every encoder (:func:`clean_text`), and
bad arguments raise a one-line :class:`~dynstore.errors.EncoderError`
before any work is done.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from dynstore.errors import EncoderError

__all__ = [
    "Encoder",
    "PRECISIONS",
    "check_precision",
    "check_batch_size",
    "check_max_length",
    "check_texts",
    "clean_text",
    "id_suffix",
    "one_line",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
"""Accepted ``precision`` values.  ``auto``, ``fp32``, ``bf16`` and ``fp16``
give vectors within cosine 0.999 of each other and share an encoder id;
``int8`` (CPU only) gives its own id, so its vectors never share a cache
with the others."""


@runtime_checkable
class Encoder(Protocol):
    """What dynstore needs from a text encoder.

    Attributes
    ----------
    id : str
        Stable identity of encoder + weights + pooling + max_length.  Two
        encoders with the same ``id`` produce the same vectors (up to float
        rounding), on any machine and in any process.
    dim : int
        Length of each vector.
    max_length : int
        Tokens kept per text; longer texts are truncated.
    device : str
        Where the encoder runs (``"cpu"``, ``"cuda"``, ...).

    Examples
    --------
    >>> from dynstore.encoders import Encoder, get_encoder
    >>> isinstance(get_encoder("fake"), Encoder)
    True
    """

    id: str
    dim: int
    max_length: int
    device: str

    def encode(
        self,
        texts: Sequence[str | bytes | None],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Return a float32 ``[len(texts), dim]`` array of unit rows (zero rows for empty texts)."""
        ...


def check_precision(precision: Any) -> str:
    """Return ``precision`` normalised, or raise a one-line :class:`EncoderError`.

    >>> check_precision("INT8")
    'int8'
    >>> check_precision(None)
    'auto'
    """
    p = "auto" if precision is None else str(precision).strip().lower()
    if p not in PRECISIONS:
        raise EncoderError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return p


def id_suffix(precision: str) -> str:
    """What ``precision`` adds to an encoder id: only int8 changes the vectors enough to matter.

    >>> id_suffix("int8"), id_suffix("bf16")
    (':int8', '')
    """
    return ":int8" if precision == "int8" else ""


def check_batch_size(batch_size: Any) -> int:
    """Return ``batch_size`` as an int, or raise :class:`EncoderError` unless it is a positive integer.

    >>> check_batch_size(8)
    8
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise EncoderError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def check_max_length(max_length: Any) -> int:
    """Return ``max_length`` as an int, or raise :class:`EncoderError` unless it is an integer >= 2.

    Two tokens is the least a model with start and end markers can encode.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise EncoderError(f"max_length must be an integer >= 2, got {max_length!r}")
    return int(max_length)


def check_texts(texts: Any) -> Sequence[Any]:
    """Return ``texts`` as a sequence; a single str or bytes is refused.

    Raises
    ------
    EncoderError
        When ``texts`` is one text rather than a sequence of them.
    """
    if isinstance(texts, (str, bytes, bytearray)):
        # A bare string is a Sequence too; encoding it char by char is never meant.
        raise EncoderError("encode() takes a sequence of texts, not a single text: wrap it in a list")
    if not isinstance(texts, Sequence):
        texts = list(texts)
    return texts


def clean_text(text: Any) -> str:
    """Return ``text`` as a str the Rust tokenizer accepts ('' when empty).

    Bytes are decoded as UTF-8 with replacement characters; a str carrying
    lone surrogates (e.g. from ``os.fsdecode`` or lenient JSON) has them
    replaced too, because the tokenizer raises on them.

    >>> clean_text(b"caf\\xe9"), clean_text("  "), clean_text(None)
    ('caf\ufffd', '', '')
    """
    if text is None:
        return ""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # utf-16 with surrogatepass re-joins valid surrogate pairs into real
        # characters and turns only the lone halves into U+FFFD.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text if text.strip() else ""


def one_line(msg: str) -> str:
    """``msg`` with every run of whitespace (newlines included) made one blank.

    Error messages from third-party loaders span lines; ours never do.
    """
    return " ".join(str(msg).split())
