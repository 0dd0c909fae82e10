"""sdk.tiling readers on small synthetic files in every format (needs h5py, zarr, mrcfile)."""

from __future__ import annotations

import tracemalloc
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
    open_volume,
    patch_grid,
    read_patch,
    stitch_patches,
)

ZARR_V3 = int(zarr.__version__.split(".")[0]) >= 3
ZARR_V2_FORMAT = {"zarr_format": 2} if ZARR_V3 else {}


def _volume(shape=(5, 37, 23), dtype=np.uint16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=shape).astype(dtype)


def _zarr_array(path: Path, data: np.ndarray, chunks=None, **kw):
    arr = zarr.open_array(
        str(path),
        mode="w",
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks or data.shape,
        **kw,
    )
    arr[...] = data
    return arr


def _write_mrc(path: Path, data: np.ndarray, voxel_angstrom=None) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if voxel_angstrom is not None:
            mrc.voxel_size = voxel_angstrom  # (x, y, z)


def test_stitch_into_zarr_and_signed_unknown(tmp_path: Path) -> None:
    truth = np.arange(2 * 5 * 5, dtype=np.int16).reshape(2, 5, 5)
    out = zarr.open_array(
        str(tmp_path / "l.zarr"), mode="w", shape=truth.shape, dtype=np.int16, chunks=(1, 5, 5)
    )
    patches = patch_grid(truth.shape, "z", 3, 2, slices=[1])
    labels, cov = stitch_patches(
        truth.shape, "z", [(p, truth[p.region()]) for p in patches], unknown_value=-1, out=out
    )
    np.testing.assert_array_equal(out[1], truth[1])
    assert (out[0] == -1).all() and not cov[0].any()


# ---------------------------------------------------------------- readers


@pytest.fixture
def data() -> np.ndarray:
    return _volume()


def _write_all(tmp_path: Path, data: np.ndarray, chunks=(1, 16, 16)) -> dict[str, str]:
    """The same volume in every supported format; returns name -> spec."""
    specs = {}
    tifffile.imwrite(tmp_path / "stack.tif", data)
    specs["tiff"] = str(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "zlib.tiff", data, compression="zlib")
    specs["tiff-compressed"] = str(tmp_path / "zlib.tiff")
    folder = tmp_path / "slices"
    folder.mkdir()
    for z, plane in enumerate(data):
        tifffile.imwrite(folder / f"s{z}.tif", plane)
    specs["folder-tiff"] = str(folder)
    png = tmp_path / "png"
    png.mkdir()
    for z, plane in enumerate(data):
        Image.fromarray(plane).save(png / f"{z}.png")  # uint16 -> mode I;16
    specs["folder-png"] = str(png)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f.create_dataset("group/raw", data=data, chunks=chunks)
        f.create_dataset("thumb", data=data[0])
    specs["hdf5"] = str(tmp_path / "vol.h5")
    _zarr_array(tmp_path / "vol.zarr", data, chunks=chunks)
    specs["zarr"] = str(tmp_path / "vol.zarr")
    np.save(tmp_path / "vol.npy", data)
    specs["npy"] = str(tmp_path / "vol.npy")
    _write_mrc(tmp_path / "vol.mrc", data)
    specs["mrc"] = str(tmp_path / "vol.mrc")
    return specs


def test_every_reader_reads_the_same_volume(tmp_path: Path, data) -> None:
    for name, spec in _write_all(tmp_path, data).items():
        with open_volume(spec) as vol:
            assert vol.shape == data.shape and vol.dtype == data.dtype, name
            np.testing.assert_array_equal(vol[:], data, err_msg=name)
            np.testing.assert_array_equal(vol[2, ::-3, 5:1:-1], data[2, ::-3, 5:1:-1])
            with open_volume(vol.id) as again:  # the id is a spec that reopens it
                assert again.id == vol.id
        assert vol.closed
        with pytest.raises(ValueError, match="closed"):
            vol[0]


def test_reader_ids_and_formats(tmp_path: Path, data) -> None:
    specs = _write_all(tmp_path, data)
    vol = open_volume(specs["hdf5"])
    assert vol.id == f"{(tmp_path / 'vol.h5').resolve()}:/group/raw"
    assert open_volume(specs["hdf5"] + ":group/raw").id == vol.id
    assert open_volume(specs["tiff"]).metadata["memmap"] is True
    assert open_volume(specs["tiff-compressed"]).metadata["memmap"] is False


