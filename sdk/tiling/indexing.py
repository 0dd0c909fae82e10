"""Translate numpy-style keys into reads that every storage backend understands.

HDF5, Zarr and page-wise readers only take integers and forward slices. Any numpy
key is split into such a *storage key* (the bounding box of what is asked for) and a
*post key* applied in memory to the result, so all readers honour full numpy
semantics (negative steps, integer lists, boolean masks) while reading no more than
the bounding box.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np

Key = tuple[Any, ...]


def _index(i: Any, n: int, axis: int) -> int:
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n}")
    return i % n


def _is_int(x: Any) -> bool:
    if isinstance(x, bool | np.bool_):
        return False
    return isinstance(x, Integral) or (isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iu")


def _expand(key: Any, ndim: int) -> list[Any]:
    """Key as a list of one entry per axis (``None`` kept), Ellipsis expanded."""
    entries = list(key) if isinstance(key, tuple) else [key]
    if sum(e is Ellipsis for e in entries) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    used = sum(e is not None and e is not Ellipsis for e in entries)
    if used > ndim:
        raise IndexError(f"too many indices: volume is {ndim}-D but {used} were given")
    fill = [slice(None)] * (ndim - used)
    at = next((i for i, e in enumerate(entries) if e is Ellipsis), None)
    if at is None:
        return entries + fill
    return entries[:at] + fill + entries[at + 1 :]


def split_key(key: Any, shape: tuple[int, ...]) -> tuple[Key, Key | None]:
    """Return ``(storage_key, post_key)`` with ``a[key] == a[storage_key][post_key]``.

    ``storage_key`` holds only non-negative ints and slices with a positive step; it is
    the bounding box of the selection. ``post_key`` is ``None`` when nothing is left to
    do in memory.
    """
    entries = _expand(key, len(shape))
    fancy = any(e is not None and not _is_int(e) and not isinstance(e, slice) for e in entries)
    storage: list[Any] = []
    post: list[Any] = []
    trivial = True
    axis = 0
    for e in entries:
        if e is None:
            post.append(None)
            trivial = False
            continue
        n = shape[axis]
        if _is_int(e):
            i = _index(e, n, axis)
            if fancy:  # keep the axis so numpy places advanced-index axes as it would
                storage.append(slice(i, i + 1))
                post.append(0)
            else:
                storage.append(i)
        elif isinstance(e, slice):
            start, stop, step = e.indices(n)
            r = range(start, stop, step)
            if len(r) == 0:
                storage.append(slice(0, 0))
                post.append(slice(None))
            elif step > 0:
                storage.append(slice(r[0], r[-1] + 1, step))
                post.append(slice(None))
            else:
                storage.append(slice(r[-1], r[0] + 1, -step))
                post.append(slice(None, None, -1))
                trivial = False
        else:
            idx = np.asarray(e)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean index for axis {axis} must have shape ({n},), got {idx.shape}")
                idx = np.flatnonzero(idx)
            elif idx.dtype.kind not in "iu":
                raise IndexError(f"unsupported index for axis {axis}: {e!r}")
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"index out of bounds for axis {axis} with size {n}")
            idx = idx % n if idx.size else idx.astype(np.intp)
            lo = int(idx.min()) if idx.size else 0
            hi = int(idx.max()) + 1 if idx.size else 0
            storage.append(slice(lo, hi))
            post.append(idx - lo)
            trivial = False
        axis += 1
    return tuple(storage), (None if trivial else tuple(post))


def result_shape(storage_key: Key, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of ``a[storage_key]`` for an array of ``shape``, without allocating one."""
    return np.broadcast_to(np.empty((), dtype=np.uint8), shape)[storage_key].shape
