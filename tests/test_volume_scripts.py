"""Issue 5 end to end with a REAL Label Studio: push a volume's patches, annotate some through
label-studio-sdk (brush RLE of ground-truth masks), export the label volume and compare.

Both ways of getting patches into Label Studio (uploads, local-files storage) are covered, and
re-running a push must not create a single extra task.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
from PIL import Image

from sdk.brush import mask_to_rle
from sdk.synthetic import synthetic_em
from sdk.tiling import Patch, open_volume, patch_grid, read_patch, to_uint8
from sdk.volume_tasks import PROVENANCE_FIELDS, patch_from_task, select_patches

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
LABELS = ("Mitochondria", "Vesicle")
SHAPE = (4, 320, 384)  # 256 px patches: rows start 0, 64; columns 0, 128 (border rule) -> overlaps
SLICES = ("0", "2", "3")


def run(script: str, *args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *map(str, args), "--no-progress"],
        capture_output=True, text=True, timeout=240, cwd=REPO, env={**os.environ, **env},
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 16-bit multi-page TIFF volume and its two-class ground truth."""
    pairs = [synthetic_em(SHAPE[1], SHAPE[2], seed=90 + z, n_classes=2) for z in range(SHAPE[0])]
    image = np.stack([p[0] for p in pairs]).astype(np.uint16) * 41 + 700
    truth = np.stack([p[1] for p in pairs])
    assert set(np.unique(truth)) == {0, 1, 2}
    path = tmp_path_factory.mktemp("volume") / "em.tif"
    tifffile.imwrite(path, image, photometric="minisblack")
    return path, truth


@pytest.fixture
def ls_env(label_studio) -> dict[str, str]:
    return {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}


def brush(mask: np.ndarray) -> list[dict]:
    """One brush region per class present in ``mask`` (class i = LABELS[i - 1])."""
    h, w = mask.shape
    return [
        {
            "from_name": "tag",
            "to_name": "image",
            "type": "brushlabels",
            "original_width": w,
            "original_height": h,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask == c), "brushlabels": [LABELS[c - 1]]},
        }  # fmt: skip
        for c in (1, 2)
        if (mask == c).any()
    ]


def tasks_by_patch(client, project_id: int) -> dict[Patch, object]:
    found = {}
    for task in client.tasks.list(project=project_id, fields="task_only"):
        patch = patch_from_task(task.data)
        assert patch is not None and patch not in found, f"duplicate or foreign task {task.data}"
        found[patch] = task
    return found


@pytest.mark.parametrize("mode", ["upload", "local-files"])
def test_push_annotate_export_round_trip(label_studio, ls_env, volume, mode, tmp_path):
    path, truth = volume
    title = f"volume {mode} {uuid.uuid4().hex[:6]}"
    push = [
        "push_volume.py",
        path,
        "--create",
        title,
        "--labels",
        *LABELS,
        "--mode",
        mode,
        "--slices",
        *SLICES,
    ]
    if mode == "local-files":
        push += ["--document-root", label_studio.document_root, "--subdir", f"vol-{uuid.uuid4().hex[:6]}"]

    # A first pool, then the whole grid, then the whole grid again: 5, +7, +0 tasks.
    t0 = time.monotonic()
    assert "5 tasks created" in ok(run(*push, "--subset", "strided:5", env=ls_env))
    assert "12 patches selected, 5 already there, 7 tasks created" in ok(run(*push, env=ls_env))
    assert "12 already there, 0 tasks created" in ok(run(*push, "--batch", "3", env=ls_env))
    print(f"{mode}: three pushes took {time.monotonic() - t0:.1f} s")

    client = label_studio.client()
    (project,) = [p for p in client.projects.list() if p.title == title]
    tasks = tasks_by_patch(client, project.id)
    assert len(tasks) == 12
    assert {(p.slice_index, p.y, p.x) for p in tasks} == {
        (s, y, x) for s in (0, 2, 3) for y in (0, 64) for x in (0, 128)
    }
    if mode == "local-files":
        assert len(client.import_storage.local.list(project=project.id)) == 1

    # Every task shows its patch, rendered with the window it records.
    with open_volume(path) as vol:
        for patch, task in list(tasks.items())[:4]:
            data = task.data
            assert set(PROVENANCE_FIELDS) <= set(data) and data["volume_shape"] == list(SHAPE)
            assert data["volume_id"] == vol.id
            ref = data["image"]
            assert ref.startswith("/data/upload/" if mode == "upload" else "/data/local-files/?d=")
            resp = requests.get(label_studio.url + ref, headers=label_studio.auth_headers, timeout=30)
            assert resp.status_code == 200, resp.text[:200]
            expected = to_uint8(read_patch(vol, patch), data["intensity_lo"], data["intensity_hi"])
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(resp.content))), expected)

    def find(s: int, y: int, x: int) -> tuple[Patch, object]:
        return next((p, t) for p, t in tasks.items() if (p.slice_index, p.y, p.x) == (s, y, x))

    a, b, c, d, e = find(0, 0, 0), find(0, 64, 128), find(2, 0, 128), find(3, 64, 0), find(3, 0, 0)
    other = (truth[b[0].region()] + 1) % 3  # B disagrees with the truth everywhere
    ann_a = client.annotations.create(id=a[1].id, result=brush(truth[a[0].region()]))
    time.sleep(0.05)
    client.annotations.create(id=b[1].id, result=brush(other))
    client.annotations.create(id=c[1].id, result=[])  # annotated: nothing there
    client.annotations.create(id=d[1].id, result=[], was_cancelled=True)  # skipped: stays unknown
    client.annotations.create(id=e[1].id, result=brush(truth[e[0].region()]))
    time.sleep(0.05)
    client.annotations.update(id=ann_a.id, result=brush(truth[a[0].region()]))  # A is now the newest

    expected = np.full(SHAPE, 255, np.uint8)
    covered = np.zeros(SHAPE, np.uint8)
    for patch, mask in ((b[0], other), (c[0], 0), (e[0], truth[e[0].region()]), (a[0], truth[a[0].region()])):
        expected[patch.region()] = mask
        covered[patch.region()] = 1

    suffix = ".tif" if mode == "upload" else ".zarr"
    out, cov = tmp_path / f"labels{suffix}", tmp_path / f"coverage{'.zarr' if suffix == '.tif' else '.tif'}"
    log = ok(run("export_volume.py", "--project", project.id, "--out", out, "--coverage", cov, env=ls_env))
    assert "4 annotated patches of 12 tasks" in log
    with open_volume(out) as got, open_volume(cov) as got_cov:
        assert got.shape == SHAPE and got.dtype == np.uint8
        np.testing.assert_array_equal(got[:], expected)
        np.testing.assert_array_equal(got_cov[:], covered)
    # Where the newest annotation is the truth, the export is the truth; the rest is unknown.
    assert np.array_equal(expected[a[0].region()], truth[a[0].region()])
    assert (expected[1] == 255).all(), "slice 1 was never pushed"
    assert (expected[3, 256:, :256] == 255).all(), "the skipped patch D adds no labels"

    if mode == "upload":
        # --overlap max: the larger class wins where B and A overlap.
        out_max = tmp_path / "labels-max.tif"
        ok(run("export_volume.py", "--project", project.id, "--out", out_max, "--overlap", "max", env=ls_env))
        both = (slice(64, 256), slice(128, 256))
        got_max = tifffile.imread(out_max)
        np.testing.assert_array_equal(
            got_max[0][both], np.maximum(truth[0][both], other[: 256 - 64, : 256 - 128])
        )
        # An unknown value that is also a class index is refused.
        clash = run(
            "export_volume.py",
            "--project",
            project.id,
            "--out",
            tmp_path / "x.tif",
            "--unknown",
            2,
            env=ls_env,
        )
        assert clash.returncode == 2 and "class index" in clash.stderr
        # Label Studio's refusals are one line too (the SDK's message would dump every header).
        gone = run("export_volume.py", "--project", 10**6, "--out", tmp_path / "y.tif", env=ls_env)
        assert gone.returncode == 1 and gone.stderr.strip().splitlines() == [
            f"export_volume.py: error: Label Studio at {label_studio.url} answered HTTP 404: "
            "No Project matches the given query."
        ]