def test_readers_are_lazy(tmp_path: Path) -> None:
    data = np.zeros((16, 1024, 1024), dtype=np.uint8)  # 16 MiB
    data[:, ::7, ::5] = 3
    specs = _write_all(tmp_path, data, chunks=(1, 128, 128))
    expected = {
        "npy": np.memmap,
        "tiff": np.memmap,
        "mrc": np.memmap,
        "hdf5": h5py.Dataset,
        "zarr": zarr.Array,
    }
    for name, kind in expected.items():
        tracemalloc.start()
        vol = open_volume(specs[name])
        patch = read_patch(vol, Patch(vol.id, "z", 9, 100, 200, 64, 64))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(vol.array, kind), name
        assert peak < 2 << 20, f"{name} allocated {peak} bytes to read one patch"
        np.testing.assert_array_equal(patch, data[9, 100:164, 200:264])
        vol.close()
    for name in ("folder-tiff", "tiff-compressed"):
        vol = open_volume(specs[name])
        for p in patch_grid(vol.shape, "z", 256, slices=[3, 11]):
            read_patch(vol, p)
        assert vol.pages_read == 2, name  # one decode per slice thanks to the page cache


def test_folder_natural_sort_and_png_modes(tmp_path: Path) -> None:
    for z in range(12):
        img = Image.fromarray(np.full((3, 4), z * 10, np.uint8))
        if z % 2:  # a 1-bit all-foreground mask
            img = Image.fromarray(np.ones((3, 4), bool))
            assert img.mode == "1"
        img.save(tmp_path / f"slice_{z + 1}.png")
    vol = open_volume(tmp_path)
    assert vol.metadata["files"][:3] == ["slice_1.png", "slice_2.png", "slice_3.png"]
    assert vol.metadata["files"][-1] == "slice_12.png"
    assert vol.dtype == np.uint8
    # mode "1" pages read as 0/1, mode "L" keeps its values: binarise with > 0
    assert [int(vol[z, 0, 0]) for z in range(4)] == [0, 1, 20, 1]


def test_folder_of_greyscale_alpha_pngs_reads_the_grey_channel(tmp_path: Path) -> None:
    grey = np.random.default_rng(0).integers(0, 256, (3, 6, 5), dtype=np.uint8)
    for z, plane in enumerate(grey):
        alpha = np.full_like(plane, 255 if z != 1 else 17)  # alpha never leaks into the values
        pair = Image.fromarray(np.stack([plane, alpha], axis=-1), "LA")
        (pair if z != 2 else Image.fromarray(plane)).save(tmp_path / f"{z}.png")  # LA and L mix
    vol = open_volume(tmp_path)
    assert (vol.shape, vol.dtype, vol.pages_read) == ((3, 6, 5), np.uint8, 0)  # from the headers only
    np.testing.assert_array_equal(vol[:], grey)
    assert vol[1].flags.c_contiguous


def test_folder_refuses_colour_slices_with_the_reason(tmp_path: Path) -> None:
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb / "0.png")
    with pytest.raises(ValueError, match=r"mode 'RGB'; expected a greyscale slice \(colour slices are not"):
        open_volume(rgb)
    # 16-bit grey+alpha: Pillow decodes it as 8-bit RGBA, so it is refused rather than truncated.
    deep = tmp_path / "deep"
    deep.mkdir()
    _write_png_16bit_grey_alpha(deep / "0.png", np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000)
    with pytest.raises(ValueError, match="16-bit greyscale\\+alpha, which Pillow reads only as 8 bits"):
        open_volume(deep)


