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

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import numpy as np

from .dynamics import SEGMENT_SPEC, DynamicSpec, ItemActivity, SegmentActivity, popularity_prior
from .histories import build_histories, decay_weights, history_groups, normalise, weighted_bag_sum
from .itemitem import ItemItem
from .metrics import clearly_better
from .training import Trainer

__all__ = ["ModelConfig", "TrainingData", "FusionModel", "build_histories", "evaluate"]

_FORMAT = "dynstore.fusion/1"


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
    short_half_life, short_history : float, int
        The same for the short-term aggregate of the positives (``g_short``).
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
    objective : {"softmax", "bce"}
        Loss of the positives (see :mod:`dynstore.training`).
    user_weight_power : float
        Event weights are divided by ``n_user_events ** power``, so heavy users do not
        dominate (0: every event counts alike; 1: every user counts alike).
    item_item : bool
        Fuse the closed-form item-item component (:mod:`dynstore.itemitem`), its weight
        ``gamma`` chosen on the holdout of a fit.
    start_z : float
        With a holdout, a trained state replaces the start (and a non-zero item-item
        weight replaces none) only if its per-user NDCG@10 beats the start's by more than
        this many standard errors of the paired difference.
    dynamics_epochs, dynamics_lr, first_phase : int, float, tuple of str
        The first phase of training: only the parameters named in ``first_phase`` learn
        (default: the weights of the behaviour and segment features, and ``b0``), at
        ``dynamics_lr`` (see :meth:`dynstore.training.Trainer.fit`).
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
    short_history: int = 10
    short_half_life: float = 2.0
    seed: int = 0
    use_negatives: bool = True
    objective: str = "softmax"
    user_weight_power: float = 0.5
    item_item: bool = True
    start_z: float = 1.64
    dynamics_epochs: int = 2
    first_phase: tuple = ("theta", "theta_seg", "b0")
    dynamics_lr: float = 0.01
    dynamic: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in d.items() if k in known})
        out.first_phase = tuple(out.first_phase)  # JSON gives a list
        return out


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
    UK : int64 [n_users, n_segment_columns], optional
        Segment keys of each user (:meth:`FeatureSpec.segments`; -1: none).
    """

    V: np.ndarray
    A: np.ndarray
    UA: np.ndarray
    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    label: np.ndarray
    UK: np.ndarray | None = None

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
        if self.UK is None:
            self.UK = np.zeros((self.UA.shape[0], 0), np.int64)
        self.UK = np.asarray(self.UK, dtype=np.int64).reshape(self.UA.shape[0], -1)
        n = self.user.shape[0]
        if not (self.item.shape[0] == self.ts.shape[0] == self.label.shape[0] == n):
            raise ValueError("user, item, ts and label must have the same length")
        if n and (self.item.min() < 0 or self.item.max() >= self.V.shape[0]):
            raise ValueError("item index out of range of V")
        if n and (self.user.min() < 0 or self.user.max() >= self.UA.shape[0]):
            raise ValueError("user index out of range of UA")


@dataclass
class Activity:
    """The dynamic-feature indexes of one event log: per item, and per (segment, item)."""

    items: ItemActivity
    segments: SegmentActivity | None = None

    def now(self) -> int:
        return self.items.now()


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
    ['M', 'U', 'W', 'alpha', 'b0', 'ba', 'bv', 'g_neg', 'g_pos', 'theta', 'u0']
    """

    def __init__(self, d: int, fa: int, fu: int, config: ModelConfig | None = None,
                 dynamic: DynamicSpec | None = None, segments: tuple[int, ...] = ()):
        self.d, self.fa, self.fu = int(d), int(fa), int(fu)
        #: keys per user segment column (see FeatureSpec.segment_columns)
        self.segments = tuple(int(n) for n in segments)
        self.config = config or ModelConfig()
        if dynamic is None and self.config.dynamic:
            dynamic = DynamicSpec()
        self.dynamic = dynamic if self.config.dynamic else None
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
            # the last few likes weigh as much as the whole history: a new like moves
            # the list at once (measured neutral to +1 % NDCG@10 on both benchmarks)
            "g_short": np.ones(1, np.float32),
            "g_neg": np.array([-0.5 if self.config.use_negatives else 0.0], np.float32),
            "g_imp": np.array([-0.5 if self.config.use_negatives else 0.0], np.float32),
            "M": np.zeros((self.d, self.d), np.float32),
        }
        if self.config.item_item:
            self.params["gamma"] = np.zeros(1, np.float32)
        #: the closed-form item-item component (set by :meth:`fit`), or None
        self.item_item: ItemItem | None = None
        if self.dynamic is not None:
            self.params["theta"] = np.zeros(self.dynamic.width, np.float32)
            if self.segments:
                self.params["theta_seg"] = np.zeros((len(self.segments), SEGMENT_SPEC.width), np.float32)
        self._residuals: tuple[np.ndarray, np.ndarray] | None = None

    # ----------------------------------------------------------- construction
    @classmethod
    def untrained(
        cls,
        V: np.ndarray,
        A: np.ndarray,
        fu: int,
        popularity: np.ndarray | None = None,
        config: ModelConfig | None = None,
        *,
        rule: float | None = 30.0,
        dynamic: DynamicSpec | None = None,
        segments: tuple[int, ...] = (),
    ) -> "FusionModel":
        """The documented version-1 model, before any training: the popularity rule.

        Seeded random ``W``, ``alpha = alpha_init``, ``u0 = 0``, ``U = 0``, ``g_pos = 1``,
        ``g_neg = -0.5``. With dynamic features (the default) the bias is
        ``log(1 + positives decayed with half-life rule days)`` as of scoring time
        (``theta`` = 1 on that feature, 0 elsewhere): recent popularity, recounted at
        every query. Without (``config.dynamic=False``) it is the standardised
        ``log(1 + popularity)``, carried as the residual bias ``rb`` (``.residuals`` =
        ``(zeros, bias)``; pass them to :meth:`item_side`). A new user gets the
        popular items; a user with history gets items similar to what they liked, plus
        the prior.

        >>> import numpy as np
        >>> m = FusionModel.untrained(np.eye(3, dtype=np.float32), np.zeros((3, 0)), 0)
        >>> m.dynamic.names()[int(np.argmax(m.params["theta"]))]
        'pos@30d'
        """
        V = np.asarray(V, dtype=np.float32)
        A = np.asarray(A, dtype=np.float32).reshape(V.shape[0], -1)
        m = cls(V.shape[1], A.shape[1], fu, config, dynamic, segments)
        n = V.shape[0]
        rb = np.zeros(n, np.float32)
        if m.dynamic is not None:
            m.params["theta"][m.dynamic.index("pos", rule)] = 1.0
        elif popularity is not None and n:
            rb = popularity_prior(popularity)
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
        V = normalise(V)
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

    def activity(self, item, ts, label, n_items: int, keys=None) -> "Activity | None":
        """Index an event log for the dynamic features (None when the model has none).

        ``keys`` are the segment keys of each event's user (``[n_events, columns]``).
        """
        if self.dynamic is None:
            return None
        seg = None
        if self.segments and keys is not None and np.asarray(keys).size:
            seg = SegmentActivity(SEGMENT_SPEC, item, ts, label, keys, n_items, sum(self.segments))
        return Activity(ItemActivity(self.dynamic, item, ts, label, n_items), seg)

    def activity_of(self, data: "TrainingData") -> "Activity | None":
        """:meth:`activity` of ``data``'s events, built once per data object (early
        stopping scores the same data after every epoch)."""
        if self.dynamic is None:
            return None
        key = (self.dynamic, self.segments)
        memo = data.__dict__.setdefault("_activity", {})
        if key not in memo:
            memo[key] = self.activity(data.item, data.ts, data.label, data.V.shape[0], data.UK[data.user])
        return memo[key]

    def dynamic_bias(self, features: np.ndarray | None) -> np.ndarray | float:
        """``theta . f_i(t)``: the part of the bias that moves with behaviour.

        ``features`` is :meth:`ItemActivity.features` of the items at scoring time
        (0.0 when the model has no dynamic features).
        """
        if self.dynamic is None or features is None:
            return 0.0
        return (np.asarray(features, np.float32) @ self.params["theta"]).astype(np.float32)

    def key_columns(self) -> np.ndarray:
        """Segment column of every segment key."""
        return np.repeat(np.arange(len(self.segments)), self.segments).astype(np.int64)

    def segment_table(self, activity: "Activity | None", items, t) -> np.ndarray | None:
        """``float32 [n_keys, len(items)]``: what each user segment adds to each item's
        score at time ``t`` (``theta_seg`` of the key's column on the key's features)."""
        if activity is None or activity.segments is None or "theta_seg" not in self.params:
            return None
        F = activity.segments.key_features(items, t)  # [n_keys, n, width]
        theta = self.params["theta_seg"][self.key_columns()]  # [n_keys, width]
        return np.einsum("knf,kf->kn", F, theta).astype(np.float32)

    def item_item_bias(self, hist_ptr, hist_item, hist_label, n_items: int) -> np.ndarray | float:
        """``gamma`` times the users' standardised item-item scores from their positives
        (0.0 without the component)."""
        gamma = float(self.params.get("gamma", np.zeros(1))[0])
        if self.item_item is None or gamma == 0.0:
            return 0.0
        labels = np.asarray(hist_label)
        keep = labels == 1
        user_of = np.repeat(np.arange(len(hist_ptr) - 1), np.diff(hist_ptr))[keep]
        ptr = np.concatenate([[0], np.cumsum(np.bincount(user_of, minlength=len(hist_ptr) - 1))])
        return gamma * self.item_item.scores(ptr, np.asarray(hist_item)[keep], n_items)

    @staticmethod
    def segment_bias(table: np.ndarray | None, keys: np.ndarray) -> np.ndarray | float:
        """Per-user sum of ``table`` rows over the users' keys ``[m, columns]`` -> ``[m, n]``."""
        if table is None:
            return 0.0
        keys = np.asarray(keys, np.int64)
        out = np.zeros((keys.shape[0], table.shape[1]), np.float32)
        for c in range(keys.shape[1]):
            ok = keys[:, c] >= 0
            out[ok] += table[keys[ok, c]]
        return out

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
        p = self.params
        hist_ptr = np.asarray(hist_ptr, dtype=np.int64)
        m = hist_ptr.size - 1
        items = np.asarray(hist_item, dtype=np.int64)
        labels = np.asarray(hist_label, dtype=np.int8)
        ts = np.asarray(hist_ts, dtype=np.int64)
        user_of = np.repeat(np.arange(m, dtype=np.int64), np.diff(hist_ptr))
        pos = np.arange(items.size, dtype=np.int64)
        # most recent first inside a user (later position wins ties in time)
        order = np.lexsort((-pos, -ts, user_of))
        user_of, items, labels = user_of[order], items[order], labels[order]
        W = np.ascontiguousarray(Wf, dtype=np.float32)
        Xh = np.zeros((m, self.d), np.float32)
        for name, label, max_history, half_life in history_groups(self.config):
            sel = labels == label
            u, it = user_of[sel], items[sel]
            counts = np.bincount(u, minlength=m)
            starts = np.zeros(m, dtype=np.int64)
            np.cumsum(counts[:-1], out=starts[1:])
            rank = np.arange(u.size, dtype=np.int64) - starts[u]
            cut = rank < max_history
            eff = np.minimum(counts, max_history)
            w = decay_weights(rank[cut], eff[u[cut]], half_life)
            H = weighted_bag_sum(W, it[cut], w, u[cut], m)
            Xh += p[f"g_{name}"][0] * H
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
        return self.scorer(data, residuals)(np.asarray(users))

    def scorer(self, data: "TrainingData",
               residuals: tuple[np.ndarray, np.ndarray] | None = None) -> Callable:
        """``users -> logits [len(users), n_items]``, as serving would have scored the users
        of ``data`` just after its last event: histories and dynamic features from
        ``data``'s events, item side computed once."""
        n = data.V.shape[0]
        Wf, bias = self.item_side(data.V, data.A, residuals)
        act = self.activity_of(data)
        table = None
        if act is not None:
            now = act.now()
            bias = bias + self.dynamic_bias(act.items.features(np.arange(n), now))
            table = self.segment_table(act, np.arange(n), now)

        def score(users: np.ndarray) -> np.ndarray:
            ptr, it, lab, ts = build_histories(users, data.user, data.item, data.label, data.ts)
            X = self.user_vectors(data.UA[users], ptr, it, lab, ts, Wf)
            return (X @ Wf.T + bias[None, :] + self.segment_bias(table, data.UK[users])
                    + self.item_item_bias(ptr, it, lab, n))

        return score

    # ---------------------------------------------------------------- training
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

        See :mod:`dynstore.training` for the objective.

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
            version's, re-aligned by the store). Default: zero (with dynamic features)
            or the standardised ``log(1 + positives)``. Rows of items below
            ``min_history`` are ignored (their residuals are zero after the fit).
        holdout : (user, item, label), optional
            Early stopping: after every epoch NDCG@10 on these later events (users
            ranked from their events in ``data``, as :func:`evaluate` does) is measured;
            training stops after ``patience`` epochs without a new best, and the best
            epoch's parameters are kept.

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
        V = data.V
        if V.shape[1] != self.d or data.A.shape[1] != self.fa or data.UA.shape[1] != self.fu:
            raise ValueError(
                f"data dims (d={V.shape[1]}, fa={data.A.shape[1]}, fu={data.UA.shape[1]}) do not "
                f"match the model (d={self.d}, fa={self.fa}, fu={self.fu})"
            )
        epochs = self.config.epochs if epochs is None else int(epochs)
        activity = self.activity_of(data)
        threads = torch.get_num_threads()
        if torch.device(device).type == "cpu":
            # the ops are small gathers and ~1k x d matmuls: extra threads only add sync
            # overhead (badly so on a shared machine), and one thread makes CPU results
            # bit-identical whatever the core count
            torch.set_num_threads(1)
        try:
            trainer = Trainer(self, data, activity, device=device, init_residuals=init_residuals)
            stats = trainer.fit(epochs, holdout=holdout, patience=patience, progress=progress)
        finally:
            torch.set_num_threads(threads)
        if self.config.item_item:
            pos = data.label == 1
            self.item_item = ItemItem.fit(data.user[pos], data.item[pos], V.shape[0])
            if holdout is not None:
                stats["gamma"] = self.choose_gamma(data, holdout)
        return stats

    GAMMAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)

    def choose_gamma(self, data: TrainingData, holdout) -> dict:
        """Set ``gamma`` (the item-item weight) to the value of :attr:`GAMMAS` with the best
        NDCG@10 on ``holdout``; returns every value's score."""
        scores, per_user = {}, {}
        for g in self.GAMMAS:
            self.params["gamma"] = np.array([g], np.float32)
            res = evaluate(self, data, *holdout, k=10, per_user=True, with_auc=False)
            scores[g], per_user[g] = float(res["ndcg@10"]), res["ndcg_per_user"]
        # a weight is used only where the holdout shows it clearly (see start_z)
        fine = [g for g in self.GAMMAS
                if g == 0.0 or clearly_better(per_user[g], per_user[0.0], self.config.start_z)]
        best = max(fine, key=lambda g: (scores[g], -g))
        self.params["gamma"] = np.array([best], np.float32)
        return {"chosen": best, "ndcg@10": scores}

    # ------------------------------------------------------------- persistence
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """``(tensors, meta)``: float32 arrays for safetensors and JSON-able metadata.

        Residuals are per item and not included (the store keeps them with the items).

        >>> t, meta = FusionModel(d=3, fa=1, fu=2).state()
        >>> t["U"].shape, meta["d"]
        ((2, 3), 3)
        """
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.params.items()}
        if self.item_item is not None:
            tensors.update(self.item_item.tensors())
        meta = {
            "format": _FORMAT,
            "d": self.d,
            "fa": self.fa,
            "fu": self.fu,
            "config": self.config.to_dict(),
            "dynamic": self.dynamic.to_dict() if self.dynamic is not None else None,
            "segments": list(self.segments),
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, np.ndarray], meta: dict) -> "FusionModel":
        """Inverse of :meth:`state`."""
        if meta.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"unsupported model format {meta.get('format')!r}")
        config = ModelConfig.from_dict(meta.get("config", {}))
        dyn = meta.get("dynamic")
        if dyn is None:  # states before dynamic features carry their popularity in rb
            config.dynamic = False
        m = cls(int(meta["d"]), int(meta["fa"]), int(meta["fu"]), config,
                DynamicSpec.from_dict(dyn) if dyn else None, tuple(meta.get("segments", ())))
        tensors = dict(tensors)
        if "g_imp" not in tensors and "g_neg" in tensors:
            # earlier states pooled ignored impressions with the dislikes
            tensors["g_imp"] = tensors["g_neg"]
        m.item_item = ItemItem.from_tensors(tensors)
        for k, v in m.params.items():
            if k not in tensors:
                if k in ("M", "g_short", "gamma"):  # optional: earlier states had no such term
                    m.params[k] = np.zeros_like(v)
                    continue
                raise ValueError(f"model state lacks tensor {k!r}")
            arr = np.asarray(tensors[k], dtype=np.float32)
            if arr.size != v.size:
                raise ValueError(f"tensor {k!r} has shape {arr.shape}, expected {v.shape}")
            m.params[k] = arr.reshape(v.shape).copy()
        return m


from .evaluation import evaluate  # noqa: E402  (re-exported: evaluation uses no model code)
