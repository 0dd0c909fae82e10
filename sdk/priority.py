"""Pure helpers for writing an active-learning order into Label Studio.

The order travels as one prediction per ranked task under a dedicated model version
(Label Studio's "Uncertainty sampling" serves the lowest prediction ``score`` of
``project.model_version`` first), plus a ``priority`` field in the task data for the
Data Manager. This module holds the rules (names, scores, which strategy to use
before training, what task data to write) and renders uncertainty heat maps;
network calls live in ``sdk.queue_order``.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

import numpy as np
from PIL import Image

from sdk.strategies import SCORE_STRATEGIES, check_cold_start, get_strategy

PRIORITY_FIELD = "priority"  # task data: 1 = label first
HEATMAP_FIELD = "uncertainty"  # task data: data URI of the heat map
PRIORITY_VIEW = "Priority"  # Data Manager tab ordered by PRIORITY_FIELD
UNCERTAINTY_SAMPLING = "Uncertainty sampling"
HEATMAP_MAX_SIZE = 512

_VERSION_RE = re.compile(r"\+(?P<strategy>[a-z_]+)@(?P<stamp>\d{8}-\d{6})(?:\.\d+)?$")


# -- naming and scores -------------------------------------------------------------------
def priority_version(checkpoint: str, strategy: str, when: datetime | None = None) -> str:
    """``<checkpoint>+<strategy>@<UTC time>``: which model and strategy made the order, and when.

    A new name per run lets the new order be written completely before the project
    switches to it; the old one is deleted afterwards.
    """
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return f"{checkpoint}+{strategy}@{stamp}"


def is_priority_version(name: str | None) -> bool:
    return bool(name) and _VERSION_RE.search(name) is not None


def unique_version(name: str, existing: Sequence[str]) -> str:
    """``name``, or ``name.2``, ``name.3`` ... when a run in the same second already used it."""
    taken = set(existing)
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}.{n}"
    return candidate


def rank_scores(n: int) -> list[float]:
    """Prediction scores for ranks 1..n: ascending, inside (0, 1).

    Ascending score is the serving order; staying in (0, 1) keeps the "Prediction
    score" column readable as "low = label first", like the backend's confidence.
    """
    return [(r + 1) / (n + 1) for r in range(n)]


def serving_order(clusters: Sequence[int], k: int) -> list[int]:
    """The first ``k`` positions of a ranking (0 = rank 1) in the order Label Studio serves them
    to one annotator when each ranked task carries ``clusters[position]``.

    Label Studio 1.23 (``projects/functions/next_task.py``, uncertainty sampling) orders tasks
    by how many tasks of their cluster the annotator has solved, then by prediction score:
    each pick is the best-ranked task among the clusters with the fewest picks so far. After
    a new order is written the count starts again from zero (solved tasks keep no prediction
    of the new version), so this is the batch served between two training runs.
    """
    if not 0 <= k <= len(clusters):
        raise ValueError(f"k must be within 0..{len(clusters)}, got {k}")
    queues: dict[int, list[int]] = {}
    for position, cluster in enumerate(clusters):
        queues.setdefault(int(cluster), []).append(position)
    heads = {cluster: 0 for cluster in queues}
    picks: list[int] = []
    while len(picks) < k:
        cluster = min(
            (c for c in queues if heads[c] < len(queues[c])), key=lambda c: (heads[c], queues[c][heads[c]])
        )
        picks.append(queues[cluster][heads[cluster]])
        heads[cluster] += 1
    return picks


# -- cold start --------------------------------------------------------------------------------
def choose_strategy(
    requested: str, version: str, trained: bool, cold_start: str = "kmeans"
) -> tuple[str, str]:
    """The strategy to use and a one-line note saying why.

    An untrained network's probabilities are noise, so ranking by them would pick a
    random-but-biased batch; before the first training round only the strategies of
    :data:`COLD_START_STRATEGIES` (diversity over embeddings, or random) make sense.
    """
    spec = get_strategy(requested)
    check_cold_start(cold_start)
    if trained:
        return requested, f"strategy {requested!r} with model {version}"
    if spec.cold_start:
        return requested, (
            f"cold start: model {version} is untrained; {requested!r} needs no trained model"
            " (embeddings of the untrained network)"
        )
    return cold_start, (
        f"cold start: model {version} is untrained, so {requested!r} would rank by noise;"
        f" using {cold_start!r} over embeddings of the untrained network instead"
    )


# -- task data ----------------------------------------------------------------------------------
def updated_task_data(
    data: Mapping,
    *,
    rank: int | None,
    heatmap: str | None = None,
    manage_heatmaps: bool = False,
    labeled: bool = False,
    heatmap_required: bool = False,
) -> dict | None:
    """The task's new data, or None when nothing changes.

    ``priority`` is set on ranked tasks and removed everywhere else, so no stale rank
    survives a re-run. With ``manage_heatmaps`` an unlabeled task gets its heat map,
    or the placeholder when it is not ranked (a heat map of an older model would
    mislead); labeled tasks keep theirs as a record. Label Studio rejects task data
    without a field the label config shows (``heatmap_required``), hence the placeholder.
    """
    new = dict(data)
    if rank is None:
        new.pop(PRIORITY_FIELD, None)
    else:
        new[PRIORITY_FIELD] = int(rank)
    if heatmap is not None:
        new[HEATMAP_FIELD] = heatmap
    elif manage_heatmaps and not labeled:
        new[HEATMAP_FIELD] = PLACEHOLDER_URI
    if heatmap_required and HEATMAP_FIELD not in new:
        new[HEATMAP_FIELD] = PLACEHOLDER_URI
    return None if new == dict(data) else new


# -- heat maps ------------------------------------------------------------------------------------
# Matplotlib's "inferno" at 9 stops: perceptually uniform, dark = certain, bright = uncertain.
_INFERNO = np.array(
    [
        (0, 0, 4),
        (31, 12, 72),
        (85, 15, 109),
        (136, 34, 106),
        (186, 54, 85),
        (227, 89, 51),
        (249, 140, 10),
        (249, 201, 50),
        (252, 255, 164),
    ],
    dtype=np.float64,
)
PALETTE = (
    np.stack(
        [
            np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_INFERNO)), _INFERNO[:, c])
            for c in range(3)
        ],
        axis=1,
    )
    .round()
    .astype(np.uint8)
)


def heatmap_vmax(kind: str, n_classes: int, maps: Sequence[np.ndarray] = ()) -> float:
    """Value shown as the brightest colour: the measure's maximum, so tasks compare.

    Entropy peaks at log C, least confidence at 1 - 1/C, margin at 1. BALD has no
    useful fixed ceiling (log C is far above typical values), so the batch's maximum.
    """
    if kind == "entropy":
        return math.log(n_classes)
    if kind == "least_confidence":
        return 1.0 - 1.0 / n_classes
    if kind == "margin":
        return 1.0
    if kind == "bald":
        peak = max((float(np.max(m)) for m in maps if m.size), default=0.0)
        return peak if peak > 0 else 1.0
    raise ValueError(f"no heat map for {kind!r}; measures: {', '.join(SCORE_STRATEGIES)}")


def downsample(values: np.ndarray, max_size: int = HEATMAP_MAX_SIZE) -> np.ndarray:
    """Area-average a 2-D map so its longer side is at most ``max_size`` pixels."""
    values = np.asarray(values, dtype=np.float32)
    height, width = values.shape
    scale = max_size / max(height, width)
    if scale >= 1:
        return values
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(values, mode="F").resize(size, Image.Resampling.BOX))


def heatmap_png(values: np.ndarray, vmax: float, max_size: int = HEATMAP_MAX_SIZE) -> bytes:
    """Colour-mapped PNG (palette mode: one byte per pixel before compression)."""
    small = downsample(values, max_size)
    index = np.clip(np.nan_to_num(small / max(vmax, 1e-12)), 0.0, 1.0)
    image = Image.fromarray((index * 255).round().astype(np.uint8), mode="P")
    image.putpalette(PALETTE.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """Inline image: served by Label Studio from the task itself, whichever machine made it."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def heatmap_uri(values: np.ndarray, vmax: float, max_size: int = HEATMAP_MAX_SIZE) -> str:
    return data_uri(heatmap_png(values, vmax, max_size))


def _placeholder() -> str:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    return data_uri(buffer.getvalue())


#: Neutral grey for tasks without a current heat map (not a colour of the map's scale).
PLACEHOLDER_URI = _placeholder()
