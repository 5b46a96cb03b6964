"""Low-precision scoring as a prefilter: all users in float16 / bfloat16, one user in int8.

One user (:func:`quant_matrix`, :func:`quant_scan`): the single-user scan is
memory-bound, so ``recommend`` streams per-row int8 codes of the item matrix (a
quarter of float32's bytes) through fbgemm's int8 kernel, with a rigorous per-item
bound; the rows that can reach the top-k are rescored in float32 by the caller. On
the 50,000-item store of ``benchmarks/bench_recommend.py`` a median of 47 rows are
rescored for k = 10 (11 on the demo's MiniLM store, against 10 with float16's
tighter bound): the looser bound costs less than the bytes it saves.

``score-all --precision fp16|bf16`` runs the big matrix product ``X @ Wf.T`` in
half precision (twice the GEMM rate of float32 on GPUs and on CPUs with AMX /
AVX512-FP16, half the memory traffic), but the lists are the float32 lists: the
half-precision logits come with a rigorous error bound, every item whose upper
bound reaches the ``k``-th largest lower bound is a candidate, and the
candidates are rescored exactly in float32 (a float32 GEMM of the users
against the union of their candidates, the kernel the float32 path runs), so
the same items come back in the same order (ties by item row) with the same
scores. (The scores are bit for bit the float32 ones where the GEMM's summation
order does not depend on the matrices' shapes, as on the CPUs measured; a
backend whose kernels differ by shape may differ in the last bit of a score.)
Users whose candidates are too many (or whose bounds are not finite) are
scored by the float32 path instead; :data:`COUNTS` says how many went each way.

Design, decided by measuring (``benchmarks/bench_recommend.py --precision``, 5,000
users x 20,000 items, d = 384, k = 10, 2 shared CPU cores without a
half-precision GEMM, load average 3-5): plain half-precision lists (the product
and its top-k, nothing rescored) differ from float32 ones for 196 of 5,000
users in float16 and 1,524 in bfloat16 (overlap@10 0.9993 and 0.9939); the
prefilter's lists are identical for all 5,000. What the prefilter adds after the
product -- the bound, a top-``2k+16`` instead of a top-``k``, the rescoring -- took
0.05-0.18 s per batch of 1,024 users against 2.0-2.6 s for the half-precision
product (2-9 %); end to end the two were within the run-to-run noise (medians
12.5 s vs 10.6 s float16, 17.0 s vs 16.5 s bfloat16; float32 3.7 s, the float32
GEMM alone 1.8 s: this CPU has no native float16/bfloat16 GEMM, so either
option is slower than ``fp32`` here; it is for GPUs and CPUs with AMX).

The bound, for user ``u`` and item ``i``, with ``x_s = x_u / s`` (``s = max |x_u|``)
and ``w_s = r w_i`` (``r`` a power of two, exact): rounding both to the unit
roundoff ``e`` (``2^-11`` float16, ``2^-8`` bfloat16) moves the product by at most
``2e |x_s| |w_s|`` (Cauchy-Schwarz), a float32 accumulation (of either product)
by ``d 2^-24 |x_s| |w_s|``, rounding the result to ``e`` by ``e |x_s| |w_s|``, float16's
subnormals by ``2^-25`` an entry (``2^-25 (sum|x_s| + sum|w_s|)``); adding the
per-item terms in float32 by ``2^-24`` of the magnitudes. The tolerance takes
twice the sum, scaled back by ``s / r``, with the largest ``|w_s|`` of the catalogue:
one bound per user, so no ``[users, items]`` pass is spent on it.
It assumes the half-precision GEMM accumulates in float32 (CPU kernels do; on CUDA,
``torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction`` off).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dynstore.errors import DynstoreError
from dynstore.lazy import attempt_import

__all__ = ["PRECISIONS", "COUNTS", "check_precision", "LowMatrix", "low_matrix", "low_scores", "QuantMatrix", "round_up32",
           "quant_matrix", "quant_scan",
           "prefiltered_topk", "candidates", "rescore"]

PRECISIONS = ("fp32", "fp16", "bf16")
UNIT = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
RESCORE_USERS = 64  # fewest users per float32 rescoring product (the GEMM kernel's own shapes)
ITEM_BLOCK = 4096
#: users scored through the prefilter (``rescored``) and by float32 instead (``fallback``)
COUNTS = {"rescored": 0, "fallback": 0}


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a one-line :class:`DynstoreError`."""
    if precision not in PRECISIONS:
        raise DynstoreError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


