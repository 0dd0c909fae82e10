"""sdk.tiling on the real VNC serial-section TEM volume (shared data, read-only)."""

from __future__ import annotations

from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from sdk.tiling import (
    Patch,
    estimate_intensity_range,
    grid_count,
    open_volume,
    patch_grid,
    plane_shape,
    read_patch,
    stitch_patches,
    to_uint8,
)

VNC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vnc"
STACK = VNC / "stack1"
pytestmark = pytest.mark.skipif(
    not (STACK / "raw").is_dir() or not (STACK / "mitochondria").is_dir(),
    reason=f"VNC data not found at {STACK} (shared/data beside the repo root)",
)

# Sub-volume for the format round trips: first 6 sections, a 512 x 512 crop.
SUB = (slice(0, 6), slice(0, 512), slice(0, 512))


@pytest.fixture(scope="module")
def raw():
    with open_volume(STACK / "raw") as vol:
        yield vol


@pytest.fixture(scope="module")
def sub(raw) -> np.ndarray:
    return raw[SUB]


@pytest.fixture(scope="module")
def mito() -> np.ndarray:
    """Ground-truth mitochondria, binarised (the PNGs mix modes "1" and "L")."""
    with open_volume(STACK / "mitochondria") as vol:
        return (vol[:] > 0).astype(np.uint8)


@pytest.fixture(scope="module")
def formats(tmp_path_factory, sub) -> dict[str, str]:
    """The sub-volume written in every supported format."""
    d = tmp_path_factory.mktemp("vnc_formats")
    tifffile.imwrite(d / "stack.tif", sub)
    tifffile.imwrite(d / "stack_zlib.tif", sub, compression="zlib")
    tifffile.imwrite(
        d / "stack.ome.tif",
        sub,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 4.6,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 4.6,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": 50,
            "PhysicalSizeZUnit": "nm",
        },
    )
    (d / "pngs").mkdir()
    for z, plane in enumerate(sub):
        Image.fromarray(plane).save(d / "pngs" / f"section_{z}.png")
    with h5py.File(d / "vol.h5", "w") as f:
        f.create_dataset("volumes/raw", data=sub, chunks=(1, 128, 128), compression="gzip")
    arr = zarr.open_array(
        str(d / "vol.zarr"), mode="w", shape=sub.shape, dtype=sub.dtype, chunks=(1, 128, 128)
    )
    arr[...] = sub
    np.save(d / "vol.npy", sub)
    with mrcfile.new(d / "vol.mrc") as mrc:
        mrc.set_data(sub)
        mrc.voxel_size = (46.0, 46.0, 500.0)
    specs = {p.name: str(p) for p in d.iterdir()}
    specs["vol.h5"] += ":/volumes/raw"
    return specs


