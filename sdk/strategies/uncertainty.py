"""Uncertainty sampling: pixel-wise uncertainty maps and their per-image reduction.

Pixel maps follow Roels & Saeys (2019): an uncertainty value per pixel, accumulated
per image. All map helpers take the class axis as ``axis`` (default ``-3``, so both a
single ``(C, H, W)`` image and a ``(N, C, H, W)`` batch work), keep float32 inputs in
float32, and loop over classes so the only temporaries are ``(…, H, W)``-sized.
Per-image scores are float64; higher always means more informative.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._common import as_array, chunks, normalize_axis, work_dtype

SCORE_STRATEGIES = ("entropy", "least_confidence", "margin", "bald")
REDUCTIONS = ("sum", "mean", "region")


def _class_views(p: np.ndarray, axis: int) -> Iterator[np.ndarray]:
    """Views (no copies) of each class slice along ``axis``."""
    head = (slice(None),) * axis
    for c in range(p.shape[axis]):
        yield p[head + (c,)]


def pixel_entropy(probs: np.ndarray, axis: int = -3) -> np.ndarray:
    """Shannon entropy (nats) over the class axis, with 0·log 0 = 0.

    Probabilities are clamped to the dtype's smallest normal number inside the log
    only, so exact zeros contribute 0 and never produce NaN/-inf. The maximum is
    ``log(C)``; the ML backend's confidence ``1 - mean(pixel_entropy) / log(C)``
    relies on that.
    """
    p = np.asarray(probs)
    ax = normalize_axis(axis, p.ndim)
    dt = work_dtype(p.dtype)
    tiny = dt.type(np.finfo(dt).tiny)  # typed scalar: a float16 input must not round it to 0
    shape = p.shape[:ax] + p.shape[ax + 1 :]
    h = np.zeros(shape, dtype=dt)
    buf = np.empty(shape, dtype=dt)
    for pc in _class_views(p, ax):
        np.maximum(pc, tiny, out=buf)
        np.log(buf, out=buf)
        np.multiply(buf, pc, out=buf)
        np.subtract(h, buf, out=h)
    return h


def pixel_least_confidence(probs: np.ndarray, axis: int = -3) -> np.ndarray:
    """``1 - max_c p_c``: how far the predicted class is from certainty."""
    p = np.asarray(probs)
    ax = normalize_axis(axis, p.ndim)
    m = np.max(p, axis=ax).astype(work_dtype(p.dtype), copy=False)
    np.subtract(1, m, out=m)
    return m


def pixel_margin(probs: np.ndarray, axis: int = -3) -> np.ndarray:
    """``1 - (p_top1 - p_top2)``, flipped so that a small margin scores high."""
    p = np.asarray(probs)
    ax = normalize_axis(axis, p.ndim)
    if p.shape[ax] < 2:
        raise ValueError(f"margin needs at least 2 classes on axis {axis}, got {p.shape[ax]}")
    views = _class_views(p, ax)
    top1 = np.array(next(views), dtype=work_dtype(p.dtype))
    top2 = np.full_like(top1, -np.inf)
    buf = np.empty_like(top1)
    for pc in views:
        np.minimum(top1, pc, out=buf)  # the loser of (current best, pc) may be 2nd best
        np.maximum(top2, buf, out=top2)
        np.maximum(top1, pc, out=top1)
    np.subtract(top1, top2, out=top1)
    np.subtract(1, top1, out=top1)
    return top1


def pixel_bald(mc_probs: np.ndarray, axis: int = -3) -> np.ndarray:
    """BALD mutual information ``H(mean_t p_t) - mean_t H(p_t)`` per pixel.

    ``mc_probs`` holds the T Monte-Carlo dropout samples on axis 0, e.g. ``(T, C, H, W)``
    or ``(T, N, C, H, W)``; ``axis`` is the class axis of ``mc_probs``. The expected
    entropy is accumulated one sample at a time, so the only large temporary is the
    mean prediction. Tiny negative values from rounding are clipped to 0 (MI >= 0).
    """
    mc = np.asarray(mc_probs)
    if mc.ndim < 2:
        raise ValueError(f"mc_probs must have a leading MC-sample axis, got shape {mc.shape}")
    ax = normalize_axis(axis, mc.ndim)
    if ax == 0:
        raise ValueError("axis 0 of mc_probs is the MC-sample axis, not the class axis")
    if mc.shape[0] == 0:
        raise ValueError("mc_probs has no Monte-Carlo samples (T == 0)")
    bald = pixel_entropy(mc.mean(axis=0, dtype=work_dtype(mc.dtype)), ax - 1)
    expected = np.zeros_like(bald)
    for sample in mc:
        expected += pixel_entropy(sample, ax - 1)
    expected /= mc.shape[0]
    bald -= expected
    np.maximum(bald, 0, out=bald)
    return bald


PIXEL_MAPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "entropy": pixel_entropy,
    "least_confidence": pixel_least_confidence,
    "margin": pixel_margin,
    "bald": pixel_bald,
}


def check_reduction(reduction: str, region_size: int, region_quantile: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if isinstance(region_size, bool) or not isinstance(region_size, (int, np.integer)):
        raise ValueError(f"region_size must be a positive integer, got {region_size!r}")
    if region_size < 1:
        raise ValueError(f"region_size must be a positive integer, got {region_size}")
    if not 0.0 <= float(region_quantile) <= 1.0:
        raise ValueError(f"region_quantile must be in [0, 1], got {region_quantile}")


def _pool_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Means over windows of ``size`` along ``axis``, tiling it completely.

    Windows are non-overlapping except the last, which is shifted back to end at the
    border, so every pixel is covered and every window has the full size (a 1-pixel
    edge window would otherwise be as noisy as a single pixel).
    """
    length = x.shape[axis]
    w = min(size, length)
    n_full = length // w
    head = (slice(None),) * axis
    body = x[head + (slice(0, n_full * w),)]
    pooled = body.reshape(x.shape[:axis] + (n_full, w) + x.shape[axis + 1 :])
    pooled = pooled.mean(axis=axis + 1, dtype=np.float64)
    if length % w:
        tail = x[head + (slice(length - w, length),)].mean(axis=axis, keepdims=True, dtype=np.float64)
        pooled = np.concatenate([pooled, tail], axis=axis)
    return pooled


