"""3-D volumes into 2-D slice patches and back.

Read any microscopy volume lazily (``open_volume``), cut it into a patch grid with
provenance (``patch_grid``/``Patch``), map intensities to 8-bit for display
(``estimate_intensity_range``/``to_uint8``), stitch 2-D label patches back into a
3-D label volume (``stitch_patches``), and map label values to class ids
(``parse_classes``/``map_classes``).
"""

from .classes import Classes, default_classes, format_classes, map_classes, parse_classes
from .grid import AXES, Patch, grid_count, grid_starts, patch_grid, plane_shape, read_patch
from .intensity import IntensityRange, estimate_intensity_range, to_uint8
from .readers import SUPPORTED, open_volume
from .stitch import Stitched, stitch_patches
from .volume import ArrayVolume, PagedVolume, Volume
from .voxel import VoxelSize

__all__ = [
    "AXES",
    "SUPPORTED",
    "ArrayVolume",
    "Classes",
    "IntensityRange",
    "PagedVolume",
    "Patch",
    "Stitched",
    "Volume",
    "VoxelSize",
    "default_classes",
    "estimate_intensity_range",
    "format_classes",
    "grid_count",
    "grid_starts",
    "map_classes",
    "open_volume",
    "parse_classes",
    "patch_grid",
    "plane_shape",
    "read_patch",
    "stitch_patches",
    "to_uint8",
]
