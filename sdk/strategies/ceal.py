"""Cost-Effective Active Learning (CEAL, Wang et al. 2016) for segmentation.

Each round CEAL sends the most *uncertain* samples to the oracle and, in addition,
trains on the most *confident* ones with the model's own predictions as labels. A
sample is confident when its mean pixel entropy is below a threshold ``delta`` (nats;
at most ``log C``) that decays linearly over rounds, so pseudo-labelling gets stricter
as the model improves. As in CEAL, pseudo-labels are meant to be recomputed every
round, not added permanently to the labeled set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._common import as_array, check_k, chunks, top_k, work_dtype
from .uncertainty import check_uncertainty, given_or_computed_scores, uncertainty_scores


@dataclass(frozen=True)
class CealSelection:
    """One CEAL round. ``query`` and ``pseudo`` never share an index."""

    query: np.ndarray  # (k,) int64, for the oracle, most uncertain first
    pseudo: np.ndarray  # (P,) int64, confident samples, most confident first
    pseudo_labels: np.ndarray  # (P, H, W) argmax class maps for ``pseudo``
    threshold: float


def ceal_threshold(delta0: float, decay: float, iteration: int) -> float:
    """CEAL's threshold schedule ``delta_t = max(delta0 - decay * t, 0)`` for round t >= 0."""
    if delta0 < 0 or decay < 0 or iteration < 0:
        raise ValueError(f"delta0, decay and iteration must be >= 0, got {delta0}, {decay}, {iteration}")
    return max(float(delta0) - float(decay) * iteration, 0.0)


def _pseudo(
    get_probs: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, ...],
    mean_entropy: np.ndarray,
    threshold: float,
    exclude: np.ndarray | None,
    max_samples: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    n, n_classes = shape[0], shape[1]
    mask = mean_entropy < threshold
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64).ravel()
        if ex.size and (ex.min() < -n or ex.max() >= n):
            raise ValueError(f"exclude holds indices outside the pool of size {n}")
        mask[ex] = False
    idx = np.flatnonzero(mask)
    idx = idx[np.argsort(mean_entropy[idx], kind="stable")]
    if max_samples is not None:
        if max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {max_samples}")
        idx = idx[:max_samples]
    labels = np.empty((idx.size, *shape[2:]), dtype=np.min_scalar_type(max(n_classes - 1, 0)))
    for sl in chunks(idx.size, int(np.prod(shape[1:]))):
        labels[sl] = get_probs(idx[sl]).argmax(axis=1)
    return idx.astype(np.int64), labels


def ceal_pseudo_labels(
    probs: np.ndarray,
    threshold: float,
    *,
    exclude: np.ndarray | None = None,
    max_samples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Confident samples and their pseudo-label maps.

    Returns ``(indices, labels)``: the pool indices whose mean pixel entropy is below
    ``threshold`` (most confident first, at most ``max_samples``, none from
    ``exclude``) and their per-pixel argmax ``(P, H, W)`` in the smallest unsigned
    dtype holding ``C - 1`` (uint8 for binary masks).
    """
    p = as_array(probs, "probs", 4)
    h = uncertainty_scores("entropy", probs=p, reduction="mean")
    return _pseudo(lambda i: p[i], p.shape, h, threshold, exclude, max_samples)


def select_ceal(
    k: int,
    *,
    threshold: float,
    probs: np.ndarray | None = None,
    mc_probs: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    uncertainty: str = "entropy",
    max_pseudo: int | None = None,
    reduction: str = "sum",
    region_size: int = 16,
    region_quantile: float = 1.0,
) -> CealSelection:
    """One CEAL round: top-``k`` uncertain samples plus disjoint pseudo-labelled ones.

    The query is ranked by ``uncertainty`` (any scored strategy, with the usual
    ``reduction`` options) or by precomputed ``scores``. Confidence always uses mean
    pixel entropy of ``probs`` (or of the MC mean when only ``mc_probs`` is given).
    Get ``threshold`` from :func:`ceal_threshold`.
    """
    check_uncertainty(uncertainty)
    if probs is not None:
        p = as_array(probs, "probs", 4)
        shape = p.shape
        mean_h = uncertainty_scores("entropy", probs=p, reduction="mean")

        def get_probs(i: np.ndarray) -> np.ndarray:
            return p[i]
    elif mc_probs is not None:
        mc = as_array(mc_probs, "mc_probs", 5)
        shape = mc.shape[1:]
        mean_h = uncertainty_scores("entropy", mc_probs=mc, reduction="mean")

        def get_probs(i: np.ndarray) -> np.ndarray:
            return mc[:, i].mean(axis=0, dtype=work_dtype(mc.dtype))
    else:
        raise ValueError("ceal needs probs (N, C, H, W) or mc_probs (T, N, C, H, W)")
    k = check_k(k, shape[0])
    scores = given_or_computed_scores(
        scores, shape[0], uncertainty, probs=probs, mc_probs=mc_probs, reduction=reduction,
        region_size=region_size, region_quantile=region_quantile,
    )  # fmt: skip
    query = top_k(scores, k)
    pseudo, labels = _pseudo(get_probs, shape, mean_h, threshold, query, max_pseudo)
    return CealSelection(query=query, pseudo=pseudo, pseudo_labels=labels, threshold=threshold)
