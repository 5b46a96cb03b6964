"""``"fake"`` / ``"fake:DIM"``: a deterministic hashed bag-of-words encoder.

It needs neither torch nor weights, so tests and examples run anywhere in
milliseconds, and its vectors are the same on every machine.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from dynstore.errors import EncoderError
from dynstore.encoders.base import check_batch_size, check_texts, clean_text

__all__ = ["FakeEncoder"]

_WORD = re.compile(r"\w+")


@lru_cache(maxsize=200_000)
def _bucket(token: str, dim: int) -> tuple[int, float]:
    """(bucket, sign) of ``token``: BLAKE2b, because ``hash()`` is salted per process."""
    h = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


class FakeEncoder:
    """Deterministic hashed bag-of-words encoder; no torch, no weights.

    Each lower-cased word adds ±1 to a bucket chosen by its BLAKE2b hash, so
    vectors are identical across processes and machines, and texts sharing
    words get similar vectors.  Rows are L2-normalised; empty, whitespace-only
    or ``None`` texts (and texts without any word character) give all-zero
    rows.  Texts are not truncated: ``max_length`` is recorded only.

    Parameters
    ----------
    dim : int
        Vector length (default 32).
    max_length : int
        Reported as :attr:`max_length`; does not change the vectors.

    Examples
    --------
    >>> from dynstore.encoders import FakeEncoder
    >>> enc = FakeEncoder(16)
    >>> enc.id
    'fake:16:v1'
    >>> v = enc.encode(["blue shoes", "blue shoes", "kitchen knife"])
    >>> bool((v[0] == v[1]).all()), round(float(v[0] @ v[0]), 5)
    (True, 1.0)
    """

    def __init__(self, dim: int = 32, *, max_length: int = 256) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise EncoderError(f"fake encoder dimension must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.max_length = int(max_length)
        self.device = "cpu"
        self.id = f"fake:{self.dim}:v1"

    def __repr__(self) -> str:
        return f"FakeEncoder(dim={self.dim})"

    def _encode_into(self, row: np.ndarray, raw: object) -> None:
        """Write the unit vector of one text into ``row`` (left zero when it has no words)."""
        text = clean_text(raw)
        if not text:
            return
        for word in _WORD.findall(text.lower()):
            b, s = _bucket(word, self.dim)
            row[b] += s
        norm = float(np.sqrt(row @ row))
        if norm > 0.0:
            row /= norm

    def encode(
        self,
        texts: Sequence[str | bytes | None],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Encode ``texts``; see :meth:`dynstore.encoders.HFEncoder.encode` for the contract."""
        texts = check_texts(texts)
        batch_size = check_batch_size(batch_size)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            stop = min(start + batch_size, len(texts))
            for i in range(start, stop):
                self._encode_into(out[i], texts[i])
            if progress is not None:
                progress(stop - start)
        return out
