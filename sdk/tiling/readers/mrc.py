"""MRC / CCP4 files (cryo-EM, tomography), memory-mapped with mrcfile."""

from __future__ import annotations

from pathlib import Path

from ..volume import ArrayVolume
from ..voxel import VoxelSize
from .containers import require_3d


def open_mrc(path: Path) -> ArrayVolume:
    try:
        import mrcfile
    except ImportError as e:
        raise ImportError("reading MRC files needs the 'mrcfile' package") from e
    mrc = mrcfile.mmap(path, mode="r", permissive=False)
    try:
        data = mrc.data
        if data is None:
            raise ValueError(f"{path} holds no image data")
        require_3d(data.shape, str(path))
        vs = mrc.voxel_size  # record array (x, y, z) in Ångström; zeros when unset
        voxel = VoxelSize.from_values((float(vs.z), float(vs.y), float(vs.x)), "angstrom")
    except Exception:
        mrc.close()
        raise
    return ArrayVolume(
        data, str(path), voxel_size=voxel, metadata={"format": "mrc", "path": str(path)}, on_close=mrc.close
    )
