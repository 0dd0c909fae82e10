"""A folder of 2-D slices (TIFF or PNG), one file per z, in natural filename order.

Greyscale+alpha PNGs (PIL mode "LA", as some public EM sets ship) read as their grey
channel. Colour slices are refused rather than mixed to grey: colour in EM slices is
usually colour-coded labels, which a luminance mix would silently corrupt.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from ..volume import PagedVolume

TIFF_SUFFIXES = {".tif", ".tiff"}
PNG_SUFFIXES = {".png"}

# PIL modes we can read as one greyscale channel. Mode "1" is widened to uint8 0/1 so
# that 1-bit and 8-bit masks in one folder (a common export mix) form one volume.
_PIL_DTYPES = {
    "1": np.uint8,
    "L": np.uint8,
    "P": np.uint8,
    "I;16": np.uint16,
    "I;16L": np.uint16,
    "I;16B": np.uint16,
    "I": np.int32,
    "F": np.float32,
    "LA": np.uint8,  # grey + alpha: the alpha channel is dropped
}


def natural_key(name: str) -> list[str | int]:
    """Sort key with digit runs compared as numbers: '2.tif' before '10.tif'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_slices(folder: Path) -> list[Path]:
    """Slice files of one kind (TIFF or PNG), naturally sorted; hidden files ignored."""
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in TIFF_SUFFIXES | PNG_SUFFIXES
    ]
    if not files:
        raise ValueError(f"folder {folder} contains no .tif/.tiff/.png slices")
    kinds = {"tiff" if p.suffix.lower() in TIFF_SUFFIXES else "png" for p in files}
    if len(kinds) > 1:
        raise ValueError(f"folder {folder} mixes TIFF and PNG slices; keep one kind per volume")
    return sorted(files, key=lambda p: natural_key(p.name))


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a slice from its header only (no pixel decoding)."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return tuple(series.shape), np.dtype(series.dtype)
    with Image.open(path) as im:
        if im.mode not in _PIL_DTYPES:
            raise ValueError(f"{path} has PIL mode {im.mode!r}; expected a greyscale slice{_mode_hint(im)}")
        return (im.height, im.width), np.dtype(_PIL_DTYPES[im.mode])


def _mode_hint(im: Image.Image) -> str:
    if im.tile and im.tile[0][3] == "LA;16B":  # Pillow decodes 16-bit grey+alpha as 8-bit RGBA
        return " (16-bit greyscale+alpha, which Pillow reads only as 8 bits: save it without alpha)"
    if len(im.getbands()) >= 3:
        return " (colour slices are not converted: save them as greyscale)"
    return ""


def read_slice(path: Path) -> np.ndarray:
    if path.suffix.lower() in TIFF_SUFFIXES:
        return tifffile.imread(path)
    with Image.open(path) as im:
        grey = im.getchannel(0) if im.mode == "LA" else im
        return np.asarray(grey).astype(_PIL_DTYPES[im.mode], copy=False)


def open_folder(folder: Path) -> PagedVolume:
    files = list_slices(folder)
    shape, dtype = _header(files[0])
    if len(shape) != 2:
        raise ValueError(f"{files[0]} has shape {shape}; slices must be 2-D greyscale images")
    for path in files[1:]:
        s, d = _header(path)
        if s != shape:
            raise ValueError(
                f"inconsistent slice shapes in {folder}: {files[0].name} is {shape}, {path.name} is {s}"
            )
        if d != dtype:
            raise ValueError(
                f"inconsistent slice dtypes in {folder}: {files[0].name} is {dtype}, {path.name} is {d}"
            )
    meta = {"format": "folder", "path": str(folder), "files": [p.name for p in files]}
    return PagedVolume(
        lambda z: read_slice(files[z]), (len(files), *shape), dtype, str(folder), metadata=meta
    )