def test_read_folder_of_tiff_slices(raw) -> None:
    files = sorted((STACK / "raw").glob("*.tif"))
    assert raw.shape == (len(files), *tifffile.imread(files[0]).shape)
    assert raw.dtype == tifffile.imread(files[0]).dtype
    assert raw.metadata["files"] == [f.name for f in files]
    for z in (0, len(files) // 2, len(files) - 1):
        np.testing.assert_array_equal(raw[z], tifffile.imread(files[z]))
    # any axis: a y-slice gathers one row from each section
    y = raw.shape[1] // 3
    np.testing.assert_array_equal(
        raw[:, y, 100:300], np.stack([tifffile.imread(f)[y, 100:300] for f in files])
    )


def test_every_format_gives_identical_patches(formats, sub) -> None:
    grids = [
        patch_grid(sub.shape, "z", 128, 96),
        patch_grid(sub.shape, "y", (6, 100), (6, 80), slice_step=37),
        patch_grid(sub.shape, "x", (4, 256), (2, 256), slices=[0, 511]),
    ]
    for name, spec in formats.items():
        with open_volume(spec) as vol:
            assert vol.shape == sub.shape, name
            # mrcfile stores uint8 as MRC mode 6 (uint16); values are unchanged
            assert vol.dtype == (np.uint16 if name == "vol.mrc" else sub.dtype), name
            for grid in grids:
                for p in grid:
                    np.testing.assert_array_equal(read_patch(vol, p), sub[p.region()], err_msg=f"{name} {p}")
    assert open_volume(formats["stack.ome.tif"]).voxel_size.to_dict() == pytest.approx(
        {"z": 50.0, "y": 4.6, "x": 4.6, "unit": "nm"}
    )
    assert open_volume(formats["vol.mrc"]).voxel_size.z == pytest.approx(50.0)


def test_format_readers_are_lazy(formats) -> None:
    assert isinstance(open_volume(formats["vol.npy"]).array, np.memmap)
    assert isinstance(open_volume(formats["stack.tif"]).array, np.memmap)
    assert isinstance(open_volume(formats["vol.mrc"]).array, np.memmap)
    assert isinstance(open_volume(formats["vol.h5"]).array, h5py.Dataset)
    assert isinstance(open_volume(formats["vol.zarr"]).array, zarr.Array)
    folder = open_volume(formats["pngs"])
    read_patch(folder, Patch(folder.id, "z", 4, 0, 0, 64, 64))
    assert folder.pages_read == 1


@pytest.mark.parametrize("axis", ["z", "y", "x"])
@pytest.mark.parametrize(
    ("size", "stride"), [(256, None), (256, 200), (300, 128), ((20, 512), (7, 500)), ((1, 999), None)]
)
def test_patch_count_matches_grid_arithmetic(raw, axis, size, stride) -> None:
    if isinstance(size, int) and size > min(plane_shape(raw.shape, axis)):  # Z rows < size
        with pytest.raises(ValueError, match="larger than"):
            patch_grid(raw.shape, axis, size, stride)
        return
    patches = patch_grid(raw.shape, axis, size, stride, volume_id=raw.id)
    assert len(patches) == grid_count(raw.shape, axis, size, stride=stride)
    assert len(set(patches)) == len(patches)
    assert len(patch_grid(raw.shape, axis, size, stride, slice_step=3)) == grid_count(
        raw.shape, axis, size, stride=stride, slice_step=3
    )


@pytest.mark.parametrize(
    ("axis", "size", "stride"),
    [("z", 384, 320), ("z", (200, 333), (150, 300)), ("y", (8, 256), (5, 200)), ("x", (20, 300), (17, 290))],
)
def test_stitching_ground_truth_reproduces_it(mito, axis, size, stride) -> None:
    patches = patch_grid(mito.shape, axis, size, stride, volume_id="vnc-mito")
    n_slices, plane = mito.shape["zyx".index(axis)], plane_shape(mito.shape, axis)
    assert sum(p.height * p.width for p in patches) > n_slices * plane[0] * plane[1]  # overlap
    items = [(p, read_patch(mito, p)) for p in patches]
    labels, coverage = stitch_patches(mito.shape, axis, items[::-1])
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, mito)
    assert coverage.all()
    # the order-independent rule agrees on consistent annotations
    np.testing.assert_array_equal(stitch_patches(mito.shape, axis, items, rule="max").labels, mito)


def test_uncovered_regions_get_unknown_value(mito, tmp_path: Path) -> None:
    patches = [
        p for p in patch_grid(mito.shape, "z", 256, slices=[2, 5, 11]) if (p.y, p.x) != (256, 512)
    ]  # leave a hole in each slice
    out = np.lib.format.open_memmap(tmp_path / "labels.npy", "w+", np.uint8, mito.shape)
    labels, coverage = stitch_patches(mito.shape, "z", [(p, read_patch(mito, p)) for p in patches], out=out)
    assert labels is out
    expected = np.zeros(mito.shape, bool)
    for p in patches:
        expected[p.region()] = True
    np.testing.assert_array_equal(coverage, expected)
    assert (out[~coverage] == 255).all()
    np.testing.assert_array_equal(out[coverage], mito[coverage])
    assert not coverage[2, 256:512, 512:768].any() and coverage[[2, 5, 11]].mean() > 0.9
    # the raw masks use 255 for foreground: the collision is refused, not silently merged
    raw_mask = np.asarray(Image.open(STACK / "mitochondria" / "02.png").convert("L"))
    if (raw_mask == 255).any():
        p = Patch("vnc-mito", "z", 2, 0, 0, *raw_mask.shape)
        with pytest.raises(ValueError, match="unknown_value"):
            stitch_patches(mito.shape, "z", [(p, raw_mask)])


def test_intensity_window_on_real_data(raw) -> None:
    rng = estimate_intensity_range(raw, sample_slices=5, seed=1)
    lo, hi = rng
    assert 0 <= lo < hi <= 255 and len(rng.sample_slices) == 5
    patch = read_patch(raw, patch_grid(raw.shape, "z", 256, slices=[rng.sample_slices[0]])[0])
    u8 = to_uint8(patch, lo, hi)
    assert u8.dtype == np.uint8 and u8.shape == patch.shape
    # the same data stored as 16-bit or float gives the same 8-bit image
    small = raw[:, ::4, ::4]
    u8 = to_uint8(small, *estimate_intensity_range(small, seed=1))
    for scaled in (small.astype(np.uint16) * 257, small.astype(np.float32) / 255 - 0.5):
        np.testing.assert_array_equal(to_uint8(scaled, *estimate_intensity_range(scaled, seed=1)), u8)
