"""sdk.labelled_volume: any labelled volume, read region-only, mapped to classes, split along y."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from PIL import Image

from sdk.labelled_volume import load_labelled_volume
from sdk.tiling import parse_classes

from .helpers import MEMBRANE, MITO, VESICLE, labelled_volume


def test_formats_dtypes_and_explicit_classes(tmp_path: Path) -> None:
    raw, labels = labelled_volume(3, 64)
    raw16 = raw.astype(np.uint16) * 200
    np.save(tmp_path / "raw.npy", raw16)
    store = zarr.open_array(str(tmp_path / "labels.zarr"), mode="w", shape=labels.shape, dtype=labels.dtype)
    store[...] = labels
    data = load_labelled_volume(
        tmp_path / "raw.npy", tmp_path / "labels.zarr", parse_classes("mito=7,vesicles=300")
    )
    assert data.classes == ["mito", "vesicles"]
    assert data.train_raw.dtype == np.uint16 and data.train_raw.shape == (3, 32, 64)
    np.testing.assert_array_equal(data.train_raw, raw16[:, :32])
    expected = np.select([labels == MITO, labels == VESICLE], [1, 2], 0)  # MEMBRANE: no class
    np.testing.assert_array_equal(data.train_mask, expected[:, :32])
    assert len(data.test_images) == 3 and data.test_images[2].shape == (32, 64)
    np.testing.assert_array_equal(data.test_masks[1], expected[1, 32:])
    assert data.source == {
        "raw": str((tmp_path / "raw.npy").resolve()),
        "labels": str((tmp_path / "labels.zarr").resolve()),
        "classes": "mito=7,vesicles=300",
    }


def test_hdf5_float_raw_and_default_classes(tmp_path: Path) -> None:
    raw, labels = labelled_volume(3, 64)
    with h5py.File(tmp_path / "em.h5", "w") as f:
        f["raw"] = raw.astype(np.float32) / 255
        f["labels"] = labels.astype(np.uint16)
    data = load_labelled_volume(f"{tmp_path}/em.h5:/raw", f"{tmp_path}/em.h5:/labels", crop=48)
    assert data.classes == ["5", "7", "300"]  # sorted values, named by value
    assert data.source["classes"] == "5=5,7=7,300=300"
    assert data.train_raw.dtype == np.float32 and data.train_raw.shape == (3, 24, 48)
    crop = labels[:, :48, :48]
    expected = np.select([crop == MEMBRANE, crop == MITO, crop == VESICLE], [1, 2, 3], 0)
    np.testing.assert_array_equal(np.stack(data.test_masks), expected[:, 24:])


def test_reads_only_the_sections_needed(tmp_path: Path, monkeypatch) -> None:
    import sdk.tiling.readers.folder as folder

    raw, labels = labelled_volume(5, 64)
    for name, vol in (("raw", raw), ("labels", (labels == MITO).astype(np.uint8) * 255)):
        (tmp_path / name).mkdir()
        for z, plane in enumerate(vol):
            Image.fromarray(plane).save(tmp_path / name / f"{z}.png")
    read = []
    original = folder.read_slice
    monkeypatch.setattr(folder, "read_slice", lambda path: read.append(path.name) or original(path))
    data = load_labelled_volume(tmp_path / "raw", tmp_path / "labels", sections=2, crop=40)
    assert sorted(read) == ["0.png", "0.png", "1.png", "1.png"]
    assert data.classes == ["255"] and data.train_mask.shape == (2, 20, 40)


def test_bad_labelled_volume(tmp_path: Path) -> None:
    raw, labels = labelled_volume(3, 64)
    np.save(tmp_path / "raw.npy", raw)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "short.npy", labels[:, :60])
    with pytest.raises(ValueError, match=r"raw .*raw.npy \(3, 64, 64\) and labels .*short.npy \(3, 60, 64\)"):
        load_labelled_volume(tmp_path / "raw.npy", tmp_path / "short.npy")
    with pytest.raises(ValueError, match=r"no voxel .* falls in a class \(glia=159\)"):
        load_labelled_volume(tmp_path / "raw.npy", tmp_path / "labels.npy", parse_classes("glia=159"))
    with pytest.raises(ValueError, match="query half 32x64 is smaller than a 64 patch"):
        load_labelled_volume(tmp_path / "raw.npy", tmp_path / "labels.npy", patch=64)
    with pytest.raises(ValueError, match="must be >= 0"):
        load_labelled_volume(tmp_path / "raw.npy", tmp_path / "labels.npy", sections=-1)
    np.save(tmp_path / "flat.npy", labels[0])
    with pytest.raises(ValueError, match="expected a 3-D"):
        load_labelled_volume(tmp_path / "raw.npy", tmp_path / "flat.npy")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        load_labelled_volume(tmp_path / "raw.npy", tmp_path / "missing.h5:/labels")
