"""``open_volume``: turn a path spec into the right lazy reader."""

from __future__ import annotations

import os
from pathlib import Path

from ..volume import Volume
from .folder import PNG_SUFFIXES, TIFF_SUFFIXES, open_folder
from .hdf5 import open_hdf5
from .mrc import open_mrc
from .npy import open_npy
from .tiff import open_tiff
from .zarr_store import open_zarr

HDF5_SUFFIXES = {".h5", ".hdf5", ".hdf", ".he5"}
MRC_SUFFIXES = {".mrc", ".mrcs", ".map", ".rec", ".st", ".ali"}
ZARR_SUFFIXES = {".zarr"}
ZARR_MARKERS = (".zarray", ".zgroup", "zarr.json")

SUPPORTED = (
    "multi-page TIFF/OME-TIFF (.tif, .tiff), a folder of 2-D .tif/.tiff/.png slices, "
    "HDF5 (.h5, .hdf5, .hdf, .he5 [:/dataset]), Zarr/OME-Zarr (.zarr folder [:/array]), "
    "NumPy (.npy), MRC (.mrc, .mrcs, .map, .rec, .st, .ali)"
)


def split_spec(spec: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """Split ``'data/vol.h5:/raw'`` into an existing path and the key after it.

    The path is the longest prefix before a ':' that exists, so paths containing ':'
    (and Windows drive letters) still work.
    """
    text = os.fspath(spec)
    if Path(text).exists():
        return Path(text), None
    for i in range(len(text) - 1, 0, -1):
        if text[i] == ":" and Path(text[:i]).exists():
            return Path(text[:i]), text[i + 1 :] or None
    raise FileNotFoundError(f"no such file or folder: {text}")


def _is_zarr(path: Path) -> bool:
    return path.suffix.lower() in ZARR_SUFFIXES or any((path / m).exists() for m in ZARR_MARKERS)


def open_volume(spec: str | os.PathLike[str]) -> Volume:
    """Open a 3-D (Z, Y, X) image lazily, whatever format it is stored in.

    ``spec`` is a path, optionally followed by ``:/key`` for a dataset inside an HDF5
    file or Zarr group. The returned volume's ``id`` is such a spec, fully resolved.
    """
    path, key = split_spec(spec)
    path = path.resolve()
    suffix = path.suffix.lower()
    if path.is_dir():
        if _is_zarr(path):
            return open_zarr(path, key)
        kind = "folder"
    elif suffix in HDF5_SUFFIXES:
        return open_hdf5(path, key)
    elif suffix in TIFF_SUFFIXES:
        kind = "TIFF"
    elif suffix == ".npy":
        kind = "NumPy"
    elif suffix in MRC_SUFFIXES:
        kind = "MRC"
    else:
        hint = " (open the folder of slices instead)" if suffix in PNG_SUFFIXES else ""
        raise ValueError(
            f"unknown volume format {suffix or '(no extension)'!r} for {path}{hint}. Supported: {SUPPORTED}"
        )
    if key is not None:
        raise ValueError(f"{kind} volume {path} takes no dataset key (got {key!r})")
    if kind == "folder":
        return open_folder(path)
    if kind == "TIFF":
        return open_tiff(path)
    if kind == "NumPy":
        return open_npy(path)
    return open_mrc(path)
