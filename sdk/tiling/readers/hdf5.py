"""HDF5 datasets (``file.h5:/group/dataset``), read chunk-wise through h5py."""

from __future__ import annotations

from pathlib import Path

from ..volume import ArrayVolume
from ..voxel import VoxelSize
from .containers import choose_3d, missing_key, require_3d


def open_hdf5(path: Path, key: str | None) -> ArrayVolume:
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading HDF5 files needs the 'h5py' package") from e
    f = h5py.File(path, "r")
    try:
        datasets: dict[str, tuple[int, ...]] = {}

        def collect(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                datasets["/" + name] = obj.shape

        f.visititems(collect)
        if key is None:
            key = choose_3d(datasets, str(path))
        key = "/" + key.strip("/")
        if key not in datasets:
            raise missing_key(key, datasets, str(path))
        dset = f[key]
        require_3d(dset.shape, f"{path}:{key}")
        # ilastik/Fiji convention: (z, y, x) in micrometres.
        size = dset.attrs.get("element_size_um")
        voxel = (
            VoxelSize.from_values(tuple(float(v) for v in size), "µm")
            if size is not None and len(size) == 3
            else None
        )
    except Exception:
        f.close()
        raise
    meta = {"format": "hdf5", "path": str(path), "key": key, "chunks": dset.chunks}
    return ArrayVolume(dset, f"{path}:{key}", voxel_size=voxel, metadata=meta, on_close=f.close)
