"""Put 2-D label patches back into a 3-D label volume.

Overlap rules (both deterministic):

- ``"last"`` (default): patches are painted in order and a later one overwrites an
  earlier one where they overlap. The order is the iteration order of ``items``, or,
  with ``order_key``, ascending key (stable, so ties keep iteration order). Pass e.g.
  the annotation's update time as the key so the most recent annotation wins.
- ``"max"``: each pixel takes the largest label of the patches covering it;
  independent of order.

Pixels no patch covers get ``unknown_value`` and are False in the returned coverage. With
``partial=True`` a patch may itself hold ``unknown_value`` (pixels nobody painted, in scribble
mode): those say nothing, so they never cover another patch's label.
The output is assembled one slice plane at a time and written into ``out`` plane by
plane, so ``out`` (and ``coverage_out``) may be an ``np.memmap``, Zarr or HDF5 array
bigger than memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from .grid import Patch, axis_index, plane_shape

Rule = Literal["last", "max"]


class Stitched(NamedTuple):
    labels: Any  # the ``out`` array (np.ndarray unless the caller passed another)
    coverage: Any  # bool, True where at least one patch was placed


def _plane_index(axis: int, i: int) -> tuple[int | slice, ...]:
    return tuple(i if a == axis else slice(None) for a in range(3))


def _check_values(mask: np.ndarray, dtype: np.dtype, unknown: Any, patch: Patch, partial: bool) -> None:
    if dtype.kind in "iu" and mask.size and mask.dtype.kind in "iuf":
        info = np.iinfo(dtype)
        lo, hi = mask.min(), mask.max()
        if lo < info.min or hi > info.max:
            raise ValueError(f"labels of {patch} span [{lo}, {hi}], which {dtype} cannot hold")
    if not partial and np.any(mask == unknown):
        raise ValueError(
            f"labels of {patch} contain unknown_value {unknown!r}; binarise the mask or "
            "choose another unknown_value"
        )


def stitch_patches(
    shape_zyx: Sequence[int],
    axis: str,
    items: Iterable[Sequence[Any]],
    unknown_value: int | float = 255,
    rule: Rule = "last",
    *,
    order_key: Callable[[Sequence[Any]], Any] | None = None,
    dtype: np.dtype | type = np.uint8,
    out: Any = None,
    coverage_out: Any = None,
    partial: bool = False,
) -> Stitched:
    """Assemble ``items`` — ``(patch, mask2d, ...)`` sequences — into a (Z, Y, X) volume.

    Extra item elements (e.g. a timestamp) are ignored except by ``order_key``, which
    receives the whole item. See the module doc for the overlap rule and unknown pixels.
    ``dtype`` is ignored when ``out`` is given.
    """
    shape = tuple(int(n) for n in shape_zyx)
    rows, cols = plane_shape(shape, axis)
    a = axis_index(axis)
    if rule not in ("last", "max"):
        raise ValueError(f"rule must be 'last' or 'max', got {rule!r}")
    if out is None:
        out = np.empty(shape, dtype=dtype)
    if coverage_out is None:
        coverage_out = np.empty(shape, dtype=bool)
    for name, arr in (("out", out), ("coverage_out", coverage_out)):
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {shape}")
    out_dtype = np.dtype(out.dtype)
    if not np.can_cast(np.min_scalar_type(unknown_value), out_dtype):
        raise ValueError(f"unknown_value {unknown_value!r} does not fit dtype {out_dtype}")

    listed = list(items)
    if order_key is not None:
        listed.sort(key=order_key)  # stable: ties keep iteration order
    by_plane: dict[int, list[tuple[Patch, np.ndarray]]] = {}
    volume_ids: set[str] = set()
    for item in listed:
        patch, mask = item[0], np.asarray(item[1])
        if not isinstance(patch, Patch):
            raise ValueError(f"items must start with a Patch, got {type(patch).__name__}")
        if patch.axis != axis:
            raise ValueError(f"{patch} is cut across axis {patch.axis!r}, not {axis!r}")
        if not patch.fits(shape):
            raise ValueError(f"{patch} does not fit in a volume of shape {shape}")
        if mask.shape != (patch.height, patch.width):
            raise ValueError(
                f"mask of shape {mask.shape} does not match {patch} ({patch.height}x{patch.width})"
            )
        _check_values(mask, out_dtype, unknown_value, patch, partial)
        volume_ids.add(patch.volume_id)
        by_plane.setdefault(patch.slice_index, []).append((patch, mask))
    if len(volume_ids) > 1:
        raise ValueError(f"patches come from several volumes: {sorted(volume_ids)}")

    for i in range(shape[a]):
        where = _plane_index(a, i)
        placed = by_plane.get(i)
        if not placed:
            out[where] = unknown_value
            coverage_out[where] = False
            continue
        labels = np.zeros((rows, cols), dtype=out_dtype)
        covered = np.zeros((rows, cols), dtype=bool)
        known = np.zeros((rows, cols), dtype=bool)  # holds a patch's label (not unknown)
        for patch, mask in placed:
            box = (slice(patch.y, patch.y + patch.height), slice(patch.x, patch.x + patch.width))
            says = mask != unknown_value if partial else True  # which pixels this patch labels
            if rule == "max":
                mask = np.where(known[box], np.maximum(labels[box], mask), mask)
            np.copyto(labels[box], mask, where=says, casting="unsafe")
            known[box] |= says
            covered[box] = True
        labels[~known] = unknown_value
        out[where] = labels
        coverage_out[where] = covered
    return Stitched(out, coverage_out)
