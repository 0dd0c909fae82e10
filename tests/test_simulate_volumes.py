"""scripts/simulate.py --raw/--labels end to end on tiny synthetic volumes, and load_vnc unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ml_backend.experiments.simulation_setup import SimConfig, load_vnc
from sdk.tiling import open_volume

from .helpers import MITO, labelled_volume

REPO = Path(__file__).resolve().parents[1]
VNC = REPO.parent / "shared" / "data" / "vnc"
STRATEGIES = ("random", "entropy", "ceal")  # ceal: argmax pseudo-labels of a multi-class net
TINY = [
    "--strategies", ",".join(STRATEGIES), "--seeds", "1", "--rounds", "1", "--pool", "12", "--initial", "4",
    "--batch", "2", "--patch", "32", "--base-channels", "4", "--depth", "2", "--initial-steps", "6",
    "--round-steps", "4", "--full-steps", "6", "--val-patches", "2", "--mc-samples", "2", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def hdf5(tmp_path_factory) -> Path:
    """One file, 16-bit raw and multi-class labels."""
    raw, labels = labelled_volume()
    path = tmp_path_factory.mktemp("hdf5") / "em.h5"
    with h5py.File(path, "w") as f:
        f["raw"], f["labels"] = raw.astype(np.uint16) * 257, labels
    return path


@pytest.fixture(scope="module")
def la_folders(tmp_path_factory) -> tuple[Path, Path]:
    """Raw and mitochondria masks (0/255) as folders of greyscale+alpha PNGs."""
    raw, labels = labelled_volume()
    root = tmp_path_factory.mktemp("la")
    for name, volume in (("raw", raw), ("labels", np.where(labels == MITO, 255, 0).astype(np.uint8))):
        (root / name).mkdir()
        for z, plane in enumerate(volume):
            pair = np.stack([plane, np.full_like(plane, 255)], axis=-1)
            Image.fromarray(pair, "LA").save(root / name / f"slice{z:02d}.png")
    return root / "raw", root / "labels"


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def check_results(out: Path, n_classes: int) -> dict:
    """Every row of the run, a network with `n_classes` outputs; returns config.json."""
    keys = {(r["strategy"], r["seed"], r["round"]) for r in rows(out)}
    assert keys == {(s, 0, r) for s in STRATEGIES for r in (0, 1)} | {("full", 0, 0)}
    assert all(0.0 <= r["iou"] <= 1.0 for r in rows(out))
    for strategy in STRATEGIES:
        state = torch.load(out / "state" / "seed0" / f"{strategy}.pt", weights_only=False)
        assert state["state_dict"]["head.weight"].shape[0] == n_classes
    return json.loads((out / "config.json").read_text())


def test_multi_class_hdf5_in_worker_processes(simulate, hdf5, tmp_path, capsys, one_torch_thread):
    out = tmp_path / "sim"
    data = ["--raw", f"{hdf5}:/raw", "--labels", f"{hdf5}:/labels", "--out", str(out)]
    args = [*TINY, *data, "--classes", "mito=7,vesicles=300"]  # MEMBRANE (5) is background
    assert simulate.main([*args, "--jobs", "2"]) == 0  # the workers load the volumes themselves
    config = check_results(out, n_classes=3)
    assert config["classes"] == "mito=7,vesicles=300"
    # Recorded relative to the results folder, so a copy of both elsewhere still resumes.
    assert (out / config["raw"]).resolve() == Path(f"{hdf5.resolve()}:/raw")
    assert (out / config["labels"]).resolve() == Path(f"{hdf5.resolve()}:/labels")

    before = (out / "results.jsonl").read_text()
    assert simulate.main([*args, "--jobs", "1", "--classes", " mito = 7 ,vesicles=300"]) == 0  # same classes
    assert (out / "results.jsonl").read_text() == before
    capsys.readouterr()
    for other in (["--classes", "organelles=7+300"], []):  # merged; default (one class per value)
        assert simulate.main([*TINY, *data, *other, "--jobs", "1"]) == 2
        assert "differs in classes" in capsys.readouterr().err


def test_greyscale_alpha_png_folders(simulate, la_folders, tmp_path, one_torch_thread):
    out = tmp_path / "sim"
    raw, labels = la_folders
    data = ["--raw", str(raw), "--labels", str(labels), "--out", str(out)]
    assert simulate.main([*TINY, *data, "--jobs", "1"]) == 0
    assert check_results(out, n_classes=2)["classes"] == "255=255"  # no --classes: one class per value


def test_usage_and_data_errors(simulate, hdf5, tmp_path, capsys):
    raw, labels = f"{hdf5}:/raw", f"{hdf5}:/labels"
    np.save(tmp_path / "short.npy", np.zeros((4, 120, 128), np.uint8))
    cases = [
        (["--raw", raw], "--raw and --labels go together"),
        (["--labels", labels], "--raw and --labels go together"),
        (["--classes", "mito=7"], "--classes needs --raw and --labels"),
        (["--data", str(VNC), "--raw", raw, "--labels", labels], "either --data or --raw/--labels"),
        (["--raw", raw, "--labels", labels, "--classes", "mito=7,mito=300"], "'mito' appears twice"),
        (["--raw", raw, "--labels", labels, "--classes", "glia=159"], "no voxel"),
        (["--raw", raw, "--labels", str(tmp_path / "short.npy")], "(4, 128, 128) and labels"),
    ]
    for args, message in cases:
        assert simulate.main([*TINY, *args, "--out", str(tmp_path / "never"), "--jobs", "1"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("simulate.py: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(not (VNC / "stack1" / "mitochondria").is_dir(), reason=f"VNC data not found at {VNC}")
def test_load_vnc_gives_the_binarised_mitochondria():
    data = load_vnc(VNC, SimConfig(sections=2, crop=256, patch=64))
    with open_volume(VNC / "stack1" / "raw") as raw, open_volume(VNC / "stack1" / "mitochondria") as mito:
        image, mask = raw[:2, :256, :256], (mito[:2, :256, :256] > 0).astype(np.uint8)
    np.testing.assert_array_equal(data.train_raw, image[:, :128])
    np.testing.assert_array_equal(data.train_mask, mask[:, :128])
    np.testing.assert_array_equal(np.stack(data.test_images), image[:, 128:])
    np.testing.assert_array_equal(np.stack(data.test_masks), mask[:, 128:])
    assert data.classes == ["mitochondria"] and data.source["classes"] == "mitochondria=1-255"
