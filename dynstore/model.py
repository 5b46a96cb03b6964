"""The fusion + user model: fused item vectors and biases, history-based user vectors.

Every term, and why it is there
-------------------------------
Item side (computed once per version and stored with the item rows)::

    w_i = v_i + alpha * W a_i + r_i
    b_i = b0 + bv . v_i + ba . a_i + rb_i

* ``v_i`` -- the L2-normalised semantic vector of the item's document (MiniLM: d=384).
  It is fixed (never trained here), so a new item is recommendable as soon as it is
  encoded, and two items with similar documents score alike.
* ``alpha * W a_i`` -- attribute features (:mod:`dynstore.features`) projected into the
  semantic space; ``alpha`` is a learned scalar started at ``config.alpha_init`` so the
  attribute term begins as a small correction of the text.
* ``r_i`` -- learned collaborative residual, **only** for items with at least
  ``config.min_history`` training positives; zero otherwise, so cold items are scored
  from content alone and a residual never memorises two clicks.
* ``b_i`` -- item bias ("liked in general"). On temporal splits most test users are new
  and only this prior carries them; it is predicted from text (``bv``) and attributes
  (``ba``) so a *cold* item gets a sensible prior, plus a residual ``rb_i`` for warm items.
  ``config.residual_dropout`` hides the residuals of random warm targets during training
  so ``bv``/``ba`` learn to stand in for them (the cold-item case).

User side (computed at query time from the user's latest history -- no retraining)::

    x_u = u0 + U a_u + (I + M) (g_pos * agg_pos(w_j) + g_neg * agg_neg(w_j))

* ``u0`` -- global taste direction; with the biases it is the new-user recommendation.
* ``U a_u`` -- user-attribute (segment) term: popularity *within a segment* for new users.
* ``agg_pos`` -- recency-weighted mean of the fused vectors of the user's positives:
  weight ``exp(-rank / half_life)`` with rank 0 the most recent, over the most recent
  ``max_history`` positives (ties in time: later in the input is more recent).
* ``agg_neg`` -- the same over explicit negatives and shown-but-ignored impressions;
  ``g_neg`` is learned (negative when dislikes predict dislikes). The ablation
  ``use_negatives=False`` drops these events entirely (``g_neg = 0``).
* ``M`` -- a learned d x d correction (zero-initialised; ``config.user_transform``) that
  turns the fixed cosine geometry of the text space into a learned bilinear similarity
  between history and candidates; chosen on the temporal validation slice of the
  MovieLens benchmark (NDCG@10 0.336 vs 0.328 without).

Score: ``p_ui = sigmoid(w_i . x_u + b_i)``; serving ranks ``Wf @ x_u + bias``.

Training
--------
*Next-events objective.* A user's events are taken in time order in runs of
``history_stride``; every event of a run is scored from the user's history *strictly
before the run's first timestamp* -- what serving does for the events to come, so the
model learns to predict the future from the past and nothing of an event leaks into its
own input. A user's first run (empty history) trains the new-user path.

*Prior path.* Each positive is scored a second time as if its user were new
(``x = u0 + U a_u``), weighted ``prior_weight``. Without it the biases only learn what the
history term leaves unexplained, and new users -- the majority on a temporal split --
lose to plain popularity.

*Loss.* Weighted BCE on logits: positives (weight 1), explicit negatives (``neg_weight``),
impressions (``impression_weight``) and, per positive, ``n_sampled_negatives`` of
weight spread over a pool of ``sample_pool`` uniformly drawn items shared by the batch
(one matmul; uniform sampling is what lets the biases learn popularity).
``time_decay_days`` halves an event's weight every so many days before the newest event,
so the biases follow *recent* popularity.

*Cost.* The fixed part of every history (``v_j``, ``a_j``) is aggregated once per fit;
per step only the residual part is aggregated (``embedding_bag``, warm items only), so an
epoch costs O(total history length x d / history_stride). AdamW; on CPU training runs
single-threaded (the ops are small, threads only add overhead) and is deterministic for
a seed.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> V = rng.normal(size=(50, 8)).astype(np.float32); A = np.zeros((50, 0), np.float32)
>>> m = FusionModel.untrained(V, A, fu=0, popularity=np.arange(50.0))
>>> Wf, bias = m.item_side(V, A, m.residuals)
>>> X = m.user_vectors(None, np.array([0, 0]), np.zeros(0, np.int64), np.zeros(0, np.int8),
...                    np.zeros(0, np.int64), Wf)
>>> int(np.argmax(Wf @ X[0] + bias))      # a new user gets the most popular item
49
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import numpy as np

__all__ = ["ModelConfig", "TrainingData", "FusionModel", "build_histories", "evaluate"]

_FORMAT = "dynstore.fusion/1"
_SCALARS = ("alpha", "b0", "g_pos", "g_neg")


def _torch():
    import torch  # lazy: importing dynstore must not pay for torch

    return torch


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`FusionModel` (all JSON-able; saved with each version).

    Attributes
    ----------
    alpha_init : float
        Initial weight of the attribute term ``W a_i``.
    min_history : int
        Training positives an item needs to get a residual ``r_i, rb_i``.
    half_life : float
        History weights decay as ``exp(-rank / half_life)`` (rank 0 = most recent).
    max_history : int
        Only the most recent events of each kind enter a user vector.
    epochs, batch_size, lr : training schedule (AdamW).
    weight_decay : float
        Decoupled weight decay of the shared parameters (``W, bv, ba, U, u0``).
    residual_decay : float
        Decoupled weight decay of the per-item residuals ``r_i, rb_i``.
    n_sampled_negatives : float
        Total loss weight of uniformly sampled negatives per positive.
    sample_pool : int
        Sampled items shared by a batch (each positive is scored against all of them).
    neg_weight, impression_weight : float
        Loss weights of explicit negatives (label -1) and impressions (label 0).
        Impressions weigh little (0.1, chosen on the validation slices of both
        quality benchmarks: +10 % NDCG@10 on the shop, neutral on MovieLens):
        they are many (8 per positive in the shop) and an often-shown item is
        ignored often because it is shown often.
    residual_dropout : float
        Probability that a warm target's residuals are hidden in a training step.
    prior_weight : float
        Weight of the new-user ("prior") scoring of every positive.
    history_stride : int
        Events of a user per history snapshot (1 = every event sees all earlier ones).
    scalar_lr_mult : float
        Learning-rate multiplier of the scalars ``alpha, b0, g_pos, g_neg``.
    user_transform : bool
        Learn ``M`` in ``(I + M)`` applied to the history terms (False keeps ``M = 0``).
    time_decay_days : float or None
        Half-life (days before the newest event) of event weights; None = no decay.
    seed : int
    use_negatives : bool
        False is the ablation that ignores explicit negatives and impressions
        (in the loss and in the user vector).
    """

    alpha_init: float = 0.1
    min_history: int = 5
    half_life: float = 20.0
    max_history: int = 200
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 0.003
    weight_decay: float = 1e-4
    residual_decay: float = 1e-3
    n_sampled_negatives: float = 16.0
    sample_pool: int = 2048
    neg_weight: float = 1.0
    impression_weight: float = 0.1
    residual_dropout: float = 0.0
    prior_weight: float = 1.0
    history_stride: int = 8
    scalar_lr_mult: float = 10.0
    user_transform: bool = True
    time_decay_days: float | None = 365.0
    seed: int = 0
    use_negatives: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainingData:
    """Everything :meth:`FusionModel.fit` needs, as aligned numpy arrays.

    Attributes
    ----------
    V : float32 [n_items, d]
        Semantic vectors (normalised by the model if they are not).
    A : float32 [n_items, fa]
        Item attribute features.
    UA : float32 [n_users, fu]
        User attribute features.
    user, item : int64 [n]
        Row indices into ``UA`` and ``V``/``A``.
    ts : int64 [n]
        Event time, epoch seconds.
    label : int8 [n]
        1 positive, -1 explicit negative, 0 shown-but-ignored impression.
    """

    V: np.ndarray
    A: np.ndarray
    UA: np.ndarray
    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    label: np.ndarray

    def __post_init__(self) -> None:
        self.V = np.ascontiguousarray(self.V, dtype=np.float32)
        self.A = np.ascontiguousarray(self.A, dtype=np.float32).reshape(self.V.shape[0], -1)
        self.UA = np.ascontiguousarray(self.UA, dtype=np.float32)
        if self.UA.ndim == 1:
            self.UA = self.UA.reshape(-1, 0) if self.UA.size == 0 else self.UA[:, None]
        self.user = np.asarray(self.user, dtype=np.int64)
        self.item = np.asarray(self.item, dtype=np.int64)
        self.ts = np.asarray(self.ts, dtype=np.int64)
        self.label = np.asarray(self.label, dtype=np.int8)
        n = self.user.shape[0]
        if not (self.item.shape[0] == self.ts.shape[0] == self.label.shape[0] == n):
            raise ValueError("user, item, ts and label must have the same length")
        if n and (self.item.min() < 0 or self.item.max() >= self.V.shape[0]):
            raise ValueError("item index out of range of V")
        if n and (self.user.min() < 0 or self.user.max() >= self.UA.shape[0]):
            raise ValueError("user index out of range of UA")


