"""Volume patches ↔ Label Studio task data: which patches to push, what a task records, PNG rendering.

A task made from a patch carries, besides the image reference (the label config's ``$field``):

- the patch provenance, ``Patch.to_dict()``: volume_id, axis, slice_index, y, x, height, width;
- ``volume_shape`` [Z, Y, X], so annotations can be exported without reopening the volume;
- the intensity window the PNG was rendered with (``intensity_lo``/``intensity_hi`` and how it was
  estimated), so every patch of a volume is displayed, and segmented, with the same contrast;
- ``patch_key``: a short hash of the provenance (also the PNG's file name).

The provenance is the identity of a patch: a project never needs two tasks with the same one, which
is what makes pushing idempotent.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np
from PIL import Image

from .tiling import Patch, grid_count, grid_starts, plane_shape, read_patch, to_uint8
from .tiling.grid import axis_index

PROVENANCE_FIELDS = tuple(Patch.__dataclass_fields__)
EXTRA_FIELDS = ("volume_shape", "patch_key")
INTENSITY_FIELDS = ("intensity_lo", "intensity_hi")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, Integral) else tuple(value)
    return int(pair[0]), int(pair[1])


def parse_subset(spec: str | None) -> tuple[str, int] | None:
    """``random:N`` or ``strided:N`` -> (mode, N); None for everything."""
    if not spec:
        return None
    mode, _, count = spec.partition(":")
    if mode not in ("random", "strided") or not count.isdigit() or int(count) < 1:
        raise ValueError(f"subset must be random:N or strided:N with N >= 1, got {spec!r}")
    return mode, int(count)


def subset_indices(total: int, subset: tuple[str, int] | None, seed: int = 0) -> np.ndarray:
    """Which of ``total`` grid positions to take: all, N at random (seeded), or N evenly spaced."""
    if subset is None or subset[1] >= total:
        return np.arange(total)
    mode, n = subset
    if mode == "random":
        return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    return (np.arange(n, dtype=np.int64) * total) // n


def select_patches(
    shape_zyx: Sequence[int],
    axis: str,
    patch_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    slice_step: int = 1,
    slices: Sequence[int] | None = None,
    *,
    volume_id: str,
    subset: tuple[str, int] | None = None,
    seed: int = 0,
) -> list[Patch]:
    """``patch_grid``'s patches (same order and border rule), or a subset, without listing the grid.

    The subset is drawn from the whole grid, so the same arguments always give the same patches.
    """
    total = grid_count(shape_zyx, axis, patch_size, stride=stride, slice_step=slice_step, slices=slices)
    size = _pair(patch_size)
    step = size if stride is None else _pair(stride)
    rows, cols = plane_shape(shape_zyx, axis)
    ys, xs = grid_starts(rows, size[0], step[0]), grid_starts(cols, size[1], step[1])
    chosen = (
        list(slices) if slices is not None else list(range(0, int(shape_zyx[axis_index(axis)]), slice_step))
    )
    per_slice = len(ys) * len(xs)
    patches = []
    for i in subset_indices(total, subset, seed):
        s, rest = divmod(int(i), per_slice)
        r, c = divmod(rest, len(xs))
        patches.append(Patch(volume_id, axis, int(chosen[s]), ys[r], xs[c], size[0], size[1]))  # type: ignore[arg-type]
    return patches


def patch_key(patch: Patch) -> str:
    """Stable short id of a patch's provenance; safe as a file name."""
    text = "\x1f".join(str(v) for v in patch.to_dict().values())
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def render_png(volume: Any, patch: Patch, window: Sequence[float]) -> bytes:
    """The patch as an 8-bit greyscale PNG, intensities mapped with ``window`` (lo, hi)."""
    pixels = to_uint8(read_patch(volume, patch), float(window[0]), float(window[1]))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def task_data(
    patch: Patch,
    image_ref: str,
    value_key: str,
    shape_zyx: Sequence[int],
    intensity: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``data`` of a task for ``patch`` (see module doc)."""
    clash = {value_key} & (set(PROVENANCE_FIELDS) | set(EXTRA_FIELDS) | set(intensity))
    if clash:
        raise ValueError(f"the label config's image field ${value_key} clashes with a patch field; rename it")
    return {
        value_key: image_ref,
        **patch.to_dict(),
        "volume_shape": [int(n) for n in shape_zyx],
        **intensity,
        "patch_key": patch_key(patch),
    }


def patch_from_task(data: Mapping[str, Any] | None) -> Patch | None:
    """The patch a task was made from, or None for tasks that are not volume patches."""
    if not data or any(f not in data for f in PROVENANCE_FIELDS):
        return None
    try:
        return Patch.from_dict(data)
    except (ValueError, TypeError):
        return None


def intensity_of(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The intensity fields a task was rendered with, if it records them."""
    if any(k not in data for k in INTENSITY_FIELDS):
        return None
    return {k: v for k, v in data.items() if k.startswith("intensity_")}


def existing_patches(tasks: Iterable[Mapping[str, Any]]) -> tuple[set[Patch], dict[str, dict[str, Any]]]:
    """Patches already in a project, and the intensity fields recorded per volume id."""
    found: set[Patch] = set()
    windows: dict[str, dict[str, Any]] = {}
    for data in tasks:
        patch = patch_from_task(data)
        if patch is None:
            continue
        found.add(patch)
        window = intensity_of(data)
        if window is not None:
            windows.setdefault(patch.volume_id, window)
    return found, windows
