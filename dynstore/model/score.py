"""The score equation: every term of a logit, in one place (numpy).

::

    logit(u, i) = x_u . w_i + b_i(t) + s_{u,i}(t) + gamma * ii_{u,i} + delta * knn_{u,i} + eta * cn_{u,i}

* ``x_u`` -- the user vector from attributes and latest history
  (:meth:`~dynstore.model.fusion.FusionModel.user_vectors`),
* ``w_i`` and ``b_i(t)`` -- the fused item vector and its bias as of ``t``: static
  (:meth:`~dynstore.model.fusion.FusionModel.item_side`) plus dynamic
  (:meth:`~dynstore.model.fusion.FusionModel.dynamic_bias`); for a *new* user (no
  positive in their history: :func:`new_users`) the dynamic part uses the model's
  ``theta_new`` when refresh chose one (the bias ``bias_new`` of :func:`score_terms`),
* ``s_{u,i}(t)`` -- what the user's segments picked lately
  (:meth:`~dynstore.model.fusion.FusionModel.segment_bias`),
* ``gamma * ii_{u,i}`` -- the item-item term from the user's positives
  (:meth:`~dynstore.model.fusion.FusionModel.item_item_bias`),
* ``delta * knn_{u,i}`` -- the user-kNN term: what the most similar users of a pool
  picked (:meth:`~dynstore.model.fusion.FusionModel.user_knn_bias`),
* ``eta * cn_{u,i}`` -- on cold items only, how close each is in text to the user's
  positives (:meth:`~dynstore.model.fusion.FusionModel.cold_neighbour_bias`).

:func:`score_terms` is what serving (recommend, ``score``, score-all,
``recommend_from_examples``: :func:`dynstore.serving.recommend.score_terms`) and
evaluation (:func:`dynstore.model.evaluation.scorer`) compute; each supplies the item
side, the segment term and the user-kNN pool from what it holds (a version's rows, the
live counts and positives, or a training window's events). The trainer computes the terms it learns in torch
(:class:`dynstore.model.training.Trainer`); ``tests/test_score.py`` checks that a trained
store's training-time and serving-time terms agree.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dynstore.model.histories import add_into

__all__ = ["score_terms", "logits", "new_users"]


def new_users(hist_ptr: np.ndarray, hist_label: np.ndarray) -> np.ndarray:
    """``bool [m]``: which of ``m`` users (CSR histories ``hist_ptr``, ``hist_label``) are
    *new* -- no positive in their history (impressions and dislikes alone do not count).
    The one rule for who gets the new users' bias (``theta_new``): serving, evaluation
    and refresh's choice of it (:mod:`dynstore.model.selection`) all ask here.

    >>> new_users(np.array([0, 2, 2, 3]), np.array([0, 1, -1])).tolist()
    [False, True, True]
    """
    ptr = np.asarray(hist_ptr, np.int64)
    pos = np.concatenate([[0], np.cumsum(np.asarray(hist_label) == 1)])
    return pos[ptr[1:]] == pos[ptr[:-1]]


def user_bias(bias: np.ndarray, bias_new: np.ndarray | None, hist: tuple) -> np.ndarray:
    """The item biases per user: ``bias`` (``[n]``) when no user is new, ``bias_new`` (``[n]``)
    when all are, else ``[m, n]`` with the rows of new users (:func:`new_users`) taken from
    ``bias_new``; a user with a positive always gets ``bias`` itself, bit for bit."""
    if bias_new is None:
        return bias
    new = new_users(hist[0], hist[2])
    if not new.any():
        return bias
    if new.all():
        return bias_new
    return np.where(new[:, None], bias_new[None, :], bias[None, :])


def score_terms(model: Any, Wf: np.ndarray, bias: np.ndarray, UA_rows: np.ndarray | None, hist: tuple,
                segment: np.ndarray | float, bias_new: np.ndarray | None = None, pool: Any = None,
                self_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(X [m, d], B)`` of ``model`` (a :class:`~dynstore.model.fusion.FusionModel`) for ``m``
    users: their vectors and everything else their logit adds per item -- ``bias`` (the item
    biases as of now, static + dynamic) plus the users' ``segment`` term and their item-item
    term -- as ``B [m, n_items]``, or ``[n_items]`` when no term depends on the user.

    ``hist`` is the users' CSR histories ``(ptr, item, label, ts)`` (rows of ``Wf``);
    ``UA_rows`` their attribute rows (None: none); ``bias_new`` the biases new users get
    instead of ``bias`` (static + ``theta_new`` on the dynamic features; None: the model
    has no ``theta_new``); ``pool`` the user-kNN term's neighbour pool (a
    :class:`~dynstore.model.userknn.Pool` or a callable giving one; None: no such term) and
    ``self_rows`` the users' own rows in it (-1: none). The logit of item ``i`` is ``X @ Wf[i] + B[..., i]`` (:func:`logits`)."""
    X = np.asarray(model.user_vectors(UA_rows, hist[0], hist[1], hist[2], hist[3], Wf), np.float32)
    ii = model.item_item_bias(hist[0], hist[1], hist[2], Wf.shape[0], hist[3])
    if pool is not None:
        knn = model.user_knn_bias(hist[0], hist[1], hist[2], Wf.shape[0], pool, self_rows, hist[3])
        if isinstance(knn, np.ndarray):
            ii = ii + knn
    cn = model.cold_neighbour_bias(hist[0], hist[1], hist[2], Wf)
    if isinstance(cn, np.ndarray):
        ii = ii + cn
    bias = user_bias(bias, bias_new, hist)
    extra = segment + ii if isinstance(ii, np.ndarray) or isinstance(segment, np.ndarray) else segment
    if isinstance(extra, np.ndarray):
        return X, (bias + extra).astype(np.float32, copy=False)
    return X, bias if not extra else bias + np.float32(extra)


def logits(X: np.ndarray, Wf: np.ndarray, B: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``X @ Wf.T + B``: the logits of :func:`score_terms`' terms over every item (or ``rows``),
    ``[m, n]``, the terms added in place (one ``[m, n]`` matrix alive beside ``B``).

    >>> X = np.ones((1, 2), np.float32); Wf = np.eye(2, dtype=np.float32)
    >>> logits(X, Wf, np.array([0.5, -1.0], np.float32)).tolist()
    [[1.5, 0.0]]
    """
    if rows is None:
        return add_into(X @ Wf.T, B)
    return add_into(X @ Wf[rows].T, B[..., rows])