def _normalise(V: np.ndarray) -> np.ndarray:
    V = np.asarray(V, dtype=np.float32)
    norm = np.linalg.norm(V, axis=1, keepdims=True)
    return np.divide(V, norm, out=np.zeros_like(V), where=norm > 0)


def _decay_weights(rank: np.ndarray, length: np.ndarray, half_life: float) -> np.ndarray:
    """``exp(-rank/h)`` normalised over a bag of ``length`` events (closed-form sum)."""
    q = math.exp(-1.0 / half_life)
    total = (1.0 - q ** length.astype(np.float64)) / (1.0 - q)
    return (q ** rank.astype(np.float64) / total).astype(np.float32)


def _ranges(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``arange(start[b], end[b])`` for all b -> (indices, offsets [n_bags])."""
    lens = np.maximum(end - start, 0)
    offsets = np.zeros(lens.size, dtype=np.int64)
    np.cumsum(lens[:-1], out=offsets[1:])
    total = int(lens.sum())
    idx = np.arange(total, dtype=np.int64) - np.repeat(offsets - start, lens)
    return idx, offsets


def build_histories(
    users: np.ndarray,
    ev_user: np.ndarray,
    ev_item: np.ndarray,
    ev_label: np.ndarray,
    ev_ts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR histories of ``users`` from an event log, for :meth:`FusionModel.user_vectors`.

    Returns ``(hist_ptr [m+1], hist_item, hist_label, hist_ts)``; within a user, events keep
    their order in the log (which breaks ties in time). Users without events get an empty row.

    >>> build_histories(np.array([7, 3]), np.array([3, 7, 3]), np.array([0, 1, 2]),
    ...                 np.array([1, 1, -1]), np.array([5, 6, 7]))[0]
    array([0, 1, 3])
    """
    users = np.asarray(users, dtype=np.int64)
    ev_user = np.asarray(ev_user, dtype=np.int64)
    order = np.argsort(ev_user, kind="stable")
    su = ev_user[order]
    lo = np.searchsorted(su, users, side="left")
    hi = np.searchsorted(su, users, side="right")
    idx, _ = _ranges(lo, hi)
    sel = order[idx]
    ptr = np.zeros(users.size + 1, dtype=np.int64)
    np.cumsum(hi - lo, out=ptr[1:])
    return (
        ptr,
        np.asarray(ev_item, dtype=np.int64)[sel],
        np.asarray(ev_label, dtype=np.int8)[sel],
        np.asarray(ev_ts, dtype=np.int64)[sel],
    )


class FusionModel:
    """Fused item embeddings + history-based user vectors (see the module docstring).

    Parameters
    ----------
    d : int
        Semantic vector width.
    fa, fu : int
        Item and user attribute feature widths (0 allowed).
    config : ModelConfig, optional

    Examples
    --------
    >>> m = FusionModel(d=4, fa=2, fu=0)
    >>> sorted(m.state()[0])
    ['M', 'U', 'W', 'alpha', 'b0', 'ba', 'bv', 'g_neg', 'g_pos', 'u0']
    """

    def __init__(self, d: int, fa: int, fu: int, config: ModelConfig | None = None):
        self.d, self.fa, self.fu = int(d), int(fa), int(fu)
        self.config = config or ModelConfig()
        rng = np.random.default_rng(self.config.seed)
        # each attribute starts as a random unit direction: a small, seeded projection
        W = rng.normal(size=(self.fa, self.d))
        W /= np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
        self.params: dict[str, np.ndarray] = {
            "W": W.astype(np.float32),
            "alpha": np.array([self.config.alpha_init], np.float32),
            "b0": np.zeros(1, np.float32),
            "bv": np.zeros(self.d, np.float32),
            "ba": np.zeros(self.fa, np.float32),
            "u0": np.zeros(self.d, np.float32),
            "U": np.zeros((self.fu, self.d), np.float32),
            "g_pos": np.ones(1, np.float32),
            "g_neg": np.array([-0.5 if self.config.use_negatives else 0.0], np.float32),
            "M": np.zeros((self.d, self.d), np.float32),
        }
        self._residuals: tuple[np.ndarray, np.ndarray] | None = None

    # ----------------------------------------------------------- construction
    @classmethod
    def untrained(
        cls,
        V: np.ndarray,
        A: np.ndarray,
        fu: int,
        popularity: np.ndarray | None,
        config: ModelConfig | None = None,
    ) -> "FusionModel":
        """The documented version-1 model, before any training.

        Seeded random ``W``, ``alpha = alpha_init``, ``u0 = 0``, ``U = 0``, ``g_pos = 1``,
        ``g_neg = -0.5``; the item bias is the standardised ``log(1 + popularity)`` and is
        carried as the residual bias ``rb`` (``.residuals`` = ``(zeros, bias)``), so pass
        ``model.residuals`` to :meth:`item_side`. A new user gets the popular items; a
        user with history gets items similar to what they liked, plus the prior.

        >>> import numpy as np
        >>> m = FusionModel.untrained(np.eye(3, dtype=np.float32), np.zeros((3, 0)), 0, None)
        >>> m.residuals[1].tolist()
        [0.0, 0.0, 0.0]
        """
        V = np.asarray(V, dtype=np.float32)
        A = np.asarray(A, dtype=np.float32).reshape(V.shape[0], -1)
        m = cls(V.shape[1], A.shape[1], fu, config)
        n = V.shape[0]
        rb = np.zeros(n, np.float32)
        if popularity is not None and n:
            lp = np.log1p(np.maximum(np.asarray(popularity, dtype=np.float64), 0.0))
            sd = lp.std()
            rb = ((lp - lp.mean()) / (sd if sd > 0 else 1.0)).astype(np.float32)
        m._residuals = (np.zeros((n, m.d), np.float32), rb)
        return m

    # ----------------------------------------------------------------- serving
    @property
    def residuals(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(R [n_items, d], rb [n_items])`` of the last :meth:`fit` (zero rows for items
        below ``min_history``), aligned with that fit's items; None before any fit."""
        return self._residuals

    def item_side(
        self,
        V: np.ndarray,
        A: np.ndarray,
        residuals: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fused item matrix ``Wf [n, d]`` and bias ``[n]`` (float32).

        ``residuals=None`` means no residuals (every item scored as cold).

        >>> import numpy as np
        >>> m = FusionModel(d=2, fa=0, fu=0)
        >>> m.item_side(np.array([[3.0, 4.0]]), np.zeros((1, 0)))[0].tolist()
        [[0.6000000238418579, 0.800000011920929]]
        """
        p = self.params
        V = _normalise(V)
        A = np.asarray(A, dtype=np.float32).reshape(V.shape[0], -1)
        if A.shape[1] != self.fa or V.shape[1] != self.d:
            raise ValueError(f"expected V [n, {self.d}] and A [n, {self.fa}]")
        Wf = V + p["alpha"][0] * (A @ p["W"])
        bias = p["b0"][0] + V @ p["bv"] + A @ p["ba"]
        if residuals is not None:
            R, rb = residuals
            Wf = Wf + np.asarray(R, dtype=np.float32)
            bias = bias + np.asarray(rb, dtype=np.float32)
        return Wf.astype(np.float32), bias.astype(np.float32)

    def user_vectors(
        self,
        UA_rows: np.ndarray | None,
        hist_ptr: np.ndarray,
        hist_item: np.ndarray,
        hist_label: np.ndarray,
        hist_ts: np.ndarray,
        Wf: np.ndarray,
    ) -> np.ndarray:
        """User vectors ``X [m, d]`` from CSR histories (see :func:`build_histories`).

        Parameters
        ----------
        UA_rows : float32 [m, fu] or None
            User attribute rows (None or zeros for unknown users).
        hist_ptr : int64 [m+1]
            User ``u``'s events are ``hist_*[hist_ptr[u]:hist_ptr[u+1]]``.
        hist_item : int64
            Row indices into ``Wf``.
        hist_label : int8
            1 positive, -1 explicit negative, 0 impression.
        hist_ts : int64
            Event times; the most recent ``max_history`` of each kind count, recency-weighted.
        Wf : float32 [n_items, d]
            Fused item matrix from :meth:`item_side`.

        Examples
        --------
        >>> import numpy as np
        >>> m = FusionModel(d=2, fa=0, fu=0)
        >>> Wf = np.eye(2, dtype=np.float32)
        >>> m.user_vectors(None, np.array([0, 1]), np.array([1]), np.array([1]),
        ...                np.array([0]), Wf).tolist()
        [[0.0, 1.0]]
        """
        torch = _torch()
        p = self.params
        hist_ptr = np.asarray(hist_ptr, dtype=np.int64)
        m = hist_ptr.size - 1
        items = np.asarray(hist_item, dtype=np.int64)
        labels = np.asarray(hist_label, dtype=np.int8)
        ts = np.asarray(hist_ts, dtype=np.int64)
        user_of = np.repeat(np.arange(m, dtype=np.int64), np.diff(hist_ptr))
        keep = (labels == 1) | (self.config.use_negatives & (labels <= 0))
        grp = (labels != 1).astype(np.int64)
        pos = np.arange(items.size, dtype=np.int64)
        user_of, items, grp, ts, pos = (a[keep] for a in (user_of, items, grp, ts, pos))
        # bag = (user, kind); inside a bag most recent first (later position wins ties)
        order = np.lexsort((-pos, -ts, grp, user_of))
        bag = (user_of * 2 + grp)[order]
        items = items[order]
        counts = np.bincount(bag, minlength=2 * m)
        starts = np.zeros(2 * m, dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        rank = np.arange(bag.size, dtype=np.int64) - starts[bag]
        cut = rank < self.config.max_history
        eff = np.minimum(counts, self.config.max_history)
        w = _decay_weights(rank[cut], eff[bag[cut]], self.config.half_life)
        bag, items = bag[cut], items[cut]
        offsets = np.zeros(2 * m, dtype=np.int64)
        np.cumsum(eff[:-1], out=offsets[1:])
        with torch.no_grad():
            H = torch.nn.functional.embedding_bag(
                torch.from_numpy(items),
                torch.from_numpy(np.ascontiguousarray(Wf, dtype=np.float32)),
                torch.from_numpy(offsets),
                mode="sum",
                per_sample_weights=torch.from_numpy(w),
            ).numpy().reshape(m, 2, -1)
        Xh = p["g_pos"][0] * H[:, 0] + p["g_neg"][0] * H[:, 1]
        X = p["u0"][None, :] + Xh + Xh @ p["M"]
        if UA_rows is not None and self.fu:
            X = X + np.asarray(UA_rows, dtype=np.float32).reshape(m, self.fu) @ p["U"]
        return np.ascontiguousarray(X, dtype=np.float32)

    def score(
        self,
        data: "TrainingData",
        users: np.ndarray,
        residuals: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Logits ``[len(users), n_items]`` for users of ``data`` from their events in it.

        A convenience for evaluation (serving computes the same from stored ``Wf``).
        """
        Wf, bias = self.item_side(data.V, data.A, residuals)
        ptr, it, lab, ts = build_histories(users, data.user, data.item, data.label, data.ts)
        X = self.user_vectors(data.UA[np.asarray(users)], ptr, it, lab, ts, Wf)
        return X @ Wf.T + bias[None, :]

    # ---------------------------------------------------------------- training
    def _prepare(self, data: TrainingData, n_warm: int, wmap: np.ndarray) -> dict:
        """Sort events into history snapshots ("bags") and precompute their fixed parts.

        Events of a user are taken in time order in runs of ``history_stride``; a run shares
        one history: the user's events strictly before the run's first timestamp (so no
        event of the run, nor anything later, leaks into its own input).
        """
        torch = _torch()
        cfg = self.config
        label = data.label
        keep = (label == 1) | (cfg.use_negatives & (label <= 0))
        idx = np.flatnonzero(keep)
        # dense time rank keeps the (user, time) key inside int64 for any epoch range
        _, trank = np.unique(data.ts[idx], return_inverse=True)
        span = int(trank.max(initial=0)) + 2
        key = data.user[idx] * span + trank
        order = np.lexsort((idx, key))  # by user, time, then log position
        ev, key = idx[order], key[order]
        user = data.user[ev]
        lab = label[ev]
        # bags: consecutive runs of `stride` events of one user
        new_user = np.r_[True, user[1:] != user[:-1]]
        user_start = np.maximum.accumulate(np.where(new_user, np.arange(ev.size), 0))
        pos_in_user = np.arange(ev.size) - user_start
        stride = max(1, int(cfg.history_stride))
        bag_first = new_user | (pos_in_user % stride == 0)
        first = np.flatnonzero(bag_first)
        n_bags = first.size
        bag_ptr = np.r_[first, ev.size].astype(np.int64)
        bag_user = user[first]
        bag_key = key[first]
        out: dict = {"ev": ev, "label": lab, "bag_ptr": bag_ptr, "bag_user": bag_user,
                     "n_bags": n_bags}
        is_pos = lab == 1
        VA = np.concatenate([_normalise(data.V), data.A], axis=1).astype(np.float32)
        for name, sel in (("pos", is_pos), ("neg", ~is_pos)):
            k = key[sel]
            items = data.item[ev[sel]]
            end = np.searchsorted(k, bag_key, side="left")  # strictly before the run
            lo = np.searchsorted(k, bag_user * span, side="left")
            start = np.maximum(lo, end - cfg.max_history)
            j, offsets = _ranges(start, end)
            lens = np.maximum(end - start, 0)
            w = _decay_weights(np.repeat(end - 1, lens) - j, np.repeat(lens, lens),
                               cfg.half_life)
            hist_items = items[j]
            with torch.no_grad():  # the text/attribute part of a history never changes
                hva = torch.nn.functional.embedding_bag(
                    torch.from_numpy(hist_items), torch.from_numpy(VA),
                    torch.from_numpy(offsets), mode="sum",
                    per_sample_weights=torch.from_numpy(w)).numpy()
            # residual part: only warm items carry a residual, so only they are kept
            wr = wmap[hist_items] < n_warm
            bag_of_entry = np.repeat(np.arange(n_bags), lens)[wr]
            r_ptr = np.zeros(n_bags + 1, np.int64)
            np.cumsum(np.bincount(bag_of_entry, minlength=n_bags), out=r_ptr[1:])
            out[name] = (hva, r_ptr, wmap[hist_items[wr]], w[wr])
        w = np.where(lab == 1, 1.0, np.where(lab < 0, cfg.neg_weight, cfg.impression_weight))
        if cfg.time_decay_days:
            age = (data.ts[ev].max(initial=0) - data.ts[ev]) / 86400.0
            w = w * np.power(0.5, age / cfg.time_decay_days)
        out["weight"] = w.astype(np.float32)
        return out

    def fit(
        self,
        data: TrainingData,
        *,
        epochs: int | None = None,
        device: str = "cpu",
        progress: Callable[[int, int], Any] | None = None,
        init_residuals: tuple[np.ndarray, np.ndarray] | None = None,
        holdout: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        patience: int = 2,
    ) -> dict:
        """Train from the model's current parameters (warm start) on ``data``.

        Parameters
        ----------
        data : TrainingData
        epochs : int, optional
            Defaults to ``config.epochs``.
        device : str
            Torch device ("cpu", "cuda").
        progress : callable(done_steps, total_steps), optional
        init_residuals : (R [n_items, d], rb [n_items]), optional
            Residuals to start from, aligned with ``data``'s items (e.g. the previous
            version's, re-aligned by the store). Default: ``R = 0`` and ``rb`` = the
            standardised ``log(1 + positives)`` of :meth:`untrained`. Rows of items below
            ``min_history`` are ignored (their residuals are zero after the fit).
        holdout : (user, item, label), optional
            Early stopping: after every epoch NDCG@10 on these later events (users
            ranked from their events in ``data``, as :func:`evaluate` does) is measured;
            training stops after ``patience`` epochs without a new best, and the best
            epoch's parameters are kept. How many epochs help depends on the data
            (impressions multiply the steps per epoch; a drift shortens what is worth
            learning), so a fixed count either under- or over-fits somewhere.

        Returns
        -------
        dict
            ``loss`` (last epoch's weighted mean), ``epoch_losses``, ``epochs`` (run), ``n_positive``,
            ``n_negative``, ``n_impression``, ``n_warm_items``, ``seconds``; with ``holdout``
            also ``epoch_ndcg@10`` and ``best_epoch``.

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> data = TrainingData(V=rng.normal(size=(20, 4)), A=np.zeros((20, 0)),
        ...     UA=np.zeros((5, 0)), user=rng.integers(0, 5, 100), item=rng.integers(0, 20, 100),
        ...     ts=np.arange(100), label=np.ones(100, np.int8))
        >>> stats = FusionModel(4, 0, 0, ModelConfig(epochs=2)).fit(data)
        >>> stats["n_positive"]
        100
        """
        torch = _torch()
        cfg = self.config
        t_start = time.perf_counter()
        epochs = cfg.epochs if epochs is None else int(epochs)
        V = _normalise(data.V)
        A = data.A
        if V.shape[1] != self.d or A.shape[1] != self.fa or data.UA.shape[1] != self.fu:
            raise ValueError(
                f"data dims (d={V.shape[1]}, fa={A.shape[1]}, fu={data.UA.shape[1]}) do not "
                f"match the model (d={self.d}, fa={self.fa}, fu={self.fu})"
            )
        n_items = V.shape[0]
        n_pos_item = np.bincount(data.item[data.label == 1], minlength=n_items)
        warm = n_pos_item >= cfg.min_history
        n_warm = int(warm.sum())
        wmap = np.full(n_items, n_warm, dtype=np.int64)  # row n_warm = constant zero row
        wmap[warm] = np.arange(n_warm)
        prep = self._prepare(data, n_warm, wmap)
        dev = torch.device(device)
        threads = torch.get_num_threads()
        if dev.type == "cpu":
            # the ops are small gathers and ~1k x d matmuls: extra threads only add sync
            # overhead (badly so on a shared machine), and one thread makes CPU results
            # bit-identical whatever the core count
            torch.set_num_threads(1)
        try:
            return self._fit(data, prep, warm, wmap, epochs, dev, progress, init_residuals,
                             t_start, holdout, patience)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, data, prep, warm, wmap, epochs, dev, progress, init_residuals, t_start,
             holdout=None, patience=2):
        torch = _torch()
        cfg = self.config
        V = _normalise(data.V)
        A = data.A
        n_items = V.shape[0]
        n_warm = int(warm.sum())
        ev, lab = prep["ev"], prep["label"]
        if init_residuals is not None:
            R0 = np.asarray(init_residuals[0], np.float32)[warm].copy()
            rb0 = np.asarray(init_residuals[1], np.float32)[warm].copy()
        else:
            # start the bias residual at the popularity prior of ``untrained``: per-item
            # parameters move slowly under sampled negatives
            R0 = np.zeros((n_warm, self.d), np.float32)
            lp = np.log1p(np.bincount(data.item[data.label == 1], minlength=n_items))
            sd = lp.std()
            rb0 = ((lp - lp.mean()) / (sd if sd > 0 else 1.0)).astype(np.float32)[warm]
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        f32 = torch.float32

        def t(x):
            return torch.as_tensor(np.ascontiguousarray(x), dtype=f32, device=dev)

        def tl(x):
            return torch.as_tensor(np.asarray(x), dtype=torch.long, device=dev)

        d = self.d
        VA = t(np.concatenate([V, A], axis=1))  # constants: only W, biases, residuals learn
        UA = t(data.UA)
        P = {k: t(v).clone().requires_grad_(True) for k, v in self.params.items()}
        if not cfg.use_negatives:
            P["g_neg"].requires_grad_(False)
            P["g_neg"].data.zero_()
        if not cfg.user_transform:
            P["M"].requires_grad_(False)
        R = t(R0).requires_grad_(True)
        rb = t(rb0).requires_grad_(True)
        zero_row = torch.zeros(1, d, dtype=f32, device=dev)
        zero_b = torch.zeros(1, dtype=f32, device=dev)
        opt = torch.optim.AdamW(
            [
                {"params": [P[k] for k in ("W", "bv", "ba", "u0", "U", "M")
                            if P[k].requires_grad],
                 "weight_decay": cfg.weight_decay},
                # scalars set the scale of whole terms: let them move faster
                {"params": [P[k] for k in _SCALARS if P[k].requires_grad],
                 "weight_decay": 0.0, "lr": cfg.lr * cfg.scalar_lr_mult},
                {"params": [R, rb], "weight_decay": cfg.residual_decay},
            ],
            lr=cfg.lr,
        )
        hist = {k: (t(prep[k][0]), prep[k][1], prep[k][2], prep[k][3])
                for k in (("pos", "neg") if cfg.use_negatives else ("pos",))}
        bag_ptr, n_bags = prep["bag_ptr"], prep["n_bags"]
        bag_size = np.diff(bag_ptr)
        ev_item = data.item[ev]
        y_all = (lab == 1).astype(np.float32)
        weight_all = prep["weight"]
        neg_scale = cfg.n_sampled_negatives / max(1, cfg.sample_pool)
        bs = max(1, int(cfg.batch_size))

        def residual_part(kind: str, bags: np.ndarray, Rx):
            _, r_ptr, r_idx, r_w = hist[kind]
            j, offsets = _ranges(r_ptr[bags], r_ptr[bags + 1])
            return torch.nn.functional.embedding_bag(
                tl(r_idx[j]), Rx, tl(offsets), mode="sum",
                per_sample_weights=t(r_w[j]))

        def vectors(Rx, rbx, items: np.ndarray, drop: np.ndarray | None = None):
            rows = wmap[items]
            if drop is not None:
                rows = np.where(drop, n_warm, rows)
            va = VA[tl(items)]
            w = va[:, :d] + P["alpha"] * (va[:, d:] @ P["W"]) + Rx[tl(rows)]
            b = P["b0"] + va[:, :d] @ P["bv"] + va[:, d:] @ P["ba"] + rbx[tl(rows)]
            return w, b

        def export():
            with torch.no_grad():
                for k in self.params:
                    self.params[k] = P[k].detach().cpu().numpy().astype(np.float32).reshape(
                        self.params[k].shape)
                Rf = np.zeros((n_items, d), np.float32)
                rbf = np.zeros(n_items, np.float32)
                Rf[warm] = R.detach().cpu().numpy()
                rbf[warm] = rb.detach().cpu().numpy()
            self._residuals = (Rf, rbf)

        best = None
        epoch_scores: list[float] = []
        # batches are runs of whole bags, so each history snapshot is built once a step
        steps_per_epoch = max(1, math.ceil(ev.size / bs))
        total_steps = epochs * steps_per_epoch
        step = 0
        last_loss = float("nan")
        epoch_losses: list[float] = []
        for _epoch in range(epochs):
            perm = rng.permutation(n_bags)
            batch_of = np.cumsum(bag_size[perm]) // bs
            cuts = np.flatnonzero(np.r_[True, batch_of[1:] != batch_of[:-1], True])
            tot, cnt = 0.0, 0.0
            for c0, c1 in zip(cuts[:-1], cuts[1:]):
                bags = perm[c0:c1]
                e_idx, _ = _ranges(bag_ptr[bags], bag_ptr[bags + 1])
                e_bag = np.repeat(np.arange(bags.size), bag_size[bags])
                Rx = torch.cat([R, zero_row])
                rbx = torch.cat([rb, zero_b])
                X0b = P["u0"] + UA[tl(prep["bag_user"][bags])] @ P["U"]  # new-user path
                Xh = None
                for kind, g in (("pos", "g_pos"), ("neg", "g_neg")):
                    if kind not in hist:
                        continue
                    hva = hist[kind][0][tl(bags)]
                    h = hva[:, :d] + P["alpha"] * (hva[:, d:] @ P["W"])
                    h = P[g] * (h + residual_part(kind, bags, Rx))
                    Xh = h if Xh is None else Xh + h
                Xb = X0b + Xh + Xh @ P["M"]
                ti = ev_item[e_idx]
                drop = None
                if cfg.residual_dropout > 0:
                    drop = rng.random(ti.size) < cfg.residual_dropout
                wt, bt = vectors(Rx, rbx, ti, drop)
                y = t(y_all[e_idx])
                wb_np = weight_all[e_idx]
                wb = t(wb_np)
                # events of a bag share one user vector, so sampled negatives are scored
                # once per bag, weighted by the bag's positive weight
                pos_w_bag = np.bincount(e_bag, weights=wb_np * y_all[e_idx],
                                        minlength=bags.size)
                sampled = cfg.n_sampled_negatives > 0 and pos_w_bag.sum() > 0
                if sampled:
                    # one shared uniform pool for the whole batch: one matmul
                    si = rng.integers(0, n_items, size=cfg.sample_pool)
                    ws, bsm = vectors(Rx, rbx, si)
                    pwb = t(pos_w_bag)
                paths = [(Xb, 1.0, wb)]
                if cfg.prior_weight > 0:
                    # the positives scored as if the user were new: keeps the biases (and
                    # u0, U) the *marginal* popularity that new users need, instead of
                    # whatever the history term leaves unexplained. Dislikes are about
                    # personal taste given a history, so they stay out of the prior.
                    paths.append((X0b, cfg.prior_weight, wb * y))
                loss = torch.zeros((), device=dev)
                eb = tl(e_bag)
                for Xp, lam, wp in paths:
                    logit = (wt * Xp[eb]).sum(1) + bt
                    lp = torch.nn.functional.binary_cross_entropy_with_logits(
                        logit, y, weight=wp, reduction="sum")
                    if sampled:
                        sp = torch.nn.functional.softplus(Xp @ ws.T + bsm).sum(1)  # BCE, y=0
                        lp = lp + neg_scale * (sp * pwb).sum()
                    loss = loss + lam * lp
                denom = float(wb_np.sum()) or 1.0
                loss = loss / denom
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * denom
                cnt += denom
                step += 1
                if progress is not None:
                    progress(min(step, total_steps), total_steps)
            last_loss = tot / max(cnt, 1e-12)
            epoch_losses.append(last_loss)
            if holdout is not None:
                export()
                score = evaluate(self, data, *holdout, k=10)["ndcg@10"]
                epoch_scores.append(float(score))
                if best is None or score > best[0]:
                    best = (score, _epoch + 1, {k: v.copy() for k, v in self.params.items()},
                            self._residuals)
                elif _epoch + 1 - best[1] >= patience:
                    break

        if best is not None:
            self.params, self._residuals = best[2], best[3]
        else:
            export()
        return {
            "loss": float(last_loss),
            "epoch_losses": [float(x) for x in epoch_losses],
            **({"epoch_ndcg@10": epoch_scores, "best_epoch": best[1]} if best is not None else {}),
            "epochs": len(epoch_losses),
            "n_positive": int((lab == 1).sum()),
            "n_negative": int((lab < 0).sum()),
            "n_impression": int((lab == 0).sum()),
            "n_warm_items": n_warm,
            "seconds": time.perf_counter() - t_start,
        }

    # ------------------------------------------------------------- persistence
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """``(tensors, meta)``: float32 arrays for safetensors and JSON-able metadata.

        Residuals are per item and not included (the store keeps them with the items).

        >>> t, meta = FusionModel(d=3, fa=1, fu=2).state()
        >>> t["U"].shape, meta["d"]
        ((2, 3), 3)
        """
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.params.items()}
        meta = {
            "format": _FORMAT,
            "d": self.d,
            "fa": self.fa,
            "fu": self.fu,
            "config": self.config.to_dict(),
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, np.ndarray], meta: dict) -> "FusionModel":
        """Inverse of :meth:`state`."""
        if meta.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"unsupported model format {meta.get('format')!r}")
        m = cls(int(meta["d"]), int(meta["fa"]), int(meta["fu"]),
                ModelConfig.from_dict(meta.get("config", {})))
        for k, v in m.params.items():
            if k not in tensors:
                if k == "M":  # optional: states without it predate the user transform
                    continue
                raise ValueError(f"model state lacks tensor {k!r}")
            arr = np.asarray(tensors[k], dtype=np.float32)
            if arr.size != v.size:
                raise ValueError(f"tensor {k!r} has shape {arr.shape}, expected {v.shape}")
            m.params[k] = arr.reshape(v.shape).copy()
        return m


