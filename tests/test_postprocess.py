"""Blockwise 3-D connected components, size filter and object statistics (sdk.postprocess)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import ndimage

from sdk.postprocess import STATS_COLUMNS, connected_components, write_stats_csv


def run(volume: np.ndarray, **kwargs):
    ids = np.zeros(volume.shape, np.uint32)

    def write(z0: int, z1: int, block: np.ndarray) -> None:
        ids[z0:z1] = block

    result = connected_components(lambda z0, z1: volume[z0:z1], volume.shape, write=write, **kwargs)
    return result, ids


@pytest.fixture
def hand_made() -> np.ndarray:
    """Class 1: a box, a U whose arms only meet in the last slice, a diagonal pair, a lone voxel;
    class 2: a bar touching the box (must stay separate)."""
    v = np.zeros((6, 12, 20), np.uint8)
    v[1:3, 2:5, 3:7] = 1  # box: 2 x 3 x 4 = 24 voxels
    v[0:6, 8, 10] = 1  # U: left arm ...
    v[0:6, 8, 14] = 1  # ... right arm ...
    v[5, 8, 10:15] = 1  # ... joined at z = 5 only
    v[2, 10, 1] = 1  # diagonal pair: one object with 26-connectivity, two with 6
    v[3, 11, 2] = 1
    v[4, 0, 19] = 1  # a lone voxel
    v[1:3, 5, 3:7] = 2  # class 2 bar, face-adjacent to the box
    return v


@pytest.mark.parametrize("block", [1, 2, 4, 6, 50])
@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_matches_whole_volume_labelling_for_any_block_size(block, connectivity):
    volume = (np.random.default_rng(3).random((9, 31, 27)) > 0.62).astype(np.uint8)
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    expected, n = ndimage.label(volume, ndimage.generate_binary_structure(3, rank))
    result, ids = run(volume, connectivity=connectivity, block=block)
    np.testing.assert_array_equal(ids, expected)
    assert len(result.objects) == n
    assert [o.voxels for o in result.objects] == np.bincount(expected.ravel())[1:].tolist()
    centroids = ndimage.center_of_mass(volume, expected, range(1, n + 1))
    np.testing.assert_allclose([o.centroid for o in result.objects], centroids, rtol=0, atol=1e-9)
    boxes = ndimage.find_objects(expected)
    assert [o.bbox_min for o in result.objects] == [tuple(s.start for s in b) for b in boxes]
    assert [o.bbox_max for o in result.objects] == [tuple(s.stop for s in b) for b in boxes]


def test_hand_made_objects(hand_made):
    result, ids = run(hand_made, connectivity=6, block=2)
    by_class = [(o.class_id, o.voxels) for o in result.objects]
    # raster order of first voxel within class 1: U (z=0), box (z=1), diagonal halves (z=2, z=3), lone voxel
    assert by_class == [(1, 6 + 6 + 3), (1, 24), (1, 1), (1, 1), (1, 1), (2, 8)]
    box = result.objects[1]
    assert (box.bbox_min, box.bbox_max) == ((1, 2, 3), (3, 5, 7))
    assert box.centroid == pytest.approx((1.5, 3.0, 4.5))
    u = result.objects[0]
    assert (u.bbox_min, u.bbox_max) == ((0, 8, 10), (6, 9, 15))
    assert set(np.unique(ids[hand_made == 2])) == {6}, "class 2 never joins the touching class 1 box"
    assert np.all((ids > 0) == (hand_made > 0))


def test_connectivity_26_joins_diagonals_and_size_filter_removes(hand_made):
    result, ids = run(hand_made, connectivity=26, block=1, min_size=2)
    assert [(o.class_id, o.voxels) for o in result.objects] == [(1, 15), (1, 24), (1, 2), (2, 8)]
    assert result.removed == 1  # the lone voxel
    assert ids[4, 0, 19] == 0
    assert ids[2, 10, 1] == ids[3, 11, 2] == 3
    assert list(np.unique(ids)) == [0, 1, 2, 3, 4]


def test_classes_restricts_objects(hand_made):
    result, ids = run(hand_made, classes=[2])
    assert [(o.label, o.class_id, o.voxels) for o in result.objects] == [(1, 2, 8)]
    assert np.all((ids > 0) == (hand_made == 2))


def test_stats_csv(tmp_path, hand_made):
    result, _ = run(hand_made, min_size=2)
    path = tmp_path / "objects.csv"
    write_stats_csv(path, result.objects, (40.0, 4.0, 4.0), ["background", "mito", "vesicle"])
    rows = list(csv.DictReader(path.open()))
    assert tuple(rows[0]) == STATS_COLUMNS
    assert len(rows) == len(result.objects)
    box = rows[1]
    assert (box["label"], box["class"], box["class_name"], box["voxels"]) == ("2", "1", "mito", "24")
    assert float(box["volume_um3"]) == pytest.approx(24 * 40 * 4 * 4 * 1e-9)
    assert [box[f"bbox_{a}0"] for a in "zyx"] == ["1", "2", "3"]
    assert [box[f"bbox_{a}1"] for a in "zyx"] == ["3", "5", "7"]
    assert [float(box[f"centroid_{a}"]) for a in "zyx"] == [1.5, 3.0, 4.5]
    assert rows[-1]["class_name"] == "vesicle"
    write_stats_csv(path, result.objects, (None, 4.0, 4.0))
    assert {row["volume_um3"] for row in csv.DictReader(path.open())} == {""}, "unknown z size: no volume"


def test_bad_input():
    volume = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(lambda a, b: volume[a:b], volume.shape, connectivity=8)
    with pytest.raises(ValueError, match="background"):
        connected_components(lambda a, b: volume[a:b], volume.shape, classes=[0, 1])
    with pytest.raises(ValueError, match="integers"):
        connected_components(lambda a, b: volume[a:b].astype(float), volume.shape)
    with pytest.raises(ValueError, match="shape"):
        connected_components(lambda a, b: volume[a:b, :2], volume.shape)
    empty = connected_components(lambda a, b: volume[a:b], volume.shape)
    assert empty.objects == [] and empty.removed == 0
