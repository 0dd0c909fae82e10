"""Connected components, size filter and per-object statistics of a label volume, block by block.

A segmented vEM volume does not fit in memory, so components are found one block of z-slices at a
time (``scipy.ndimage.label``, per class); pieces touching across a block boundary are merged with
a union-find over the two boundary slices, and a second pass labels each block again and writes the
final ids. Memory: one block, plus a few numbers per provisional component.

Rules:

- Voxels of different classes never join; class 0 (background) is never an object.
- Connectivity 6 (faces), 18 (faces and edges) or 26 (faces, edges and corners).
- Objects smaller than ``min_size`` voxels are removed (written as 0, left out of the statistics).
- Ids are 1..N, by ascending class and, within a class, in raster (z, y, x) order of the object's
  first voxel: for one class this is exactly the numbering ``scipy.ndimage.label`` gives the whole
  volume, so the result does not depend on the block size.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

ReadBlock = Callable[[int, int], np.ndarray]  # (z0, z1) -> (z1 - z0, Y, X) labels
WriteBlock = Callable[[int, int, np.ndarray], None]  # (z0, z1, object ids)

_RANK = {6: 1, 18: 2, 26: 3}


@dataclass(frozen=True)
class ObjectStats:
    """One object. ``bbox_min`` is inclusive, ``bbox_max`` exclusive; coordinates in voxels (z, y, x)."""

    label: int
    class_id: int
    voxels: int
    bbox_min: tuple[int, int, int]
    bbox_max: tuple[int, int, int]
    centroid: tuple[float, float, float]

    def volume_um3(self, voxel_size_nm: Sequence[float | None] | None) -> float | None:
        """Physical volume in µm³, or None when any voxel edge length is unknown."""
        if voxel_size_nm is None or any(v is None for v in voxel_size_nm):
            return None
        vz, vy, vx = (float(v) for v in voxel_size_nm)  # type: ignore[arg-type]
        return self.voxels * vz * vy * vx * 1e-9


@dataclass(frozen=True)
class Components:
    objects: list[ObjectStats]  # kept objects, object i has label i + 1
    removed: int  # components below min_size
    provisional: int  # per-block pieces before merging (memory scales with this)


class _Pieces:
    """Growing per-piece statistics and a union-find whose root is always the smallest id."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, np.int64)
        self.cls = np.zeros(0, np.int64)
        self.count = np.zeros(0, np.int64)
        self.sums = np.zeros((0, 3), np.float64)
        self.lo = np.zeros((0, 3), np.int64)
        self.hi = np.zeros((0, 3), np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def add(self, cls: int, count: np.ndarray, sums: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        start = len(self)
        self.parent = np.concatenate([self.parent, np.arange(start, start + len(count))])
        self.cls = np.concatenate([self.cls, np.full(len(count), cls)])
        self.count = np.concatenate([self.count, count])
        self.sums = np.concatenate([self.sums, sums])
        self.lo = np.concatenate([self.lo, lo])
        self.hi = np.concatenate([self.hi, hi])

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, int(self.parent[i])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        parent = self.parent.copy()
        while True:  # pointer jumping until every piece points at its root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                return parent
            parent = nxt


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in _RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return ndimage.generate_binary_structure(3, _RANK[connectivity])


def _label_block(
    labels: np.ndarray, classes: Sequence[int], structure: np.ndarray
) -> Iterable[tuple[int, np.ndarray, int]]:
    for c in classes:
        mask = labels == c
        if mask.any():
            lab, n = ndimage.label(mask, structure=structure)
            yield c, lab, n


def _piece_stats(lab: np.ndarray, n: int, z0: int) -> tuple[np.ndarray, ...]:
    """Voxel count, coordinate sums, bbox min and max (exclusive) of labels 1..n, one plane at a time."""
    count = np.zeros(n + 1, np.int64)
    sums = np.zeros((n + 1, 3), np.float64)
    rows, cols = lab.shape[1:]
    yy = np.broadcast_to(np.arange(rows, dtype=np.float64)[:, None], (rows, cols)).ravel()
    xx = np.broadcast_to(np.arange(cols, dtype=np.float64)[None, :], (rows, cols)).ravel()
    for dz, plane in enumerate(lab):
        flat = plane.ravel()
        per = np.bincount(flat, minlength=n + 1)
        count += per
        sums[:, 0] += per * float(z0 + dz)
        sums[:, 1] += np.bincount(flat, weights=yy, minlength=n + 1)
        sums[:, 2] += np.bincount(flat, weights=xx, minlength=n + 1)
    boxes = ndimage.find_objects(lab, max_label=n)
    lo = np.array([[s.start for s in box] for box in boxes], np.int64).reshape(n, 3)
    hi = np.array([[s.stop for s in box] for box in boxes], np.int64).reshape(n, 3)
    lo[:, 0] += z0
    hi[:, 0] += z0
    return count[1:], sums[1:], lo, hi


def _boundary_pairs(prev: np.ndarray, cur: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Unique (piece id in prev, piece id in cur) pairs that touch across the two slices (ids + 1)."""
    rows, cols = cur.shape
    pairs = []
    for dy, dx in np.argwhere(structure[0]) - 1:
        ys, yd = slice(max(0, -dy), rows - max(0, dy)), slice(max(0, dy), rows - max(0, -dy))
        xs, xd = slice(max(0, -dx), cols - max(0, dx)), slice(max(0, dx), cols - max(0, -dx))
        a, b = prev[ys, xs], cur[yd, xd]
        hit = (a > 0) & (b > 0)
        if hit.any():
            pairs.append(np.stack([a[hit], b[hit]], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def _blocks(n_slices: int, block: int) -> list[tuple[int, int]]:
    if block < 1:
        raise ValueError(f"block must be >= 1 slice, got {block}")
    return [(z, min(z + block, n_slices)) for z in range(0, n_slices, block)]


def _piece_plane(
    labelled: list[tuple[int, np.ndarray, int]], offsets: list[int], dz: int, rows: int, cols: int
) -> np.ndarray:
    """Slice ``dz`` of a labelled block as global piece index + 1 (0 = no piece)."""
    out = np.zeros((rows, cols), np.int64)
    for (_, lab, _), off in zip(labelled, offsets, strict=True):
        p = lab[dz]
        out[p > 0] = p[p > 0] + off
    return out


def connected_components(
    read_block: ReadBlock,
    shape: Sequence[int],
    *,
    classes: Sequence[int] | None = None,
    connectivity: int = 6,
    min_size: int = 1,
    block: int = 16,
    write: WriteBlock | None = None,
) -> Components:
    """Label the objects of the (Z, Y, X) label volume that ``read_block`` returns block by block.

    ``classes``: the label values that form objects (default: every nonzero value found).
    ``write`` receives the final object ids (uint32, 0 = none) block by block, in z order.
    """
    n_slices, rows, cols = (int(s) for s in shape)
    structure = _structure(connectivity)
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    ranges = _blocks(n_slices, block)

    def read(z0: int, z1: int) -> np.ndarray:
        data = np.asarray(read_block(z0, z1))
        if data.shape != (z1 - z0, rows, cols):
            expected = (z1 - z0, rows, cols)
            raise ValueError(f"read_block({z0}, {z1}) gave shape {data.shape}, expected {expected}")
        if data.dtype.kind not in "iub":
            raise ValueError(f"labels must be integers, got dtype {data.dtype}")
        return data

    if classes is None:
        found: set[int] = set()
        for z0, z1 in ranges:
            found.update(int(v) for v in np.unique(read(z0, z1)))
        classes = sorted(found - {0})
    classes = sorted({int(c) for c in classes})
    if 0 in classes:
        raise ValueError("class 0 is background and cannot form objects")

    # Pass 1: pieces per block and class, their statistics, and unions across block boundaries.
    pieces = _Pieces()
    prev_plane: np.ndarray | None = None
    for z0, z1 in ranges:
        labelled = list(_label_block(read(z0, z1), classes, structure))
        offsets = []
        for c, lab, n in labelled:
            offsets.append(len(pieces))  # piece index + 1 = offset + local id (local ids start at 1)
            pieces.add(c, *_piece_stats(lab, n, z0))
        if prev_plane is not None:
            first = _piece_plane(labelled, offsets, 0, rows, cols)
            for a, b in _boundary_pairs(prev_plane, first, structure):
                if pieces.cls[a - 1] == pieces.cls[b - 1]:
                    pieces.union(int(a - 1), int(b - 1))
        prev_plane = _piece_plane(labelled, offsets, z1 - z0 - 1, rows, cols)

    # Merge statistics per root; number kept objects by class, then first voxel.
    roots = pieces.roots()
    uniq, inverse = np.unique(roots, return_inverse=True)
    count = np.bincount(inverse, weights=pieces.count, minlength=len(uniq)).astype(np.int64)
    sums = np.stack(
        [np.bincount(inverse, weights=pieces.sums[:, k], minlength=len(uniq)) for k in range(3)], axis=1
    )
    lo = np.full((len(uniq), 3), np.iinfo(np.int64).max, np.int64)
    hi = np.zeros((len(uniq), 3), np.int64)
    np.minimum.at(lo, inverse, pieces.lo)
    np.maximum.at(hi, inverse, pieces.hi)
    keep = count >= min_size
    order = np.lexsort((uniq, pieces.cls[uniq]))  # a root is its set's smallest id: first in raster order
    order = order[keep[order]]
    final = np.zeros(len(uniq), np.int64)
    final[order] = np.arange(1, len(order) + 1)
    objects = [
        ObjectStats(
            label=int(final[i]),
            class_id=int(pieces.cls[uniq[i]]),
            voxels=int(count[i]),
            bbox_min=tuple(int(v) for v in lo[i]),  # type: ignore[arg-type]
            bbox_max=tuple(int(v) for v in hi[i]),  # type: ignore[arg-type]
            centroid=tuple(float(v) for v in sums[i] / count[i]),  # type: ignore[arg-type]
        )
        for i in order
    ]

    # Pass 2: label each block again (same pieces, same ids) and write final ids.
    if write is not None:
        if len(objects) >= 2**32:
            raise ValueError(f"{len(objects)} objects do not fit uint32 ids")
        lookup = np.concatenate([[0], final[inverse]]).astype(np.uint32)  # piece id + 1 -> object id
        next_piece = 0
        for z0, z1 in ranges:
            out = np.zeros((z1 - z0, rows, cols), np.uint32)
            for _, lab, n in _label_block(read(z0, z1), classes, structure):
                hit = lab > 0
                out[hit] = lookup[lab[hit] + next_piece]
                next_piece += n
            write(z0, z1, out)
        if next_piece != len(pieces):
            raise RuntimeError("labels changed between the two passes over the volume")
    return Components(objects=objects, removed=int((~keep).sum()), provisional=len(pieces))


STATS_COLUMNS = (
    "label",
    "class",
    "class_name",
    "voxels",
    "volume_um3",
    "bbox_z0",
    "bbox_y0",
    "bbox_x0",
    "bbox_z1",
    "bbox_y1",
    "bbox_x1",
    "centroid_z",
    "centroid_y",
    "centroid_x",
)


def write_stats_csv(
    path: str | os.PathLike[str],
    objects: Iterable[ObjectStats],
    voxel_size_nm: Sequence[float | None] | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """One row per object (columns ``STATS_COLUMNS``); volume empty when the voxel size is unknown.

    ``class_names[c]`` names class ``c`` (index 0 = background).
    """
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(STATS_COLUMNS)
        for o in objects:
            name = class_names[o.class_id] if class_names and o.class_id < len(class_names) else ""
            volume = o.volume_um3(voxel_size_nm)
            writer.writerow(
                [
                    o.label,
                    o.class_id,
                    name,
                    o.voxels,
                    "" if volume is None else f"{volume:.6g}",
                    *o.bbox_min,
                    *o.bbox_max,
                    *(f"{c:.3f}" for c in o.centroid),
                ]
            )