def evaluate(
    model: FusionModel,
    train: TrainingData,
    holdout_user: np.ndarray,
    holdout_item: np.ndarray,
    holdout_label: np.ndarray | None = None,
    *,
    residuals: tuple[np.ndarray, np.ndarray] | None = None,
    k: int = 10,
    exclude_seen: bool = True,
    candidates: np.ndarray | None = None,
    batch_users: int = 1024,
) -> dict:
    """Recall@k, NDCG@k and per-user AUC of ``model`` on a holdout.

    Users are ranked from their events in ``train`` (all items, or the boolean
    ``candidates`` mask); ``exclude_seen`` removes their training positives from the
    candidates. Relevant items are the holdout positives (``holdout_label == 1``, all rows
    when None). ``residuals`` default to ``model.residuals`` when those match ``train``.

    Returns
    -------
    dict
        ``{"recall@k", "ndcg@k", "auc", "n_users"}`` (means over users with a relevant item).
    """
    from .metrics import ndcg_at_k, recall_at_k, top_k, user_auc

    hu = np.asarray(holdout_user, dtype=np.int64)
    hi = np.asarray(holdout_item, dtype=np.int64)
    if holdout_label is not None:
        pos = np.asarray(holdout_label) == 1
        hu, hi = hu[pos], hi[pos]
    n_items = train.V.shape[0]
    if candidates is not None:
        cand = np.asarray(candidates, dtype=bool)
        keep = cand[hi]
        hu, hi = hu[keep], hi[keep]
    users = np.unique(hu)
    if residuals is None and model.residuals is not None and len(model.residuals[1]) == n_items:
        residuals = model.residuals
    Wf, bias = model.item_side(train.V, train.A, residuals)
    order = np.argsort(hu, kind="stable")
    hu_s, hi_s = hu[order], hi[order]
    ranked_all, rel_all, auc_vals = [], [], []
    tpos = train.label == 1
    for s in range(0, users.size, batch_users):
        ub = users[s : s + batch_users]
        ptr, it, lab, ts = build_histories(ub, train.user, train.item, train.label, train.ts)
        X = model.user_vectors(train.UA[ub], ptr, it, lab, ts, Wf)
        S = X @ Wf.T + bias[None, :]
        if candidates is not None:
            S[:, ~cand] = -np.inf
        seen = None
        if exclude_seen:
            sp, sit, _, _ = build_histories(ub, train.user[tpos], train.item[tpos],
                                            train.label[tpos], train.ts[tpos])
            seen = [sit[sp[i] : sp[i + 1]] for i in range(ub.size)]
        lo = np.searchsorted(hu_s, ub, "left")
        up = np.searchsorted(hu_s, ub, "right")
        rel = [hi_s[a:b_] for a, b_ in zip(lo, up)]
        ranked_all.append(top_k(S, k, seen))
        rel_all += rel
        excl = seen
        if candidates is not None:  # non-candidates are not negatives for the AUC either
            others = np.flatnonzero(~cand)
            excl = [np.r_[x, others] for x in (seen or [others[:0]] * ub.size)]
        auc_vals.append((user_auc(S, rel, excl), ub.size))
    if not users.size:
        return {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"), "auc": float("nan"),
                "n_users": 0}
    ranked = np.concatenate(ranked_all)
    a = sum(v * n for v, n in auc_vals) / sum(n for _, n in auc_vals)
    return {
        f"recall@{k}": recall_at_k(ranked, rel_all, k),
        f"ndcg@{k}": ndcg_at_k(ranked, rel_all, k),
        "auc": float(a),
        "n_users": int(users.size),
    }
