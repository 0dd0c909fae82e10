"""The lazy, read-only 3-D volume every reader returns.

A ``Volume`` never holds the voxels: indexing it reads just the requested region from
the backing store (a memory map, an HDF5/Zarr dataset, or individual 2-D pages) and
returns a fresh numpy array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..lru import LRU
from .indexing import Key, result_shape, split_key
from .voxel import VoxelSize


class Volume:
    """A (Z, Y, X) image on disk, sliced like a numpy array.

    ``id`` is a canonical spec (resolved path, plus ``:/key`` inside containers) that
    ``open_volume`` accepts again, so patch provenance can always be reopened.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        dtype: np.dtype | type,
        id: str,
        voxel_size: VoxelSize | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if len(shape) != 3:
            raise ValueError(f"a volume must be 3-D (Z, Y, X), got shape {tuple(shape)}")
        self.shape: tuple[int, int, int] = tuple(int(n) for n in shape)  # type: ignore[assignment]
        self.dtype = np.dtype(dtype)
        self.id = id
        self.voxel_size = voxel_size
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.closed = False

    ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __getitem__(self, key: Any) -> np.ndarray:
        if self.closed:
            raise ValueError(f"volume {self.id} is closed")
        storage_key, post_key = split_key(key, self.shape)
        data = self._read(storage_key)
        return data if post_key is None else data[post_key]

    def _read(self, key: Key) -> np.ndarray:
        """Read ``key`` (ints and positive-step slices only) from the backing store."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles; the volume cannot be read afterwards."""
        self.closed = True

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, shape={self.shape}, dtype={self.dtype})"


class ArrayVolume(Volume):
    """Volume over anything sliceable with a shape: ndarray/memmap, h5py or zarr arrays.

    ``prefix`` indexes leading singleton axes away (e.g. OME-Zarr's t and c).
    """

    def __init__(
        self,
        array: Any,
        id: str,
        *,
        prefix: tuple[int, ...] = (),
        voxel_size: VoxelSize | None = None,
        metadata: dict[str, Any] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        shape = tuple(array.shape)[len(prefix) :]
        super().__init__(shape, array.dtype, id, voxel_size, metadata)  # type: ignore[arg-type]
        self.array = array
        self._prefix = prefix
        self._on_close = on_close

    def _read(self, key: Key) -> np.ndarray:
        data = self.array[self._prefix + key]
        # ndarray/memmap backends return views: copy so callers get a writable array
        # independent of the file (h5py and zarr already return fresh arrays).
        if isinstance(self.array, np.ndarray) or not isinstance(data, np.ndarray):
            data = np.array(data)
        return data

    def close(self) -> None:
        super().close()
        self.array = None  # drop memory maps before their file is closed
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


class PagedVolume(Volume):
    """Volume made of 2-D pages read one at a time (slice folders, compressed TIFF).

    Decoded pages are kept in an LRU cache of at most ``cache_bytes`` (at least one
    page): a z-grid reads each page once per patch, and a y/x-grid needs every page
    for every patch.
    """

    def __init__(
        self,
        read_page: Callable[[int], np.ndarray],
        shape: tuple[int, int, int],
        dtype: np.dtype | type,
        id: str,
        *,
        voxel_size: VoxelSize | None = None,
        metadata: dict[str, Any] | None = None,
        on_close: Callable[[], None] | None = None,
        cache_bytes: int = 128 << 20,
    ) -> None:
        super().__init__(shape, dtype, id, voxel_size, metadata)
        self._read_page = read_page
        self._on_close = on_close
        page_bytes = max(1, shape[1] * shape[2] * self.dtype.itemsize)
        self._cache: LRU[int, np.ndarray] = LRU(max(1, cache_bytes // page_bytes) if cache_bytes > 0 else 0)
        self.pages_read = 0  # decoded pages so far; lets callers verify laziness

    def page(self, z: int) -> np.ndarray:
        """Decoded page ``z`` (read-only: it may be shared through the cache)."""
        cached = self._cache.get(z)
        if cached is not None:
            return cached
        data = np.asarray(self._read_page(z))
        if data.shape != self.shape[1:]:
            raise ValueError(f"page {z} of {self.id} has shape {data.shape}, expected {self.shape[1:]}")
        data = data.astype(self.dtype, copy=False)
        data.flags.writeable = False
        self.pages_read += 1
        self._cache.put(z, data)
        return data

    def _read(self, key: Key) -> np.ndarray:
        zkey, yx = key[0], key[1:]
        if isinstance(zkey, int):
            return np.array(self.page(zkey)[yx])
        zs = range(*zkey.indices(self.shape[0]))
        out = np.empty((len(zs), *result_shape(yx, self.shape[1:])), dtype=self.dtype)
        for i, z in enumerate(zs):
            out[i] = self.page(z)[yx]
        return out

    def close(self) -> None:
        super().close()
        self._cache.clear()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
