"""Diversity sampling on embeddings (e.g. the U-Net bottleneck, pooled per image).

Neither strategy looks at predictions, so both work before any model is trained
(cold start): use them with embeddings from a pretrained or self-supervised encoder.
:func:`cluster_labels` groups a pool for Label Studio's cluster-aware serving instead of
selecting from it.
Distances are Euclidean, computed in float64 on mean-centred data via
``|x|^2 - 2 x.y + |y|^2`` in chunks, so memory stays O(N·D + CHUNK) — no N×N matrix.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.cluster import KMeans

from ._common import as_array, check_k, chunks


def as_embeddings(x: object, name: str, dim: int | None = None) -> np.ndarray:
    arr = as_array(x, name, 2)
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has dimension {arr.shape[1]}, expected {dim}")
    return arr


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _min_sq_dist(x: np.ndarray, xn: np.ndarray, y: np.ndarray) -> np.ndarray:
    """For each row of ``x``, the squared distance to its nearest row of ``y``."""
    out = np.full(x.shape[0], np.inf)
    yn = _sq_norms(y)
    for sl in chunks(y.shape[0], x.shape[0]):
        d = x @ y[sl].T
        d *= -2.0
        d += xn[:, None]
        d += yn[sl][None, :]
        np.minimum(out, d.min(axis=1), out=out)
    return np.maximum(out, 0.0, out=out)


def greedy_k_center(
    points: np.ndarray,
    k: int,
    *,
    covered: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    first: int | None = None,
) -> np.ndarray:
    """Greedy k-center (Sener & Savarese, 2018): repeatedly take the point farthest
    from everything chosen or ``covered`` so far, a 2-approximation of the minimax
    cover. Returns indices into ``points`` in selection order.

    ``weights`` (non-negative, one per point) turn the criterion into
    ``weight * distance``; zero-distance points (duplicates of chosen ones) then never
    win while any non-duplicate has positive weight. With nothing covered the first
    pick is ``first``, or the point nearest the mean when ``first`` is None: a
    deterministic, representative start instead of an arbitrary or outlying one.
    Ties go to the lowest index.
    """
    x = np.array(as_embeddings(points, "points"), dtype=np.float64)  # private copy, centred below
    n = x.shape[0]
    k = check_k(k, n)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    centre = x.mean(axis=0)
    x -= centre
    xn = _sq_norms(x)
    has_cover = covered is not None and len(covered) > 0
    if has_cover:
        cov = as_embeddings(covered, "covered", x.shape[1])
        d2 = _min_sq_dist(x, xn, np.asarray(cov, dtype=np.float64) - centre)
    else:
        d2 = np.full(n, np.inf)
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n,) or not np.all(w >= 0):
            raise ValueError(f"weights must be {n} non-negative numbers, got shape {w.shape}")
    if first is not None and not 0 <= first < n:
        raise ValueError(f"first={first} is not a valid index into {n} points")
    taken = np.zeros(n, dtype=bool)
    picks = np.empty(k, dtype=np.int64)
    for j in range(k):
        if j == 0 and not has_cover:
            i = int(np.argmin(xn)) if first is None else int(first)
        else:
            crit = d2.copy() if w is None else np.sqrt(d2) * w
            crit[taken] = -np.inf
            i = int(np.argmax(crit))
        picks[j] = i
        taken[i] = True
        new = x @ x[i]
        new *= -2.0
        new += xn
        new += xn[i]
        np.maximum(new, 0.0, out=new)
        np.minimum(d2, new, out=d2)
    return picks


def coreset_select(
    embeddings: np.ndarray,
    k: int,
    *,
    labeled_embeddings: np.ndarray | None = None,
) -> np.ndarray:
    """Core-set selection: greedy k-center over the pool with the labeled set as
    already-covered centres, so each pick fills the largest hole in embedding space.

    Without a labeled set (cold start) the first pick is the pool point nearest the
    pool mean. Greedy k-center favours outliers; pair it with good embeddings.
    """
    x = as_embeddings(embeddings, "embeddings")
    covered = None
    if labeled_embeddings is not None and np.size(labeled_embeddings) > 0:
        covered = as_embeddings(labeled_embeddings, "labeled_embeddings", x.shape[1])
    return greedy_k_center(x, k, covered=covered)


def kmeans_select(
    embeddings: np.ndarray,
    k: int,
    *,
    seed: int | None = None,
    n_init: int = 3,
) -> np.ndarray:
    """k-means sampling (Roels & Saeys): cluster the pool into k clusters and take the
    sample nearest each centroid.

    Clusters are visited largest first and each takes its nearest *unused* sample, so
    picks are distinct even when two centroids share a nearest sample, and the first
    indices represent the most pool mass (useful when only part of a batch gets
    labelled). The labeled set is not used, as in Roels & Saeys. Deterministic for a
    fixed ``seed`` (``random_state`` of KMeans); ``n_init`` restarts keep the best
    inertia (use 1 on very large pools).
    """
    x = np.array(as_embeddings(embeddings, "embeddings"), dtype=np.float64)
    k = check_k(k, x.shape[0])
    if k == 0:
        return np.empty(0, dtype=np.int64)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    sizes = np.bincount(km.labels_, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    centre = x.mean(axis=0)
    x -= centre
    centres = km.cluster_centers_[order] - centre
    xn = _sq_norms(x)
    cn = _sq_norms(centres)
    taken = np.zeros(x.shape[0], dtype=bool)
    picks = np.empty(k, dtype=np.int64)
    for sl in chunks(k, x.shape[0]):
        d = x @ centres[sl].T
        d *= -2.0
        d += xn[:, None]
        d += cn[sl][None, :]
        for j, col in zip(range(sl.start, sl.stop), d.T, strict=True):
            col[taken] = np.inf
            i = int(np.argmin(col))
            picks[j] = i
            taken[i] = True
    return picks


MAX_CLUSTERS = 64


def cluster_count(n: int) -> int:
    """Clusters for a pool of ``n``: ``round(sqrt(n / 2))`` (Mardia's rule of thumb), within
    1..MAX_CLUSTERS.

    Grows with the pool but not with any data set's size. Label Studio serves one task of
    every cluster before a second of any, so once clusters outnumber the tasks labelled
    between two training runs each of those comes from its own cluster; the cap bounds
    k-means' cost on large pools. Pools of up to 4 get one cluster (nothing to group).
    """
    if n < 0:
        raise ValueError(f"pool size must be >= 0, got {n}")
    return min(MAX_CLUSTERS, max(1, round(math.sqrt(n / 2))))


def cluster_labels(embeddings: np.ndarray, *, seed: int | None = 0, n_init: int = 3) -> np.ndarray:
    """k-means cluster number (int64, 0..k-1) of each pool sample; k = :func:`cluster_count`
    of the pool, and never more than the pool's distinct embeddings.

    Near-identical samples (adjacent sections of one region) land in one cluster, so a
    queue served cluster by cluster does not show them in a row. Deterministic for a
    fixed ``seed``.
    """
    x = np.asarray(as_embeddings(embeddings, "embeddings"), dtype=np.float64)
    n = x.shape[0]
    k = min(cluster_count(n), len(np.unique(x, axis=0)))
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    return km.labels_.astype(np.int64)
