"""Hybrid sampling: uncertainty and diversity together.

Roels & Saeys found uncertainty sampling strong but blind to redundancy (a batch of
near-identical uncertain tiles teaches little more than one of them) and diversity
sampling alone weak; they left the combination as future work. This is the
"filter, then spread" scheme used by e.g. suggestive annotation (Yang et al. 2017):

1. keep the ``ceil(beta * k)`` most uncertain samples (uncertainty decides *what* is
   worth labelling);
2. choose k of them by greedy k-center on the embeddings, with the labeled set
   already covered (diversity decides *which* of those, avoiding duplicates and
   regions the labeled set already represents).

Improvement over plain k-center in step 2: the criterion is ``u_i / max(u) * d_i``
(normalised uncertainty times distance to the nearest chosen/labeled sample). Pure
k-center would ignore uncertainty once inside the candidate set, treating the most
and the ``beta*k``-th most uncertain alike; the product keeps far-away points
preferred while breaking comparable distances toward the more uncertain sample, and
a duplicate of a chosen sample (distance 0) never wins. With no labeled set the most
uncertain candidate is taken first. The result is in selection order, i.e. ordered by
this uncertainty-weighted coverage gain. ``beta = 1`` gives uncertainty top-k
reordered for diversity; ``beta >= N / k`` gives uncertainty-weighted k-center over
the whole pool.
"""

from __future__ import annotations

import math

import numpy as np

from ._common import check_k, top_k
from .diversity import as_embeddings, greedy_k_center
from .uncertainty import check_uncertainty, given_or_computed_scores


def hybrid_select(
    k: int,
    *,
    embeddings: np.ndarray,
    probs: np.ndarray | None = None,
    mc_probs: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    labeled_embeddings: np.ndarray | None = None,
    beta: float = 5.0,
    uncertainty: str = "entropy",
    reduction: str = "sum",
    region_size: int = 16,
    region_quantile: float = 1.0,
) -> np.ndarray:
    """Uncertainty pre-filter of ``beta * k`` samples, then weighted greedy k-center.

    Uncertainty comes from precomputed non-negative ``scores`` (N,) or from
    ``probs``/``mc_probs`` via the ``uncertainty`` strategy and ``reduction`` options.
    """
    x = as_embeddings(embeddings, "embeddings")
    n = x.shape[0]
    check_uncertainty(uncertainty)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 1:
        raise ValueError(f"beta must be a number >= 1, got {beta!r}")
    scores = given_or_computed_scores(
        scores, n, uncertainty, probs=probs, mc_probs=mc_probs, reduction=reduction,
        region_size=region_size, region_quantile=region_quantile,
    )  # fmt: skip
    if not (np.all(np.isfinite(scores)) and np.all(scores >= 0)):
        raise ValueError("hybrid needs finite, non-negative uncertainty scores")
    k = check_k(k, n)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    covered = None
    if labeled_embeddings is not None and np.size(labeled_embeddings) > 0:
        covered = as_embeddings(labeled_embeddings, "labeled_embeddings", x.shape[1])
    cand = top_k(scores, min(n, max(k, math.ceil(beta * k))))
    u = np.asarray(scores[cand], dtype=np.float64)
    weights = u / u.max() if u.max() > 0 else np.ones_like(u)
    picks = greedy_k_center(x[cand], k, covered=covered, weights=weights, first=0)
    return cand[picks]
