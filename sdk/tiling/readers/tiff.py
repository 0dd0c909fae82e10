"""Multi-page TIFF, OME-TIFF and ImageJ hyperstacks.

Uncompressed contiguous stacks are memory-mapped; anything else (compressed, tiled,
strided) is decoded one page at a time.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ..volume import ArrayVolume, PagedVolume, Volume
from ..voxel import VoxelSize
from .containers import require_3d


def _ome_voxel_size(xml: str) -> VoxelSize | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = tuple(pixels.get(f"PhysicalSize{a}") for a in "ZYX")
    units = tuple(pixels.get(f"PhysicalSize{a}Unit", "µm") for a in "ZYX")
    return VoxelSize.from_values(sizes, units)  # type: ignore[arg-type]


def _imagej_voxel_size(tif: tifffile.TiffFile) -> VoxelSize | None:
    meta = tif.imagej_metadata or {}
    unit = meta.get("unit")
    if not unit:
        return None  # resolution tags are then pixels per inch of a printout

    def per_pixel(tag_name: str) -> float | None:
        tag = tif.pages[0].tags.get(tag_name)
        if tag is None:
            return None
        num, den = tag.value
        return den / num if num else None

    zyx = (meta.get("spacing"), per_pixel("YResolution"), per_pixel("XResolution"))
    return VoxelSize.from_values(zyx, unit)


def _voxel_size(tif: tifffile.TiffFile) -> VoxelSize | None:
    if tif.is_ome and tif.ome_metadata:
        return _ome_voxel_size(tif.ome_metadata)
    if tif.is_imagej:
        return _imagej_voxel_size(tif)
    return None


def open_tiff(path: Path) -> Volume:
    tif = tifffile.TiffFile(path)
    try:
        series = tif.series[0]
        shape, axes = tuple(series.shape), series.axes  # singleton axes already squeezed
        if len(shape) > 3:
            raise ValueError(
                f"{path} has {len(shape)} axes {axes!r} with shape {shape}; only single-"
                "channel 3-D stacks are supported (split channels/time points first)"
            )
        if len(tif.series) > 1 and len(shape) < 3:
            raise ValueError(
                f"{path} holds {len(tif.series)} image series and the first is {len(shape)}-D "
                f"{shape}; expected one 3-D stack (do all pages have the same shape?)"
            )
        require_3d(shape, str(path))
        if "S" in axes:
            raise ValueError(f"{path} stores colour samples (axes {axes!r}); expected greyscale")
        meta: dict[str, Any] = {
            "format": "ome-tiff" if tif.is_ome else "tiff",
            "path": str(path),
            "axes": axes,
        }
        voxel = _voxel_size(tif)
        try:
            array = tifffile.memmap(path, series=0, mode="r")
        except ValueError:  # compressed, tiled or scattered: not mappable
            array = None
        if array is not None:
            tif.close()
            meta["memmap"] = True
            return ArrayVolume(array.reshape(shape), str(path), voxel_size=voxel, metadata=meta)
        if len(series.pages) != shape[0]:
            raise ValueError(
                f"{path}: {len(series.pages)} pages for {shape[0]} slices and the data "
                "cannot be memory-mapped; convert it to an uncompressed or one-page-per-"
                "slice TIFF"
            )
        meta["memmap"] = False

        def read_page(z: int) -> np.ndarray:
            return tif.asarray(key=z, series=0)

        return PagedVolume(
            read_page, shape, series.dtype, str(path), voxel_size=voxel, metadata=meta, on_close=tif.close
        )
    except Exception:
        tif.close()
        raise