@dataclass(frozen=True)
class LowMatrix:
    """``r Wf`` in half precision (a torch tensor) with what the bound needs of it."""

    precision: str
    W: Any
    r: float
    norms: np.ndarray  # |r w_i|
    abs_sums: np.ndarray  # sum_j |r w_ij|


def low_matrix(W: np.ndarray, precision: str) -> LowMatrix | None:
    """The item matrix for :func:`low_scores`, or None when it does not fit float16."""
    torch = attempt_import("torch")
    amax = float(np.abs(W).max()) if W.size else 0.0
    if not np.isfinite(W).all() or (precision == "fp16" and amax > 6e4):
        return None
    # a power of two (exact) lifts the entries clear of float16's subnormals
    r = float(2.0 ** np.floor(np.log2(16.0 / max(amax, 1e-30))))
    Ws = W * np.float32(r)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return LowMatrix(precision, torch.from_numpy(Ws).to(dtype), r, np.linalg.norm(Ws, axis=1).astype(np.float32),
                     np.abs(Ws).sum(1).astype(np.float32))


def low_scores(low: LowMatrix, X: np.ndarray, B: np.ndarray, r: np.ndarray, item: np.ndarray):
    """``(Y, t)``: the half-precision logits of ``X @ Wf.T + B`` as a float32 torch tensor
    ``[m, n]`` with the pairs ``(r, item)`` at ``-inf``, and each user's error bound ``t [m]``
    (the exact float32 logit of every item lies in ``[Y - t, Y + t]``; one bound per user,
    from the largest item norm, costs no ``[m, n]`` pass)."""
    torch = attempt_import("torch")
    s = np.abs(X).max(1) if X.size else np.zeros(len(X), np.float32)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0).astype(np.float32)
    Xs = X / s[:, None]
    Xl = torch.from_numpy(np.ascontiguousarray(Xs)).to(low.W.dtype)
    n, d = low.W.shape[0], X.shape[1]
    Y = torch.empty((len(X), n), dtype=torch.float32)
    for a in range(0, n, ITEM_BLOCK):
        Y[:, a:a + ITEM_BLOCK] = torch.matmul(Xl, low.W[a:a + ITEM_BLOCK].T)
    scale = s / np.float32(low.r)
    e = UNIT[low.precision]
    nx, ax = np.linalg.norm(Xs, axis=1), np.abs(Xs).sum(1)
    wn = float(low.norms.max()) if n else 0.0
    wa = float(low.abs_sums.max()) if n else 0.0
    # |Y| before B is at most about |x_s| |w_s|; B adds its own magnitude (rounding of the sums)
    t = scale * (2 * (3 * e + 2 * d * 2.0 ** -24) * nx * wn + 2.0 ** -24 * (ax + wa) + 2.0 ** -20 * nx * wn)
    Y *= torch.from_numpy(scale)[:, None]
    if B.size:
        Bt = torch.from_numpy(np.ascontiguousarray(B))
        Y += Bt
        babs = Bt.abs().nan_to_num(0.0, 0.0, 0.0)
        bmax = babs.amax(1).numpy() if B.ndim == 2 else np.full(len(X), float(babs.max()), np.float32)
        t = t + 2.0 ** -20 * bmax
    if len(item):
        Y[torch.from_numpy(r), torch.from_numpy(item)] = -torch.inf
    return Y, torch.from_numpy((t + 1e-30).astype(np.float32))


