"""A labelled volume for the active-learning simulation: raw + labels, split halfway along y.

The papers' protocol (Roels & Saeys) queries 2-D patches of the top half and tests on the
bottom half. Any pair of volumes ``sdk.tiling.open_volume`` opens works, whatever their
dtype, size or label values: the labels are mapped to class ids (``sdk.tiling.classes``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .tiling import Classes, default_classes, format_classes, map_classes, open_volume


@dataclass
class Data:
    """The split volume: query half (Z, H/2, W) and the test half as whole images."""

    train_raw: np.ndarray
    train_mask: np.ndarray  # uint8 class ids: 0 background, i the i-th class
    test_images: list[np.ndarray]
    test_masks: list[np.ndarray]
    classes: list[str]  # names of classes 1..N
    source: dict[str, str]  # raw and labels volume ids and the class spec, for a results folder


def load_labelled_volume(
    raw: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    classes: Classes | None = None,
    *,
    sections: int = 0,
    crop: int = 0,
    patch: int = 1,
) -> Data:
    """Read the first `sections` sections (0: all), their top-left `crop` x `crop` (0: whole), split.

    Only that region is read. `classes` maps label values to classes; None makes every
    non-zero value of the region a class (``default_classes``). `patch` is the smallest
    query half allowed.
    """
    if min(sections, crop) < 0:
        raise ValueError(f"sections ({sections}) and crop ({crop}) must be >= 0")
    region = (slice(0, sections or None), slice(0, crop or None), slice(0, crop or None))
    with open_volume(raw) as raw_volume, open_volume(labels) as label_volume:
        if raw_volume.shape != label_volume.shape:
            raise ValueError(
                f"raw {raw_volume.id} {raw_volume.shape} and labels {label_volume.id} "
                f"{label_volume.shape} differ in shape"
            )
        image, values = raw_volume[region], label_volume[region]
        source = {"raw": raw_volume.id, "labels": label_volume.id}
    classes = default_classes(values) if classes is None else classes
    mask = map_classes(values, classes)
    source["classes"] = format_classes(classes)
    if not mask.any():
        raise ValueError(f"no voxel of {source['labels']} read falls in a class ({source['classes']})")
    half = image.shape[1] // 2
    if half < patch or image.shape[2] < patch:
        raise ValueError(f"the query half {half}x{image.shape[2]} is smaller than a {patch} patch")
    return Data(
        train_raw=image[:, :half],
        train_mask=mask[:, :half],
        test_images=list(image[:, half:]),
        test_masks=list(mask[:, half:]),
        classes=[name for name, _ in classes],
        source=source,
    )