def _write_png_16bit_grey_alpha(path: Path, grey: np.ndarray) -> None:
    """PNG colour type 4 at bit depth 16 (Pillow cannot write it)."""
    import struct
    import zlib

    pixels = np.stack([grey, np.full_like(grey, 65535)], axis=-1).astype(">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", grey.shape[1], grey.shape[0], 16, 4, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


IMAGEJ_METADATA = {"spacing": 0.05, "unit": "micron", "axes": "ZYX"}
OME_METADATA = {"axes": "ZYX", "PhysicalSizeZ": 0.05, "PhysicalSizeZUnit": "µm"} | {
    f"PhysicalSize{a}{suffix}": value for a in "XY" for suffix, value in (("", 4.6), ("Unit", "nm"))
}


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("vol.ome.tif", {"ome": True, "metadata": OME_METADATA}, (50.0, 4.6, 4.6)),
        (
            "ij.tif",
            {
                "imagej": True,
                "resolution": (250, 250),
                "metadata": {"spacing": 0.05, "unit": "micron", "axes": "ZYX"},
            },
            (50.0, 4.0, 4.0),
        ),
    ],
)
def test_tiff_voxel_size(tmp_path: Path, data, name: str, options: dict, expected: tuple) -> None:
    tifffile.imwrite(tmp_path / name, data, **options)
    vol = open_volume(tmp_path / name)
    z, y, x = expected
    assert vol.voxel_size.to_dict() == pytest.approx({"z": z, "y": y, "x": x, "unit": "nm"})
    if options.get("ome"):
        assert vol.metadata["format"] == "ome-tiff"
    np.testing.assert_array_equal(vol[3], data[3])


def test_mrc_and_hdf5_voxel_size(tmp_path: Path, data) -> None:
    _write_mrc(tmp_path / "v.mrc", data.astype(np.int16), voxel_angstrom=(46.0, 46.0, 500.0))
    vs = open_volume(tmp_path / "v.mrc").voxel_size
    assert (vs.z, vs.y, vs.x) == pytest.approx((50.0, 4.6, 4.6))
    _write_mrc(tmp_path / "none.mrc", data.astype(np.int16))
    assert open_volume(tmp_path / "none.mrc").voxel_size is None
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("raw", data=data).attrs["element_size_um"] = (0.05, 0.0046, 0.0046)
    vs = open_volume(tmp_path / "v.h5").voxel_size
    assert (vs.z, vs.y, vs.x) == pytest.approx((50.0, 4.6, 4.6))


def _ome_zarr(path: Path, data: np.ndarray, version: str) -> None:
    fmt = {"zarr_format": 3} if version == "0.5" else ZARR_V2_FORMAT
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": u}
        for a, u in zip("zyx", ("micrometer", "nanometer", "nanometer"), strict=True)
    ]
    ms = [
        {
            "version": version,
            "axes": axes,
            "datasets": [
                {
                    "path": "0",
                    "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 0.05, 4.6, 4.6]}],
                },
                {
                    "path": "1",
                    "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 0.05, 9.2, 9.2]}],
                },
            ],
        }
    ]
    group = zarr.open_group(str(path), mode="w", **fmt)
    if version == "0.5":
        group.attrs["ome"] = {"version": version, "multiscales": ms}
    else:
        group.attrs["multiscales"] = ms
    _zarr_array(path / "0", data[None, None], chunks=(1, 1, 1, 16, 16), **fmt)
    _zarr_array(path / "1", data[None, None, :, ::2, ::2], **fmt)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_full_resolution_level(tmp_path: Path, data, version) -> None:
    if version == "0.5" and not ZARR_V3:
        pytest.skip("OME-Zarr 0.5 needs zarr-python 3")
    _ome_zarr(tmp_path / "img.zarr", data, version)
    vol = open_volume(tmp_path / "img.zarr")
    assert vol.shape == data.shape and vol.metadata["format"] == "ome-zarr"
    assert vol.id.endswith("img.zarr:/0")
    np.testing.assert_array_equal(vol[1:3, 4], data[1:3, 4])
    vs = vol.voxel_size
    assert (vs.z, vs.y, vs.x) == pytest.approx((50.0, 4.6, 4.6))
    low = open_volume(str(tmp_path / "img.zarr") + ":/1")  # a keyed level keeps its metadata
    assert low.shape == data[:, ::2, ::2].shape and low.voxel_size.x == pytest.approx(9.2)


