"""Active-learning sample selection for segmentation: pure functions over numpy arrays.

Entry points: :func:`select` (k pool indices, most informative first) and
:func:`score` (per-sample informativeness, higher = more informative).

Inputs (N = pool size):

- ``probs``: ``(N, C, H, W)`` softmax probabilities;
- ``mc_probs``: ``(T, N, C, H, W)`` Monte-Carlo dropout samples;
- ``embeddings``: ``(N, D)`` pool embeddings (e.g. pooled U-Net bottleneck);
- ``labeled_embeddings``: ``(M, D)`` of the labeled set, may be None or empty;
- ``scores``: ``(N,)`` precomputed uncertainty for the score-based strategies
  (``entropy``, ``least_confidence``, ``margin``, ``bald``, ``ceal``, ``hybrid``),
  given *instead of* probs/mc_probs. Compute them with :func:`image_score` one image
  at a time while predicting, so the pool's probabilities never need to be kept.

Strategies (see each family's module): ``random`` (baseline); uncertainty
(``entropy``, ``least_confidence``, ``margin``, ``bald``; module ``uncertainty``);
diversity (``kmeans``, ``coreset``; module ``diversity``); ``ceal`` (query part of
CEAL; use :func:`select_ceal` for the pseudo-labels too); ``hybrid`` (uncertainty
pre-filter + k-center). Uncertainty scores reduce pixel maps per image with
``reduction="sum"`` (the papers), ``"mean"`` or ``"region"``; see :func:`reduce_pixels`.

:func:`cluster_labels` groups a pool by its embeddings (k-means, the number of clusters
from the pool size: :func:`cluster_count`) for Label Studio's cluster-aware serving.

Cold start: ``kmeans`` and ``coreset`` need only embeddings (from a pretrained or
self-supervised encoder, no trained segmentation head), and ``random`` needs nothing,
so these are the strategies usable before the first training round
(:data:`COLD_START_STRATEGIES`, best first). Everything else needs predictions.

Results are int64 arrays of distinct indices, deterministic for a fixed ``seed``
(only ``random`` and ``kmeans`` use it), ties broken by lower index.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import as_array, check_k, top_k
from .baseline import random_select
from .ceal import CealSelection, ceal_pseudo_labels, ceal_threshold, select_ceal
from .diversity import (
    MAX_CLUSTERS,
    cluster_count,
    cluster_labels,
    coreset_select,
    greedy_k_center,
    kmeans_select,
)
from .hybrid import hybrid_select
from .registry import (
    COLD_START_STRATEGIES,
    REDUCTIONS,
    SCORE_STRATEGIES,
    STRATEGIES,
    Strategy,
    check_cold_start,
    check_uncertainty,
    get_strategy,
)
from .uncertainty import (
    image_score,
    pixel_bald,
    pixel_entropy,
    pixel_least_confidence,
    pixel_margin,
    reduce_pixels,
    uncertainty_scores,
)

__all__ = [
    "COLD_START_STRATEGIES",
    "MAX_CLUSTERS",
    "REDUCTIONS",
    "SCORE_STRATEGIES",
    "STRATEGIES",
    "CealSelection",
    "Strategy",
    "check_cold_start",
    "check_uncertainty",
    "get_strategy",
    "ceal_pseudo_labels",
    "ceal_threshold",
    "cluster_count",
    "cluster_labels",
    "coreset_select",
    "greedy_k_center",
    "hybrid_select",
    "image_score",
    "kmeans_select",
    "pixel_bald",
    "pixel_entropy",
    "pixel_least_confidence",
    "pixel_margin",
    "random_select",
    "reduce_pixels",
    "score",
    "select",
    "select_ceal",
]


def _pool_size(inputs: dict[str, Any]) -> tuple[dict[str, np.ndarray], int | None]:
    """Validate the given arrays' ndim and that they agree on N."""
    spec = {"probs": (4, 0), "mc_probs": (5, 1), "embeddings": (2, 0), "scores": (1, 0)}
    arrays, sizes = {}, {}
    for name, value in inputs.items():
        if value is None:
            continue
        ndim, n_axis = spec[name]
        arrays[name] = as_array(value, name, ndim)
        sizes[name] = arrays[name].shape[n_axis]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inputs disagree on the pool size N: {sizes}")
    return arrays, next(iter(sizes.values()), None)


