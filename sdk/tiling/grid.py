"""Cut a volume into 2-D slice patches, with provenance to put them back.

Border rule: along each in-plane axis, patches start at 0, stride, 2*stride, ...; if
the last one stops short of the border, one more patch is added that *ends exactly at
the border* (start = length - size). Every pixel of each slice is covered, every patch
is full-size, and nothing is padded; the price is that the last row/column overlaps its
neighbour more than ``stride`` implies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any, Literal

import numpy as np

Axis = Literal["z", "y", "x"]
AXES: tuple[str, ...] = ("z", "y", "x")


def axis_index(axis: str) -> int:
    if axis not in AXES:
        raise ValueError(f"axis must be one of 'z', 'y', 'x', got {axis!r}")
    return AXES.index(axis)


def plane_shape(shape_zyx: Sequence[int], axis: str) -> tuple[int, int]:
    """(rows, cols) of a slice taken across ``axis``: (Y, X) for z, (Z, X) for y, (Z, Y) for x."""
    if len(shape_zyx) != 3:
        raise ValueError(f"expected a 3-D (Z, Y, X) shape, got {tuple(shape_zyx)}")
    a = axis_index(axis)
    rows, cols = (int(n) for i, n in enumerate(shape_zyx) if i != a)
    return rows, cols


@dataclass(frozen=True)
class Patch:
    """One 2-D patch: slice ``slice_index`` across ``axis`` of volume ``volume_id``.

    ``y``/``x`` are the row/column offsets *in the slice plane*, so for ``axis='y'`` the
    rows run along Z and for ``axis='x'`` rows run along Z and columns along Y.
    """

    volume_id: str
    axis: Axis
    slice_index: int
    y: int
    x: int
    height: int
    width: int

    def __post_init__(self) -> None:
        axis_index(self.axis)
        if min(self.slice_index, self.y, self.x) < 0 or min(self.height, self.width) < 1:
            raise ValueError(f"invalid patch geometry: {self}")

    def region(self) -> tuple[int | slice, int | slice, int | slice]:
        """Index into the (Z, Y, X) volume selecting this patch as a 2-D array."""
        rows = slice(self.y, self.y + self.height)
        cols = slice(self.x, self.x + self.width)
        if self.axis == "z":
            return self.slice_index, rows, cols
        if self.axis == "y":
            return rows, self.slice_index, cols
        return rows, cols, self.slice_index

    def fits(self, shape_zyx: Sequence[int]) -> bool:
        rows, cols = plane_shape(shape_zyx, self.axis)
        n = int(shape_zyx[axis_index(self.axis)])
        return self.slice_index < n and self.y + self.height <= rows and self.x + self.width <= cols

    def to_dict(self, prefix: str = "") -> dict[str, Any]:
        """Flat JSON-friendly dict for task data; ``prefix`` avoids clashes with other keys."""
        return {prefix + k: v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], prefix: str = "") -> Patch:
        """Inverse of ``to_dict``; extra keys (other task data) are ignored."""
        missing = [prefix + f for f in cls.__dataclass_fields__ if prefix + f not in data]
        if missing:
            raise ValueError(f"patch data lacks {', '.join(missing)}: {dict(data)!r}")
        ints = ("slice_index", "y", "x", "height", "width")
        return cls(
            volume_id=str(data[prefix + "volume_id"]),
            axis=data[prefix + "axis"],
            **{k: int(data[prefix + k]) for k in ints},
        )


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, Integral) else tuple(value)
    if len(pair) != 2 or not all(
        isinstance(v, Integral) and not isinstance(v, bool) and v >= 1 for v in pair
    ):
        raise ValueError(f"{name} must be a positive int or (h, w) pair, got {value!r}")
    return int(pair[0]), int(pair[1])


def grid_starts(length: int, size: int, stride: int) -> list[int]:
    """Patch offsets along one axis under the border rule (see module doc)."""
    if size > length:
        raise ValueError(f"patch size {size} is larger than the slice plane ({length})")
    if stride > size:
        raise ValueError(f"stride {stride} > patch size {size} would leave gaps")
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def _axis_count(length: int, size: int, stride: int) -> int:
    return -(-(length - size) // stride) + 1  # ceil((length - size) / stride) + 1


def _shape_of(shape_or_volume: Any) -> tuple[int, ...]:
    """Accept a volume (anything with ``.shape``) wherever a (Z, Y, X) shape is expected."""
    return tuple(getattr(shape_or_volume, "shape", shape_or_volume))


def _grid_params(
    shape_zyx: Any,
    axis: str,
    patch_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    slice_step: int = 1,
    slices: Sequence[int] | None = None,
) -> tuple[list[int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    shape_zyx = _shape_of(shape_zyx)
    rows, cols = plane_shape(shape_zyx, axis)
    n = int(shape_zyx[axis_index(axis)])
    size = _pair(patch_size, "patch_size")
    step = size if stride is None else _pair(stride, "stride")
    if size[0] > rows or size[1] > cols:
        raise ValueError(f"patch size {size} is larger than the {axis}-slice plane {(rows, cols)}")
    for s, st in zip(size, step, strict=True):
        if st > s:
            raise ValueError(f"stride {step} > patch size {size} would leave gaps")
    if isinstance(slice_step, bool) or not isinstance(slice_step, Integral) or slice_step < 1:
        raise ValueError(f"slice_step must be a positive int, got {slice_step!r}")
    if slices is None:
        chosen = list(range(0, n, slice_step))
    else:
        if slice_step != 1:
            raise ValueError("give either slices or slice_step, not both")
        chosen = [int(s) for s in slices]
        bad = [s for s in chosen if not 0 <= s < n]
        if bad:
            raise ValueError(f"slices {bad} are outside 0..{n - 1} along axis {axis!r}")
    return chosen, (rows, cols), size, step


def grid_count(
    shape_zyx: Sequence[int] | Any, axis: str, patch_size: int | Sequence[int], **options: Any
) -> int:
    """Number of patches ``patch_grid`` yields for the same arguments (`options`: stride,
    slice_step, slices), by arithmetic alone."""
    chosen, (rows, cols), size, step = _grid_params(shape_zyx, axis, patch_size, **options)
    return len(chosen) * _axis_count(rows, size[0], step[0]) * _axis_count(cols, size[1], step[1])


def patch_grid(
    shape_zyx: Sequence[int] | Any,
    axis: str,
    patch_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    slice_step: int = 1,
    slices: Sequence[int] | None = None,
    *,
    volume_id: str | None = None,
) -> list[Patch]:
    """Patches covering every pixel of the chosen slices (slice, then row, then column order).

    ``shape_zyx`` may be a Volume, whose ``id`` then becomes the default ``volume_id``.
    ``stride`` defaults to the patch size (no overlap, except at the border, see module
    doc). ``slices`` picks slice indices explicitly; otherwise every ``slice_step``-th.
    """
    if volume_id is None:
        volume_id = str(getattr(shape_zyx, "id", ""))
    chosen, (rows, cols), size, step = _grid_params(shape_zyx, axis, patch_size, stride, slice_step, slices)
    ys = grid_starts(rows, size[0], step[0])
    xs = grid_starts(cols, size[1], step[1])
    return [
        Patch(volume_id, axis, s, y, x, size[0], size[1])  # type: ignore[arg-type]
        for s in chosen
        for y in ys
        for x in xs
    ]


def read_patch(volume: Any, patch: Patch) -> np.ndarray:
    """The patch's pixels as a 2-D array (``volume``: a Volume or any 3-D array)."""
    if not patch.fits(volume.shape):
        raise ValueError(f"{patch} does not fit in a volume of shape {tuple(volume.shape)}")
    return np.asarray(volume[patch.region()])