def reduce_pixels(
    maps: np.ndarray,
    reduction: str = "sum",
    *,
    region_size: int = 16,
    region_quantile: float = 1.0,
) -> np.ndarray:
    """Reduce per-pixel maps ``(N, ...)`` to one float64 score per sample.

    - ``"sum"``: the papers' criterion; grows with image size and with the amount of
      uncertain structure (many mitochondria boundaries), so it favours crowded tiles.
    - ``"mean"``: size-independent, but a small very uncertain region is diluted by a
      large confident background.
    - ``"region"``: average-pool the map in ``region_size`` windows (along every
      non-sample axis; the last window is shifted to end at the border) and take the
      ``region_quantile`` of the window means (1.0 = the most uncertain window). This
      ranks a tile by its most uncertain neighbourhood: neither the amount of
      foreground nor the tile size inflates it, and a compact uncertain object is not
      averaged away.
    """
    m = np.asarray(maps)
    if m.ndim < 2:
        raise ValueError(f"maps must be (N, ...) with at least one pixel axis, got {m.shape}")
    check_reduction(reduction, region_size, region_quantile)
    if 0 in m.shape[1:]:
        raise ValueError(f"maps have no pixels: shape {m.shape}")
    axes = tuple(range(1, m.ndim))
    if reduction == "sum":
        return m.sum(axis=axes, dtype=np.float64)
    if reduction == "mean":
        return m.mean(axis=axes, dtype=np.float64)
    pooled = m
    for ax in axes:
        pooled = _pool_axis(pooled, ax, int(region_size))
    regions = pooled.reshape(m.shape[0], -1)
    if float(region_quantile) == 1.0:
        return regions.max(axis=1)
    return np.quantile(regions, float(region_quantile), axis=1)


def _check_strategy(strategy: str) -> None:
    if strategy not in PIXEL_MAPS:
        raise ValueError(
            f"strategy {strategy!r} has no per-sample score; scored strategies: {', '.join(SCORE_STRATEGIES)}"
        )


