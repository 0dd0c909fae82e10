"""sdk.tiling indexing, grid, intensity and stitching on synthetic arrays (no files, no optional deps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdk.tiling import (
    ArrayVolume,
    IntensityRange,
    PagedVolume,
    Patch,
    estimate_intensity_range,
    grid_count,
    grid_starts,
    patch_grid,
    read_patch,
    stitch_patches,
    to_uint8,
)
from sdk.tiling.indexing import split_key


def _volume(shape=(5, 37, 23), dtype=np.uint16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=shape).astype(dtype)


# ---------------------------------------------------------------- indexing


KEYS = [
    0,
    -1,
    (1, 2, 3),
    (slice(None), 5),
    (..., 4),
    (1, ..., slice(2, 9, 3)),
    (slice(None, None, -1),),
    (slice(4, 0, -2), slice(30, 3, -7), -3),
    (slice(3, 3),),
    ([3, 0, 3],),
    (2, [1, 5, 1], slice(None)),
    (slice(1, 4), 3, [0, -1]),
    (np.array([True, False, True, False, True]),),
    ([1, 2], [3, 4]),
    (1, slice(None), [2, 0]),
    (None, 2),
    (np.int64(2), np.array(3)),
]


@pytest.mark.parametrize("key", KEYS, ids=[repr(k) for k in KEYS])
def test_volume_indexing_matches_numpy(key) -> None:
    data = _volume()
    pages = PagedVolume(lambda z: data[z], data.shape, data.dtype, "mem")
    for vol in (ArrayVolume(data, "mem"), pages):
        got = vol[key]
        np.testing.assert_array_equal(got, data[key])
        assert np.shape(got) == data[key].shape


def test_split_key_reads_only_the_bounding_box() -> None:
    storage, post = split_key((slice(None, None, -1), [7, 2], 3), (4, 10, 6))
    assert storage == (slice(0, 4, 1), slice(2, 8), slice(3, 4))
    assert post is not None
    assert split_key((1, slice(2, 5)), (4, 10, 6)) == ((1, slice(2, 5, 1), slice(0, 6, 1)), None)


@pytest.mark.parametrize("key", [(5,), (0, 37), ([0, 9],), (0, 0, 0, 0), (..., ...), ("a",)])
def test_volume_indexing_errors(key) -> None:
    with pytest.raises(IndexError):
        ArrayVolume(_volume(), "mem")[key]


# ---------------------------------------------------------------- grid


def test_grid_starts_border_rule() -> None:
    assert grid_starts(10, 4, 4) == [0, 4, 6]  # last patch shifted back to end at 10
    assert grid_starts(12, 4, 4) == [0, 4, 8]  # exact fit: no extra patch
    assert grid_starts(10, 4, 3) == [0, 3, 6]
    assert grid_starts(4, 4, 1) == [0]


@pytest.mark.parametrize("axis", ["z", "y", "x"])
@pytest.mark.parametrize(("size", "stride"), [(4, None), (5, 3), ((3, 7), (2, 7)), ((6, 1), 1), (7, (7, 2))])
def test_grid_covers_every_pixel_with_full_patches(axis, size, stride) -> None:
    shape = (7, 17, 11)
    patches = patch_grid(shape, axis, size, stride, volume_id="v")
    assert len(patches) == grid_count(shape, axis, size, stride=stride)
    hits = np.zeros(shape, dtype=int)
    for p in patches:
        assert p.fits(shape) and p.axis == axis and p.volume_id == "v"
        assert hits[p.region()].shape == (p.height, p.width)
        hits[p.region()] += 1
    assert hits.min() >= 1
    if stride is None:  # no overlap except the shifted border patches
        assert len(patches) == grid_count(shape, axis, size)


def test_grid_slices_and_step() -> None:
    shape = (10, 8, 8)
    assert {p.slice_index for p in patch_grid(shape, "z", 4, slice_step=3)} == {0, 3, 6, 9}
    assert grid_count(shape, "z", 4, slice_step=3) == 4 * 4
    sel = patch_grid(shape, "x", 4, slices=[7, 2])
    assert [p.slice_index for p in sel[::6]] == [7, 2]
    assert len(sel) == grid_count(shape, "x", 4, slices=[7, 2]) == 2 * 3 * 2


def test_patch_dict_round_trip() -> None:
    p = Patch("/data/vol.h5:/raw", "y", 3, 10, 20, 64, 32)
    d = json.loads(json.dumps(p.to_dict()))
    assert d == {
        "volume_id": "/data/vol.h5:/raw",
        "axis": "y",
        "slice_index": 3,
        "y": 10,
        "x": 20,
        "height": 64,
        "width": 32,
    }
    assert Patch.from_dict({**d, "image": "/data/upload/1.png"}) == p
    assert Patch.from_dict(p.to_dict(prefix="patch_"), prefix="patch_") == p
    with pytest.raises(ValueError, match="width"):
        Patch.from_dict({k: v for k, v in d.items() if k != "width"})
    with pytest.raises(ValueError, match="axis"):
        Patch.from_dict({**d, "axis": "t"})


def test_read_patch_every_axis() -> None:
    data = _volume()
    vol = ArrayVolume(data, "mem")
    for p in patch_grid(vol.shape, "y", (3, 5), volume_id=vol.id):
        np.testing.assert_array_equal(read_patch(vol, p), data[p.y : p.y + 3, p.slice_index, p.x : p.x + 5])
    assert patch_grid(vol, "z", 8)[0].volume_id == "mem"
    assert patch_grid(vol, "z", 8, volume_id="other")[0].volume_id == "other"
    assert grid_count(vol, "z", 8) == len(patch_grid(vol, "z", 8))
    p = Patch("mem", "x", 22, 1, 30, 4, 7)
    np.testing.assert_array_equal(read_patch(data, p), data[1:5, 30:37, 22])
    with pytest.raises(ValueError, match="does not fit"):
        read_patch(vol, Patch("mem", "x", 23, 0, 0, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"axis": "w"}, "axis must be one of"),
        ({"patch_size": 40}, "larger than the z-slice plane"),
        ({"axis": "y", "patch_size": (6, 4)}, "larger than the y-slice plane"),
        ({"stride": 9}, "leave gaps"),
        ({"patch_size": 0}, "positive int"),
        ({"patch_size": (4, 4, 4)}, r"\(h, w\) pair"),
        ({"slice_step": 0}, "slice_step"),
        ({"slices": [0, 5]}, "outside"),
        ({"slices": [0], "slice_step": 2}, "either"),
    ],
)
def test_grid_errors(kwargs, match) -> None:
    args = {"shape_zyx": (5, 37, 23), "axis": "z", "patch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        patch_grid(**args)
    with pytest.raises(ValueError, match=match):
        grid_count(**args)


def test_grid_rejects_2d_shape() -> None:
    with pytest.raises(ValueError, match="3-D"):
        patch_grid((37, 23), "z", 8)


# ---------------------------------------------------------------- intensity


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])
def test_intensity_any_dtype(dtype) -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(12, 40, 40))
    scale = {np.uint8: 30, np.uint16: 9000, np.int16: 5000, np.int32: 1e6}.get(dtype, 1e-3)
    offset = {np.uint8: 128, np.uint16: 30000, np.float32: -7e-3, np.float64: -7e-3}.get(dtype, 0)
    data = np.clip(
        base * scale + offset,
        *((np.iinfo(dtype).min, np.iinfo(dtype).max) if np.dtype(dtype).kind in "iu" else (-np.inf, np.inf)),
    ).astype(dtype)
    rng_ = estimate_intensity_range(data, sample_slices=12)
    lo, hi = rng_
    assert isinstance(rng_, IntensityRange) and lo < hi
    assert lo == pytest.approx(np.percentile(data, 0.5)) and hi == pytest.approx(np.percentile(data, 99.5))
    u8 = to_uint8(data, lo, hi)
    assert u8.dtype == np.uint8 and u8.shape == data.shape
    assert u8.min() == 0 and u8.max() == 255
    assert 0.004 < (u8 == 0).mean() < 0.02 and 0.004 < (u8 == 255).mean() < 0.02


def test_to_uint8_mapping() -> None:
    a = np.array([-5.0, 0.0, 40.0, 100.0, 1e9, np.nan, np.inf, -np.inf])
    np.testing.assert_array_equal(to_uint8(a, 0, 100), [0, 0, 102, 255, 255, 0, 255, 0])
    v = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(v, 0, 255), v)
    np.testing.assert_array_equal(to_uint8(v.astype(np.uint16) * 257, 0, 65535), v)
    np.testing.assert_array_equal(to_uint8(np.array([3, 4, 5]), 4, 4), [0, 0, 255])
    with pytest.raises(ValueError, match="complex"):
        to_uint8(np.zeros(3, dtype=complex), 0, 1)


def test_intensity_sampling_is_seeded_and_partial() -> None:
    data = _volume(shape=(30, 16, 16))
    vol = PagedVolume(lambda z: data[z], data.shape, data.dtype, "mem", cache_bytes=0)
    r1 = estimate_intensity_range(vol, sample_slices=4, seed=3)
    assert vol.pages_read == 4 and len(r1.sample_slices) == 4
    assert estimate_intensity_range(vol, sample_slices=4, seed=3) == r1
    assert r1.to_dict()["intensity_sample_slices"] == list(r1.sample_slices)
    assert estimate_intensity_range(data, sample_slices=99).sample_slices == tuple(range(30))


def test_intensity_edge_cases() -> None:
    nan = np.full((3, 4, 4), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="no finite values"):
        estimate_intensity_range(nan)
    nan[1, 0, 0] = 2.0
    assert tuple(estimate_intensity_range(nan)) == (2.0, 2.0)
    with pytest.raises(ValueError, match="low < high"):
        estimate_intensity_range(nan, low=50, high=10)
    with pytest.raises(ValueError, match="3-D"):
        estimate_intensity_range(np.zeros((4, 4)))
    big = np.zeros((2, 2000, 1000), dtype=np.uint8)
    big[:, ::2, ::2] = 1  # a strided sub-grid still sees representative pixels
    assert estimate_intensity_range(big, max_pixels_per_slice=1000).hi == 1.0


# ---------------------------------------------------------------- stitching


def test_stitch_rules_and_order() -> None:
    shape = (2, 4, 6)
    a = Patch("v", "z", 0, 0, 0, 4, 4)
    b = Patch("v", "z", 0, 0, 2, 4, 4)
    ones, twos = np.ones((4, 4), np.uint8), np.full((4, 4), 2, np.uint8)
    labels, cov = stitch_patches(shape, "z", [(b, twos), (a, ones)])
    assert (labels[0, :, :2] == 1).all() and (labels[0, :, 2:4] == 1).all()
    assert (labels[0, :, 4:] == 2).all()
    assert (labels[1] == 255).all() and cov[0].all() and not cov[1].any()
    # order_key: the item with the larger key wins the overlap regardless of input order
    items = [(a, ones, 20), (b, twos, 10)]
    assert (stitch_patches(shape, "z", items, order_key=lambda it: it[2]).labels[0, :, 2:4] == 1).all()
    assert (stitch_patches(shape, "z", items[::-1]).labels[0, :, 2:4] == 1).all()
    for order in (items, items[::-1]):
        assert (stitch_patches(shape, "z", order, rule="max").labels[0, :, 2:4] == 2).all()


def test_stitch_other_axes_unknown_and_custom_out(tmp_path: Path) -> None:
    truth = np.random.default_rng(0).integers(0, 3, size=(6, 9, 8)).astype(np.uint8)
    for axis in "yx":
        patches = patch_grid(truth.shape, axis, (4, 5), (3, 2), slices=[1, 4])
        out = np.lib.format.open_memmap(tmp_path / f"{axis}.npy", "w+", np.uint8, truth.shape)
        cov_out = np.zeros(truth.shape, dtype=bool)
        labels, cov = stitch_patches(
            truth.shape,
            axis,
            ((p, truth[p.region()]) for p in patches),
            unknown_value=7,
            out=out,
            coverage_out=cov_out,
        )
        assert labels is out and cov is cov_out
        sel = [slice(None)] * 3
        sel["zyx".index(axis)] = [1, 4]
        np.testing.assert_array_equal(out[tuple(sel)], truth[tuple(sel)])
        assert cov[tuple(sel)].all() and cov.sum() == cov[tuple(sel)].size
        assert (out[~cov] == 7).all()


@pytest.mark.parametrize(
    ("item", "kwargs", "match"),
    [
        ((Patch("v", "z", 0, 0, 0, 2, 2), np.zeros((2, 3))), {}, "does not match"),
        ((Patch("v", "z", 0, 0, 0, 2, 2), np.full((2, 2), 255)), {}, "unknown_value"),
        ((Patch("v", "z", 0, 0, 0, 2, 2), np.full((2, 2), 300)), {}, "cannot hold"),
        ((Patch("v", "y", 0, 0, 0, 2, 2), np.zeros((2, 2))), {}, "axis 'y'"),
        ((Patch("v", "z", 3, 0, 0, 2, 2), np.zeros((2, 2))), {}, "does not fit"),
        (("not a patch", np.zeros((2, 2))), {}, "start with a Patch"),
        ((Patch("v", "z", 0, 0, 0, 2, 2), np.zeros((2, 2))), {"rule": "vote"}, "rule"),
        ((Patch("v", "z", 0, 0, 0, 2, 2), np.zeros((2, 2))), {"unknown_value": -1}, "fit"),
        ((Patch("v", "z", 0, 0, 0, 2, 2), np.zeros((2, 2))), {"out": np.zeros((3, 4))}, "shape"),
    ],
)
def test_stitch_errors(item, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        stitch_patches((3, 4, 4), "z", [item], **kwargs)


def test_stitch_rejects_mixed_volumes() -> None:
    items = [(Patch(v, "z", 0, 0, 0, 2, 2), np.zeros((2, 2))) for v in ("a", "b")]
    with pytest.raises(ValueError, match="several volumes"):
        stitch_patches((1, 2, 2), "z", items)
