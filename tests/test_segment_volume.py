"""scripts/segment_volume.py: RQ workers give the in-process result, runs resume, outputs and errors.

Every run is a real subprocess of the script (as a user runs it); outputs are compared exactly.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from ml_backend.learner.volume_segmentation import SegmentationPlan, cached_network, segment_plane
from sdk.postprocess import connected_components
from sdk.synthetic import synthetic_em
from sdk.tiling import open_volume

from .helpers import publish, train_small_net

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "segment_volume.py"
N_SLICES, SIZE = 12, 160
FAST = ["--tile", "128", "--overlap", "16", "--no-progress"]  # 160 px slices: 4 blended tiles each


def segment(*args: object, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def markers(out: Path) -> dict[str, dict]:
    done = Path(f"{out}.progress") / "done"
    return {p.name: json.loads(p.read_text()) for p in sorted(done.glob("*.json"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("segment-volume")
    # 16-bit volume using a fraction of its range: the intensity window matters.
    volume = np.stack([synthetic_em(SIZE, SIZE, seed=50 + z)[0] for z in range(N_SLICES)]).astype(np.uint16)
    np.save(root / "volume.npy", volume * 37 + 1000)
    models = root / "models"
    version = publish(train_small_net(), models, 7)
    checkpoint = next((models / "project-7").glob(f"*/{version.file}"))
    reference = root / "reference.zarr"
    segment(root / "volume.npy", "--out", reference, "--checkpoint", checkpoint, "--output", "probs",
            "--chunk-slices", 1, *FAST)  # fmt: skip
    return {"root": root, "volume": root / "volume.npy", "models": models, "checkpoint": checkpoint,
            "reference": zarr.open_array(str(reference), mode="r")[:]}  # fmt: skip


@pytest.mark.integration
def test_two_rq_workers_give_the_in_process_result(data, tmp_path, redis_url, worker_factory):
    queue = f"emloop-segment-test-{uuid.uuid4().hex[:8]}"
    workers = [worker_factory({"RQ_QUEUE": queue}) for _ in range(2)]
    out = tmp_path / "rq.zarr"
    t0 = time.monotonic()
    proc = segment(data["volume"], "--out", out, "--project", 7, "--model-dir", data["models"],
                   "--output", "probs", "--chunk-slices", 1, "--workers-queue", queue,
                   "--redis-url", redis_url, *FAST)  # fmt: skip
    print(f"RQ run: {time.monotonic() - t0:.1f} s")
    assert f"{N_SLICES} to compute on RQ" in proc.stderr
    result = zarr.open_array(str(out), mode="r")
    assert result.shape == (2, N_SLICES, SIZE, SIZE) and result.dtype == np.uint8
    np.testing.assert_array_equal(result[:], data["reference"])
    done = markers(out)
    assert len(done) == N_SLICES
    assert {m["pid"] for m in done.values()} == {w.pid for w in workers}, "both workers should take blocks"
    # Everything done: a second submission enqueues nothing.
    again = segment(data["volume"], "--out", out, "--project", 7, "--model-dir", data["models"],
                    "--output", "probs", "--chunk-slices", 1, "--workers-queue", queue,
                    "--redis-url", redis_url, *FAST)  # fmt: skip
    assert f"{N_SLICES} already done, 0 to compute" in again.stderr


def test_killed_run_resumes_without_recomputing_finished_blocks(data, tmp_path):
    out = tmp_path / "killed.zarr"
    argv = [sys.executable, str(SCRIPT), data["volume"], "--out", out, "--checkpoint", data["checkpoint"],
            "--output", "probs", "--chunk-slices", 1, *FAST]  # fmt: skip
    proc = subprocess.Popen(list(map(str, argv)), cwd=REPO, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not markers(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = markers(out)
    assert 1 <= len(before) < N_SLICES, f"kill came too late or too early: {len(before)} blocks done"

    resumed = segment(*argv[2:])
    assert f"{len(before)} already done, {N_SLICES - len(before)} to compute" in resumed.stderr
    after = markers(out)
    assert len(after) == N_SLICES
    assert {name: after[name] for name in before} == before, "finished blocks must not be recomputed"
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[:], data["reference"])


def test_lost_block_is_the_only_one_recomputed(data, tmp_path):
    """Blocks of 5 slices (12 = 5 + 5 + 2) give the same values as blocks of 1; a block whose marker
    is gone is computed again, the others are left alone."""
    out = tmp_path / "partial.zarr"
    args = [data["volume"], "--out", out, "--checkpoint", data["checkpoint"], "--output", "probs",
            "--chunk-slices", 5, *FAST]  # fmt: skip
    segment(*args)
    first = markers(out)
    assert list(first) == ["0000000-0000005.json", "0000005-0000010.json", "0000010-0000012.json"]
    (Path(f"{out}.progress") / "done" / "0000005-0000010.json").unlink()
    zarr.open_array(str(out), mode="r+")[:, 5:10] = 0
    proc = segment(*args)
    assert "1 to compute" in proc.stderr
    second = markers(out)
    assert second["0000000-0000005.json"] == first["0000000-0000005.json"]
    assert second["0000010-0000012.json"] == first["0000010-0000012.json"]
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[:], data["reference"])
    # Other settings on the same output are refused rather than mixed in.
    clash = segment(*[a if a != 5 else 4 for a in args], check=False)
    assert clash.returncode == 2 and "chunk_slices" in clash.stderr


def test_tiff_output_across_y_and_post_processing(data, tmp_path):
    out, stats, instances = tmp_path / "labels.tif", tmp_path / "objects.csv", tmp_path / "instances.zarr"
    segment(data["volume"], "--out", out, "--checkpoint", data["checkpoint"], "--axis", "y",
            "--chunk-slices", 32, "--stats", stats, "--instances", instances, "--min-size", 20,
            "--connectivity", 26, "--voxel-size", 40, 4, 4, *FAST)  # fmt: skip
    with open_volume(out) as vol:
        labels = vol[:]
    assert labels.shape == (N_SLICES, SIZE, SIZE) and set(np.unique(labels)) == {0, 1}

    # One y-slice recomputed here: orientation and values match the script's.
    plan = SegmentationPlan.from_dict(json.loads((Path(f"{out}.progress") / "plan.json").read_text()))
    net = cached_network(str(data["checkpoint"]), plan.checkpoint_sha256, torch.device("cpu"))
    with open_volume(data["volume"]) as vol:
        expected = segment_plane(net, vol[:, 37, :], plan.window, "labels", tile=128, overlap=16)
    np.testing.assert_array_equal(labels[:, 37, :], expected)

    ids = zarr.open_array(str(instances), mode="r")[:]
    reference = connected_components(
        lambda a, b: labels[a:b], labels.shape, connectivity=26, min_size=20, block=5
    )
    rows = list(csv.DictReader(stats.open()))
    assert len(rows) == len(reference.objects) >= 1
    assert [int(r["voxels"]) for r in rows] == [o.voxels for o in reference.objects]
    assert all(int(r["voxels"]) >= 20 for r in rows)
    assert float(rows[0]["volume_um3"]) == pytest.approx(int(rows[0]["voxels"]) * 640e-9)
    assert rows[0]["class_name"] == "Mitochondria"
    np.testing.assert_array_equal(np.bincount(ids.ravel())[1:], [o.voxels for o in reference.objects])


@pytest.fixture
def bad_inputs(tmp_path: Path) -> Path:
    np.save(tmp_path / "flat.npy", np.zeros((64, 64), np.uint8))
    (tmp_path / "volume.xyz").write_bytes(b"\0" * 64)
    with h5py.File(tmp_path / "volume.h5", "w") as f:
        f["raw"] = np.zeros((2, 32, 32), np.uint8)
    return tmp_path


@pytest.mark.parametrize(
    ("volume", "extra", "expected"),
    [
        ("volume.xyz", [], "unknown volume format"),
        ("volume.h5:/nope", [], "nope"),
        ("flat.npy", [], "3-D"),
        ("missing.npy", [], "no such file"),
        ("volume.h5:/raw", ["--out", "out.png"], "unknown output format"),
        ("volume.h5:/raw", ["--checkpoint", "missing.pt"], "cannot read checkpoint"),
        ("volume.h5:/raw", ["--tile", "64", "--overlap", "64"], "--overlap"),
        ("volume.h5:/raw", ["--axis", "w"], "invalid choice"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(data, bad_inputs, volume, extra, expected):
    args = [bad_inputs / volume, "--out", bad_inputs / "out.zarr", "--checkpoint", data["checkpoint"], *extra]
    args = [bad_inputs / a if a in ("out.png", "missing.pt") else a for a in args]
    proc = segment(*args, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("segment_volume.py: error:") and expected in last, proc.stderr
    assert not (bad_inputs / "out.zarr").exists()


def test_foreign_output_is_refused_and_overwrite_starts_over(tmp_path):
    """An output without our plan is never written into; --overwrite drops it and its progress;
    markers never outlive the output they describe."""
    out = tmp_path / "o.zarr"
    out.mkdir()
    (tmp_path / "o.zarr.progress" / "done").mkdir(parents=True)
    (tmp_path / "o.zarr.progress" / "done" / "0000000-0000001.json").write_text("{}")
    from ml_backend.learner.volume_segmentation import Progress, prepare_output

    plan = SegmentationPlan(
        volume="v", shape=(2, 8, 8), axis="z", output=str(out), format="zarr", kind="labels",
        checkpoint="c", checkpoint_sha256="0", n_classes=2, class_names=("background", "a"),
        window=(0.0, 1.0), chunk_slices=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="not started by this tool"):
        prepare_output(plan)
    prepare_output(plan, overwrite=True)
    progress = Progress(plan.progress_dir)
    assert progress.done() == set()
    assert zarr.open_array(str(out), mode="r").shape == (2, 8, 8)
    progress.mark(0, 1, {})
    assert prepare_output(plan) == plan and progress.done() == {(0, 1)}
    shutil.rmtree(out)  # output deleted by hand: its markers must not survive it
    prepare_output(plan)
    assert progress.done() == set() and out.exists()


def test_a_failed_write_behind_stops_the_run_and_marks_only_written_blocks(data, tmp_path, monkeypatch):
    """Blocks are written in a thread while the next one is segmented; a write that fails is raised
    before a later block is written, and no block it did not write is marked done."""
    import ml_backend.learner.volume_segmentation as vs

    volume = np.load(data["volume"])
    plan = vs.prepare_output(
        SegmentationPlan(
            volume=str(data["volume"]), shape=volume.shape, axis="z", output=str(tmp_path / "o.zarr"),
            format="zarr", kind="labels", checkpoint=str(data["checkpoint"]),
            checkpoint_sha256=vs.file_sha256(Path(data["checkpoint"])), n_classes=2,
            class_names=("background", "a"), window=(1000.0, 1000.0 + 255 * 37), chunk_slices=1, tile=128,
            overlap=16,
        )
    )  # fmt: skip
    written = []
    real_write = vs._write_block

    def write(plan, start, stop, block):
        if start == 2:
            raise OSError("disk full")
        real_write(plan, start, stop, block)
        written.append(start)

    monkeypatch.setattr(vs, "_write_block", write)
    with pytest.raises(OSError, match="disk full"):
        vs.run_blocks(plan, [(i, i + 1) for i in range(N_SLICES)], device=torch.device("cpu"))
    assert written == [0, 1]
    assert vs.Progress(plan.progress_dir).done() == {(0, 1), (1, 2)}