@pytest.mark.parametrize("axis", ["z", "y", "x"])
def test_selected_patches_are_the_grid_or_a_reproducible_part_of_it(axis):
    shape, kw = (130, 300, 410), {"patch_size": (96, 128), "stride": (80, 100), "slice_step": 7}
    grid = patch_grid(shape, axis, **kw, volume_id="v")
    assert select_patches(shape, axis, **kw, volume_id="v") == grid
    for subset in (("random", 9), ("strided", 9)):
        part = select_patches(shape, axis, **kw, volume_id="v", subset=subset, seed=4)
        assert len(set(part)) == 9 and set(part) <= set(grid)
        assert part == sorted(part, key=grid.index), "grid order is kept"
        assert part == select_patches(shape, axis, **kw, volume_id="v", subset=subset, seed=4)
    assert select_patches(shape, axis, **kw, volume_id="v", subset=("random", 10**6)) == grid
    strided = select_patches(shape, axis, **kw, volume_id="v", subset=("strided", 3))
    assert strided == [grid[0], grid[len(grid) // 3], grid[2 * len(grid) // 3]]


OFFLINE = {"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "unused"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{vol}", "--project", "1", "--patch-size", "512"], "larger than"),
        (["{vol}", "--project", "1", "--slices", "9"], "outside"),
        (["{vol}", "--project", "1", "--subset", "some:3"], "random:N or strided:N"),
        (["{flat}", "--project", "1"], "3-D"),
        (["{dir}/em.xyz", "--project", "1"], "unknown volume format"),
        (["{dir}/em.h5:/nope", "--project", "1"], "nope"),
        (["{vol}", "--project", "1", "--axis", "w"], "invalid choice"),
        (["{vol}", "--project", "1", "--mode", "local-files"], "--document-root"),
    ],
)
def test_push_bad_input_is_one_line_and_exit_2(volume, tmp_path, args, expected):
    import h5py

    np.save(tmp_path / "flat.npy", np.zeros((300, 300), np.uint8))
    (tmp_path / "em.xyz").write_bytes(b"\0")
    with h5py.File(tmp_path / "em.h5", "w") as f:
        f["raw"] = np.zeros((2, 8, 8), np.uint8)
    subs = {"vol": volume[0], "flat": tmp_path / "flat.npy", "dir": tmp_path}
    proc = run("push_volume.py", *[a.format(**subs) for a in args], env=OFFLINE)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("push_volume.py: error:") and expected in last, proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--out", "{dir}/labels.png"], "unknown output format"),
        (["--out", "{dir}/labels.tif", "--coverage", "{dir}/c.npy"], "unknown output format"),
        (["--out", "{dir}/labels.tif", "--unknown", "300"], "0..255"),
    ],
)
def test_export_bad_input_is_one_line_and_exit_2(tmp_path, args, expected):
    proc = run("export_volume.py", "--project", "1", *[a.format(dir=tmp_path) for a in args], env=OFFLINE)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and expected in proc.stderr.strip().splitlines()[-1], proc.stderr