def select(
    strategy: str,
    k: int,
    *,
    probs: np.ndarray | None = None,
    mc_probs: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    labeled_embeddings: np.ndarray | None = None,
    seed: int | None = None,
    scores: np.ndarray | None = None,
    **options: Any,
) -> np.ndarray:
    """Pick ``k`` distinct pool indices (int64), most informative first.

    Required inputs per strategy: ``random`` any input or option ``n``; ``entropy``,
    ``least_confidence``, ``margin``, ``ceal`` probs or mc_probs or scores; ``bald``
    mc_probs or scores; ``kmeans``, ``coreset`` embeddings; ``hybrid`` embeddings plus
    probs/mc_probs/scores. Options: ``reduction``/``region_size``/``region_quantile``
    for the score-based strategies (not with ``scores``), ``uncertainty`` (ceal,
    hybrid; default "entropy"), ``beta`` (hybrid, default 5), ``n_init`` (kmeans,
    default 3), ``n`` (random). Unknown options raise ``ValueError``.
    """
    spec = get_strategy(strategy)
    name = spec.name
    unknown = sorted(set(options) - spec.options)
    if unknown:
        allowed = ", ".join(sorted(spec.options)) or "none"
        raise ValueError(f"unknown option(s) for {name!r}: {', '.join(unknown)} (allowed: {allowed})")
    arrays, n = _pool_size({"probs": probs, "mc_probs": mc_probs, "embeddings": embeddings, "scores": scores})

    if name == "random":
        if "n" in options:
            if n is not None and options["n"] != n:
                raise ValueError(f"option n={options['n']} disagrees with the inputs' N={n}")
            n = options["n"]
        if n is None:
            raise ValueError("random needs the pool size: pass any input array or n=")
        return random_select(n, k, seed=seed)

    if spec.needs_embeddings and embeddings is None:
        raise ValueError(f"{name} needs embeddings (N, D)")
    if name == "kmeans":
        return kmeans_select(arrays["embeddings"], k, seed=seed, **options)
    if name == "coreset":
        check_k(k, n)
        return coreset_select(arrays["embeddings"], k, labeled_embeddings=labeled_embeddings)

    # Score-based: entropy, least_confidence, margin, bald, ceal, hybrid.
    if scores is not None:
        if probs is not None or mc_probs is not None:
            raise ValueError("pass either precomputed scores or probs/mc_probs, not both")
        if options.keys() & {"reduction", "region_size", "region_quantile"}:
            raise ValueError("reduction options apply to probs/mc_probs, not precomputed scores")
    elif probs is None and mc_probs is None:
        need = "mc_probs (T, N, C, H, W)" if name == "bald" else "probs or mc_probs"
        raise ValueError(f"{name} needs {need}, or precomputed scores (N,)")
    if name == "hybrid":
        return hybrid_select(
            k,
            embeddings=arrays["embeddings"],
            probs=probs,
            mc_probs=mc_probs,
            scores=scores,
            labeled_embeddings=labeled_embeddings,
            **options,
        )
    check_k(k, n)
    if scores is None:
        uncertainty = spec.uncertainty(str(options.pop("uncertainty", "entropy")))
        scores = uncertainty_scores(uncertainty, probs=probs, mc_probs=mc_probs, **options)
    else:
        scores = arrays["scores"]
    return top_k(scores, k)


def score(strategy: str, **inputs: Any) -> np.ndarray:
    """Per-sample informativeness ``(N,)`` float64, higher = more informative, for the
    strategies with a per-sample score (:data:`SCORE_STRATEGIES`): :func:`uncertainty_scores`
    (``probs``/``mc_probs`` and the reduction options), after the name is checked."""
    return uncertainty_scores(get_strategy(strategy).name, **inputs)
