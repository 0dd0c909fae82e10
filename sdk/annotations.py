"""Brush annotations → label maps, decoded once per annotation version.

Training re-reads every annotated task on each run; the cache keys decoded
maps by (annotation id, updated_at), so only new or edited annotations are
decoded again.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from sdk.brush import rle_to_mask
from sdk.label_config import UNLABELLED, BrushTarget
from sdk.lru import LRU


class AnnotationError(ValueError):
    """An annotation cannot be turned into a label map; the message says why."""


def choose_annotation(task: dict) -> dict | None:
    """The annotation to learn from: ground truth first, else the most recently updated.

    Cancelled (skipped) annotations carry no labels and are never chosen.
    """
    usable = [
        a
        for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled") and isinstance(a.get("result"), list)
    ]
    if not usable:
        return None
    return max(
        usable, key=lambda a: (bool(a.get("ground_truth")), _timestamp(a.get("updated_at")), a.get("id", 0))
    )


def _timestamp(value: object) -> float:
    """Label Studio's ISO times (with or without fractions and offsets) as seconds; 0 if unknown."""
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def label_map(annotation: dict, target: BrushTarget, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 label map: 0 background, i + 1 for `target.labels[i]`; later regions win.

    Pixels nobody painted are background, or UNLABELLED in scribble mode (`target.scribbles`),
    where background is painted with its own label. An annotation without brush regions is a
    valid label: "nothing here" (in scribble mode: "nothing known").
    """
    height, width = shape
    labels = np.full(shape, UNLABELLED if target.scribbles else 0, np.uint8)
    class_of = {name: i + 1 for i, name in enumerate(target.labels)} | {target.background: 0}
    for region in annotation.get("result") or []:
        if region.get("type") != "brushlabels" or region.get("from_name") != target.from_name:
            continue
        value = region.get("value") or {}
        names = value.get("brushlabels") or []
        if not names or names[0] not in class_of:
            known = [*target.labels, *([target.background] if target.scribbles else [])]
            raise AnnotationError(f"brush region has label {names!r}, not one of {known}")
        rh, rw = region.get("original_height", height), region.get("original_width", width)
        if (rh, rw) != (height, width):
            raise AnnotationError(f"brush region is {rw}x{rh} but the image is {width}x{height}")
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise AnnotationError("brush region is not RLE encoded")
        mask = rle_to_mask(value["rle"], height, width)
        labels[mask > 0] = class_of[names[0]]
    return labels


class MaskCache:
    """LRU of decoded label maps, bounded in bytes; thread-safe."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self._items: LRU[tuple, np.ndarray] = LRU(max_bytes, size=lambda labels: labels.nbytes)
        self.decoded = 0  # how many annotations were actually decoded (for tests and logs)

    def get(self, annotation: dict, target: BrushTarget, shape: tuple[int, int]) -> np.ndarray:
        key = (annotation.get("id"), str(annotation.get("updated_at")), target.signature, shape)
        cached = self._items.get(key)
        if cached is not None:
            return cached
        labels = label_map(annotation, target, shape)
        self.decoded += 1
        self._items.put(key, labels)
        return labels