def image_score(
    strategy: str, probs_one: np.ndarray | None = None, *, mc_one: np.ndarray | None = None, **reduction: Any
) -> float:
    """Score a single image so model code can reduce as it predicts (streaming).

    ``probs_one`` is ``(C, H, W)``; ``mc_one`` is ``(T, C, H, W)`` and is required for
    ``"bald"`` (for the other strategies its mean over T is used when ``probs_one`` is
    absent); ``reduction`` is :func:`reduce_pixels`' options. Equals
    ``score(strategy, probs=probs_one[None], ...)[0]``.
    """
    _check_strategy(strategy)
    if strategy == "bald":
        if mc_one is None:
            raise ValueError("bald needs mc_one, the (T, C, H, W) Monte-Carlo samples")
        pmap = pixel_bald(as_array(mc_one, "mc_one", 4))
    elif probs_one is not None:
        pmap = PIXEL_MAPS[strategy](as_array(probs_one, "probs_one", 3))
    elif mc_one is not None:
        mc = as_array(mc_one, "mc_one", 4)
        pmap = PIXEL_MAPS[strategy](mc.mean(axis=0, dtype=work_dtype(mc.dtype)))
    else:
        raise ValueError(f"{strategy} needs probs_one (C, H, W) or mc_one (T, C, H, W)")
    return float(reduce_pixels(pmap[None], **reduction)[0])


def uncertainty_scores(
    strategy: str,
    *,
    probs: np.ndarray | None = None,
    mc_probs: np.ndarray | None = None,
    reduction: str = "sum",
    region_size: int = 16,
    region_quantile: float = 1.0,
) -> np.ndarray:
    """Per-image scores ``(N,)`` for a pool, computed in chunks of images.

    ``probs`` is ``(N, C, H, W)``, ``mc_probs`` is ``(T, N, C, H, W)``. BALD needs
    ``mc_probs``; the other strategies use ``probs`` when given, else the MC mean.
    Inputs may be memory-mapped: only one chunk is ever converted at a time.
    """
    _check_strategy(strategy)
    check_reduction(reduction, region_size, region_quantile)
    opts = {"region_size": region_size, "region_quantile": region_quantile}
    pixel_map = PIXEL_MAPS[strategy]
    if strategy == "bald" or probs is None:
        if mc_probs is None:
            need = "mc_probs (T, N, C, H, W)" if strategy == "bald" else "probs or mc_probs"
            raise ValueError(f"{strategy} needs {need}")
        mc = as_array(mc_probs, "mc_probs", 5)
        n = mc.shape[1]
        item = mc.shape[0] * int(np.prod(mc.shape[2:]))
        out = np.empty(n, dtype=np.float64)
        for sl in chunks(n, item):
            if strategy == "bald":
                maps = pixel_bald(mc[:, sl])
            else:
                maps = pixel_map(mc[:, sl].mean(axis=0, dtype=work_dtype(mc.dtype)))
            out[sl] = reduce_pixels(maps, reduction, **opts)
        return out
    p = as_array(probs, "probs", 4)
    out = np.empty(p.shape[0], dtype=np.float64)
    for sl in chunks(p.shape[0], int(np.prod(p.shape[1:]))):
        out[sl] = reduce_pixels(pixel_map(p[sl]), reduction, **opts)
    return out


def check_uncertainty(name: str) -> str:
    """`name` if it is a per-image uncertainty (what ceal and hybrid rank by), else a ValueError."""
    if name not in SCORE_STRATEGIES:
        raise ValueError(f"uncertainty must be one of {', '.join(SCORE_STRATEGIES)}, got {name!r}")
    return name


def given_or_computed_scores(
    scores: np.ndarray | None, n: int, uncertainty: str, **inputs: Any
) -> np.ndarray:
    """Precomputed per-image `scores` (N,), checked against the pool size `n`, or else the
    `uncertainty` of the :func:`uncertainty_scores` `inputs` (probs/mc_probs, reduction options)."""
    if scores is None:
        return uncertainty_scores(check_uncertainty(uncertainty), **inputs)
    scores = as_array(scores, "scores", 1)
    if scores.shape[0] != n:
        raise ValueError(f"scores has {scores.shape[0]} entries for a pool of {n}")
    return scores
