"""Zarr arrays and OME-Zarr multiscale images (zarr-python 2 or 3).

For OME-Zarr the first (full-resolution) dataset of the first multiscale is used and
singleton time/channel axes are indexed away.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..volume import ArrayVolume
from ..voxel import VoxelSize
from .containers import choose_3d, missing_key, require_3d


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as e:
        raise ImportError("reading Zarr stores needs the 'zarr' package") from e
    return zarr


def _arrays(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, arr in group.arrays():
        yield prefix + name, arr
    for name, sub in group.groups():
        yield from _arrays(sub, f"{prefix}{name}/")


def _multiscales(group: Any) -> list[dict[str, Any]]:
    attrs = dict(group.attrs)
    ome = attrs.get("ome")  # OME-Zarr 0.5 nests its metadata under "ome"
    ms = ome.get("multiscales") if isinstance(ome, dict) else attrs.get("multiscales")
    return ms if isinstance(ms, list) else []


def _scale(transforms: Any) -> list[float] | None:
    for t in transforms or []:
        if isinstance(t, dict) and t.get("type") == "scale":
            return [float(v) for v in t["scale"]]
    return None


def _ome_layout(
    ms: dict[str, Any], dataset: dict[str, Any], shape: tuple[int, ...], where: str
) -> tuple[tuple[int, ...], VoxelSize | None]:
    """Index prefix dropping the leading (t, c) axes, and the physical voxel size."""
    raw_axes = ms.get("axes") or ["t", "c", "z", "y", "x"][-len(shape) :]
    names = [a["name"] if isinstance(a, dict) else a for a in raw_axes]
    units = [a.get("unit") if isinstance(a, dict) else None for a in raw_axes]
    spatial = [n for n in names if n in ("z", "y", "x")]
    if spatial != ["z", "y", "x"] or names[-3:] != spatial:
        raise ValueError(f"{where} has axes {names}; expected the last three to be z, y, x")
    lead = len(names) - 3
    if any(n != 1 for n in shape[:lead]):
        raise ValueError(
            f"{where} has axes {names} with shape {shape}; only one time point and one channel are supported"
        )
    scale = _scale(dataset.get("coordinateTransformations"))
    voxel = None
    if scale is not None and len(scale) == len(names):
        outer = _scale(ms.get("coordinateTransformations")) or [1.0] * len(names)
        zyx = tuple(s * o for s, o in zip(scale[-3:], outer[-3:], strict=True))
        voxel = VoxelSize.from_values(zyx, tuple(units[-3:]))  # type: ignore[arg-type]
    return (0,) * lead, voxel


def _ome_dataset(group: Any, name: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    for ms in _multiscales(group):
        for ds in ms.get("datasets", []):
            if str(ds.get("path")).strip("/") == name:
                return ms, ds
    return None


def open_zarr(path: Path, key: str | None) -> ArrayVolume:
    zarr = _zarr()
    try:
        root = zarr.open(str(path), mode="r")
    except Exception as e:  # each zarr version raises its own "not found" type
        raise ValueError(f"{path} is not a readable Zarr store: {e}") from e
    key = key.strip("/") if key else ""
    node = root
    if key:
        try:
            node = root[key]
        except KeyError:
            arrays = dict(_arrays(root)) if isinstance(root, zarr.Group) else {}
            raise missing_key(key, {k: a.shape for k, a in arrays.items()}, str(path)) from None
    if isinstance(node, zarr.Group):
        ms = _multiscales(node)
        if ms:
            sub = str(ms[0]["datasets"][0]["path"]).strip("/")
        else:
            arrays = {name: a.shape for name, a in _arrays(node)}
            sub = choose_3d(arrays, f"{path}:/{key}" if key else str(path))
        key = f"{key}/{sub}" if key else sub
        node = root[key]

    # An OME-Zarr level is described by its parent group, whether or not it was keyed.
    parent_key, _, name = key.rpartition("/")
    parent = root[parent_key] if parent_key else root
    found = _ome_dataset(parent, name) if key and isinstance(parent, zarr.Group) else None
    where = f"{path}:/{key}" if key else str(path)
    prefix: tuple[int, ...] = ()
    voxel = None
    if found is not None:
        prefix, voxel = _ome_layout(*found, tuple(node.shape), where)
    require_3d(tuple(node.shape)[len(prefix) :], where)
    meta = {
        "format": "ome-zarr" if found is not None else "zarr",
        "path": str(path),
        "key": key,
        "chunks": tuple(node.chunks)[len(prefix) :],
    }
    return ArrayVolume(node, where, prefix=prefix, voxel_size=voxel, metadata=meta)