def test_zarr_group_chooses_single_3d_array(tmp_path: Path, data) -> None:
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.attrs["note"] = "not OME"
    group.create_group("a")
    _zarr_array(tmp_path / "g.zarr" / "a" / "raw", data)
    _zarr_array(tmp_path / "g.zarr" / "mean", data.mean(0))
    vol = open_volume(tmp_path / "g.zarr")
    assert vol.id.endswith("g.zarr:/a/raw")
    _zarr_array(tmp_path / "g.zarr" / "labels", data)
    with pytest.raises(ValueError, match=r"2 3-D datasets.*a/raw.*labels.*mean"):
        open_volume(tmp_path / "g.zarr")
    with pytest.raises(ValueError, match=r"no dataset 'nope'.*a/raw"):
        open_volume(str(tmp_path / "g.zarr") + ":/nope")
    with pytest.raises(ValueError, match="2-D"):
        open_volume(str(tmp_path / "g.zarr") + ":/mean")


# ---------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path: Path, data) -> None:
    (tmp_path / "vol.xyz").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"unknown volume format '\.xyz'.*Supported"):
        open_volume(tmp_path / "vol.xyz")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        open_volume(tmp_path / "missing.h5")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        open_volume(f"{tmp_path}/missing.h5:/raw")

    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a"], f["b/c"], f["flat"] = data, data, data[0]
    with pytest.raises(ValueError, match=r"2 3-D datasets.*/a .*/b/c .*/flat"):
        open_volume(tmp_path / "two.h5")
    with pytest.raises(ValueError, match=r"no dataset '/raw'.*/a \(5, 37, 23\)"):
        open_volume(f"{tmp_path}/two.h5:/raw")
    with pytest.raises(ValueError, match="2-D"):
        open_volume(f"{tmp_path}/two.h5:/flat")
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["flat"] = data[0]
    with pytest.raises(ValueError, match="no 3-D dataset"):
        open_volume(tmp_path / "flat.h5")

    np.save(tmp_path / "flat.npy", data[0])
    tifffile.imwrite(tmp_path / "flat.tif", data[0])
    _write_mrc(tmp_path / "flat.mrc", data[0].astype(np.int16))
    for name in ("flat.npy", "flat.tif", "flat.mrc"):
        with pytest.raises(ValueError, match=r"2-D .*expected a 3-D"):
            open_volume(tmp_path / name)
    np.save(tmp_path / "vol.npy", data)
    with pytest.raises(ValueError, match="takes no dataset key"):
        open_volume(f"{tmp_path}/vol.npy:/raw")
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tw:
        tw.write(data[0])
        tw.write(data[1, :20])
    with pytest.raises(ValueError, match="2 image series"):
        open_volume(tmp_path / "mixed.tif")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="axes"):
        open_volume(tmp_path / "rgb.tif")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no slices")
    with pytest.raises(ValueError, match="no .tif/.tiff/.png slices"):
        open_volume(empty)
    odd = tmp_path / "odd"
    odd.mkdir()
    tifffile.imwrite(odd / "0.tif", data[0])
    tifffile.imwrite(odd / "1.tif", data[1, :30])
    with pytest.raises(ValueError, match=r"inconsistent slice shapes.*1.tif is \(30, 23\)"):
        open_volume(odd)
    tifffile.imwrite(odd / "1.tif", data[1].astype(np.float32))
    with pytest.raises(ValueError, match="inconsistent slice dtypes"):
        open_volume(odd)
    tifffile.imwrite(odd / "1.tif", data[1])
    Image.fromarray(data[2]).save(odd / "2.png")
    with pytest.raises(ValueError, match="mixes TIFF and PNG"):
        open_volume(odd)


@pytest.mark.parametrize("rule", ["last", "max"])
def test_partial_patches_never_cover_known_labels_with_unknown(rule: str) -> None:
    """Scribble-mode patches hold unknown pixels; they say nothing where another patch has a label."""
    older = np.array([[1, 1, 255, 255]], np.uint8)  # painted on the left only
    newer = np.array([[255, 2, 2, 255]], np.uint8)  # overlaps the whole row, painted in the middle
    items = [(Patch("v", "z", 0, 0, 0, 1, 4), older, 0), (Patch("v", "z", 0, 0, 0, 1, 4), newer, 1)]
    out = stitch_patches((1, 1, 4), "z", items, 255, rule, order_key=lambda item: item[2], partial=True)
    assert out.labels[0, 0].tolist() == [1, 2, 2, 255] and out.coverage.all()
    with pytest.raises(ValueError, match="contain unknown_value"):
        stitch_patches((1, 1, 4), "z", items, 255, rule)