def prefiltered_topk(low: LowMatrix, W: np.ndarray, X: np.ndarray, B: np.ndarray, r: np.ndarray,
                     item: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(V, I, ok)``: for the users ``ok``, the exact float32 top-``k`` of ``X @ W.T + B``
    with the pairs ``(r, item)`` excluded (values, rows; best first, ties by row, ``-inf``
    padding), found from the half-precision prefilter; the other users' rows are
    unset (the caller scores them in float32)."""
    m, n = X.shape[0], W.shape[0]
    k = min(k, n)
    Y, t = low_scores(low, X, B, r, item)
    ok, cand, keep = candidates(Y, t, k)
    V = np.full((m, k), -np.inf, np.float32)
    I = np.zeros((m, k), np.int64)
    users = np.flatnonzero(ok)
    COUNTS["rescored"] += len(users)
    COUNTS["fallback"] += m - len(users)
    if not len(users):
        return V, I, ok
    cand, keep = cand[users], keep[users]
    step = max(RESCORE_USERS, n // max(8 * int(keep.sum(1).max()), 1))  # the union of candidates stays small
    for part in np.array_split(np.arange(len(users)), max(1, len(users) // step)):
        u = users[part]
        rows = np.unique(cand[part][keep[part]])
        V[u], I[u] = rescore(W, X[u], B[u] if B.ndim == 2 else B, u, r, item, rows, k)
    return V, I, ok


def candidates(Y, t, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ok, rows, keep)``: the users whose candidates were found, their top rows by ``Y``
    ``[m, K]`` and which of those are candidates (``keep``).

    With ``L`` the ``k``-th largest lower bound ``Y - t``, every item whose exact logit can
    reach the exact ``k``-th largest has ``Y + t >= L``: those are the candidates. One
    ``topk`` of ``2k + 16`` finds them all when its last value is below ``L - t``; users
    for whom it is not are tried once more with up to ``max(4k, n / 8)``, then left out."""
    torch = attempt_import("torch")
    m, n = Y.shape
    size = min(n, 2 * k + 16)
    hv, hi = torch.topk(Y, size, dim=1)
    thr = hv[:, k - 1] - 2 * t  # L - t
    done = (hv[:, -1] < thr) if size < n else torch.ones(m, dtype=torch.bool)
    ok = (torch.isfinite(thr) & torch.isfinite(hv[:, 0]) & done).numpy()
    hv, hi, thr = hv.numpy(), hi.numpy(), thr.numpy()
    more = np.flatnonzero(~done.numpy() & np.isfinite(thr))
    big = min(n, max(4 * k, n // 8))
    if len(more) and big > size:
        v2, i2 = torch.topk(Y[torch.from_numpy(more)], big, dim=1)
        v2, i2 = v2.numpy(), i2.numpy()
        fits = (v2[:, -1] < thr[more]) | (big == n)
        ok[more[fits]] = True
        pad = np.full((m, big), -np.inf, np.float32)
        pad[:, :size] = hv
        hv, hi = pad, np.pad(hi, ((0, 0), (0, big - size)))
        hv[more[fits]], hi[more[fits]] = v2[fits], i2[fits]
    return ok, hi, hv >= thr[:, None]


def rescore(W: np.ndarray, X: np.ndarray, B: np.ndarray, users: np.ndarray, r: np.ndarray,
            item: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact float32 top-``k`` of ``users`` (rows of the batch) over the item ``rows``:
    one float32 product, the exclusions masked, ties by row; ``-inf`` padded to ``k``."""
    torch = attempt_import("torch")
    S = torch.matmul(torch.from_numpy(X), torch.from_numpy(W[rows]).T)
    S += torch.from_numpy(np.ascontiguousarray(B[..., rows]))
    pick = np.isin(r, users)
    if pick.any():
        pr, pi = r[pick], item[pick]
        where = np.searchsorted(rows, pi)
        hit = (where < len(rows)) & (rows[np.minimum(where, len(rows) - 1)] == pi)
        S[torch.from_numpy(np.searchsorted(users, pr[hit])), torch.from_numpy(where[hit])] = -torch.inf
    kk = min(k, len(rows))
    v, i = torch.topk(S, kk, dim=1)
    v, i = v.numpy(), rows[i.numpy()]
    order = np.lexsort((i, -v), axis=1)
    V = np.full((len(users), k), -np.inf, np.float32)
    I = np.zeros((len(users), k), np.int64)
    V[:, :kk], I[:, :kk] = np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)
    return V, I


# -- one user: an int8 scan -----------------------------------------------------------------
#: the largest |weight| code: 7 bits, so that fbgemm's AVX2 kernel, which adds pairs of
#: uint8 x int8 products in int16 before widening, cannot saturate (2 * 255 * 63 < 2^15)
INT8_MAX_CODE = 63


@dataclass(frozen=True)
class QuantMatrix:
    """``Wf`` as per-row int8 codes packed for fbgemm, with what the one-user bound needs:
    ``w_i ~ s_i q_i`` with ``|q_i| <= 63``; ``resid[i]`` bounds ``|w_i - s_i q_i|`` and
    ``norm[i]`` bounds ``|s_i q_i|``."""

    packed: Any
    resid: np.ndarray
    norm: np.ndarray
    dim: int


def quant_matrix(W: np.ndarray) -> QuantMatrix | None:
    """The item matrix for :func:`quant_scan`, or None where fbgemm's int8 kernel is missing
    (ARM builds of torch) or ``W`` is not finite.

    >>> import numpy as np
    >>> W = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    >>> q = quant_matrix(W)
    >>> y, tol = quant_scan(q, W[0])
    >>> bool(np.all(np.abs(y - W @ W[0]) <= tol))
    True
    """
    if not W.size or not np.isfinite(W).all():
        return None
    torch = attempt_import("torch")
    op = getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32", None)
    amax = np.abs(W).max(1)
    # float32 scales (what fbgemm keeps), never zero
    s = np.where(amax > 0, amax / INT8_MAX_CODE, 1.0).astype(np.float32)
    try:
        import warnings

        with warnings.catch_warnings():  # quantized tensors are "deprecated" but are what fbgemm packs
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(torch.from_numpy(np.ascontiguousarray(W, np.float32)),
                                            torch.from_numpy(s.astype(np.float64)),
                                            torch.zeros(len(W), dtype=torch.long), 0, torch.qint8)
            q = qw.int_repr().numpy()
            packed = torch.ops.quantized.linear_prepack(qw, None)
            op(torch.zeros((1, W.shape[1])), 1.0, 0, packed)  # the kernel exists and runs here
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return None
    if np.abs(q).max() > INT8_MAX_CODE:  # pragma: no cover - quantize_per_channel rounds within
        return None
    grow = 1.0 + 2.0 ** -20  # the float64 norms' own rounding, rounded up
    resid, norm = np.empty(len(W)), np.empty(len(W))
    for a in range(0, len(W), 16_384):  # float64 copies of a block at a time
        Wq = q[a:a + 16_384].astype(np.float64) * s[a:a + 16_384, None].astype(np.float64)
        resid[a:a + 16_384] = np.sqrt(((W[a:a + 16_384].astype(np.float64) - Wq) ** 2).sum(1)) * grow
        norm[a:a + 16_384] = np.sqrt((Wq ** 2).sum(1)) * grow
    return QuantMatrix((op, packed), round_up32(resid), round_up32(norm), W.shape[1])


def round_up32(v) -> np.ndarray:
    """``v`` in float32, each value rounded up (never below ``v``): a bound stays a bound.

    >>> float(round_up32(np.array([0.1]))[0]) >= 0.1
    True
    """
    v = np.asarray(v, np.float64)
    f = v.astype(np.float32)
    low = f < v
    f[low] = np.nextafter(f[low], np.float32(np.inf))
    return f


def quant_scan(qm: QuantMatrix, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(y, tol)``: every item's ``w_i . x`` from the int8 codes, within ``tol[i]`` of the
    exact product (and of its float32 evaluation), both float32 ``[n]``.

    ``x`` is put on a grid ``x_g = h (q - z)`` (``q`` in 0..255, ``h`` a float32 step)
    that fbgemm's own quantization with ``(h, z)`` keeps exactly, and ``e = x - x_g`` is
    known. The int32 sums are exact, so ``y_i = h s_i (q_i . q)`` up to a few float32
    roundings, and ``w_i . x - y_i = (w_i - s_i q_i) . x + s_i q_i . e``, at most
    ``resid_i |x| + norm_i |e|`` (Cauchy-Schwarz). ``tol`` adds the float32 roundings of
    ``y`` (``2^-20 |y_i|``) and of the float32 score it stands for
    (``d 2^-23 (resid_i + norm_i) |x|``). It is evaluated in float32 (a few passes over
    ``n``: float64 ones took a tenth of a single-user call) from factors rounded up, and
    the at most six roundings of these sums of non-negative terms are covered by a last
    factor ``1 + 2^-18``.
    """
    torch = attempt_import("torch")
    x64 = np.asarray(x, np.float64)
    lo, hi = min(float(x64.min()), 0.0), max(float(x64.max()), 0.0)
    h = float(np.float32(max((hi - lo) / 255.0, 2.0 ** -100)))
    z = int(np.clip(np.round(-lo / h), 0, 255))
    q = np.clip(np.round(x64 / h) + z, 0, 255)
    # float32(h (q - z)) is within 2^-24 of a grid point, so fbgemm rounds it back to q
    xg = (q - z) * h  # float64: exact (an 8-bit integer times a float32)
    op, packed = qm.packed
    # torch's own thread count (switching it per call costs more than the scan gains)
    y = op(torch.from_numpy(xg.astype(np.float32)[None]), h, z, packed)[0].numpy()
    nx, ne = float(np.linalg.norm(x64)), float(np.linalg.norm(x64 - xg))
    a, b = round_up32([(1.0 + 2.0 ** -20) * ne + qm.dim * 2.0 ** -23 * nx,
                       (1.0 + 2.0 ** -20 + qm.dim * 2.0 ** -23) * nx])
    tol = np.multiply(qm.resid, b)
    tmp = np.multiply(qm.norm, a)
    tol += tmp
    np.abs(y, out=tmp)
    tmp *= np.float32(2.0 ** -20)
    tol += tmp
    tol += np.float32(2.0 ** -60)
    tol *= np.float32(1.0 + 2.0 ** -18)
    return y, tol
