"""The local stack launchers and the synthetic image generator."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from devtools.label_studio import CREDENTIALS_FILE, LabelStudioServer, seed_from_template
from devtools.local_stack import BackendServer, WorkerProcess, ensure_redis, is_loopback_url, redis_ping
from devtools.processes import REPO_ROOT, ManagedProcess, find_free_port, port_in_use, wait_http
from sdk.synthetic import synthetic_em, write_demo_images

BRUSH_CONFIG = (
    '<View><Image name="image" value="$image" zoom="true"/>'
    '<BrushLabels name="tag" toName="image">'
    '<Label value="Mitochondria" background="#ff0000"/></BrushLabels></View>'
)


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_per_seed() -> None:
    a_img, a_mask = synthetic_em(128, 160, seed=7)
    b_img, b_mask = synthetic_em(128, 160, seed=7)
    c_img, _ = synthetic_em(128, 160, seed=8)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize(("h", "w"), [(256, 256), (200, 320), (512, 384)])
def test_synthetic_shapes_and_labels(h: int, w: int) -> None:
    image, mask = synthetic_em(h, w, seed=1)
    assert image.shape == mask.shape == (h, w)
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}


@pytest.mark.parametrize("seed", range(6))
def test_synthetic_foreground_fraction_is_sane(seed: int) -> None:
    image, mask = synthetic_em(256, 256, seed=seed)
    fraction = float((mask > 0).mean())
    assert 0.02 < fraction < 0.2
    # Mitochondria are darker than their surroundings, and the image is not saturated.
    assert image[mask == 1].mean() < image[mask == 0].mean() - 15
    assert 0.0 <= (image == 255).mean() < 0.01 and (image == 0).mean() < 0.01


def test_synthetic_two_classes() -> None:
    _, mask1 = synthetic_em(384, 384, seed=3, n_classes=1)
    image, mask2 = synthetic_em(384, 384, seed=3, n_classes=2)
    assert set(np.unique(mask2)) == {0, 1, 2}
    assert 0 < (mask2 == 2).mean() < 0.1
    # Vesicles only take background pixels: mitochondria are unchanged.
    assert np.array_equal(mask1 == 1, mask2 == 1)
    with pytest.raises(ValueError):
        synthetic_em(64, 64, n_classes=3)


def test_write_demo_images(tmp_path: Path) -> None:
    paths = write_demo_images(tmp_path, n=3, size=(96, 128), seed=5, masks=True)
    assert [p.name for p in paths] == [f"synthetic_{i:04d}.png" for i in (5, 6, 7)]
    for i, path in enumerate(paths):
        image = np.asarray(Image.open(path))
        mask = np.asarray(Image.open(tmp_path / "masks" / path.name))
        expected_image, expected_mask = synthetic_em(96, 128, seed=5 + i)
        assert np.array_equal(image, expected_image) and np.array_equal(mask, expected_mask)


# ------------------------------------------------------------------ process plumbing (fast)


def test_find_free_port_is_bindable() -> None:
    port = find_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_http_times_out_with_context() -> None:
    url = f"http://127.0.0.1:{find_free_port()}/health"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="extra context"):
        wait_http(url, timeout=0.5, interval=0.1, describe=lambda: "extra context")
    assert time.monotonic() - started < 5


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; it is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_managed_process_stops_whole_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    proc = ManagedProcess(
        ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"],
        env=dict(os.environ),
        log_path=tmp_path / "p.log",
    )
    proc.spawn()
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert proc.alive and _pid_alive(grandchild)
    proc.stop(grace=2)
    assert not proc.alive
    deadline = time.monotonic() + 5
    while _pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(grandchild)


def test_managed_process_kill(tmp_path: Path) -> None:
    proc = ManagedProcess(["sleep", "300"], env=dict(os.environ), log_path=tmp_path / "p.log")
    proc.spawn()
    proc.kill(signal.SIGKILL)
    assert proc.wait(timeout=5) == -signal.SIGKILL
    proc.stop()  # idempotent after death


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_ensure_redis_starts_and_stops_private_server() -> None:
    dead_url = f"redis://127.0.0.1:{find_free_port()}/3"
    with ensure_redis(dead_url) as handle:
        assert handle.started and handle.url != dead_url and handle.url.endswith("/3")
        assert redis_ping(handle.url)
        proc = handle.process
        assert proc is not None
    assert not proc.alive and not redis_ping(handle.url)


def test_ensure_redis_reuses_running_server(redis_url: str) -> None:
    handle = ensure_redis(redis_url)
    assert not handle.started and handle.url == redis_url
    handle.stop()
    assert redis_ping(redis_url)  # a server we did not start is never stopped


def test_only_loopback_redis_urls_are_replaced() -> None:
    assert is_loopback_url("redis://127.0.0.1:6379/0") and is_loopback_url("redis://localhost")
    assert not is_loopback_url("redis://redis.example:6379/0")
    assert not is_loopback_url("rediss://127.0.0.1:6379/0")


def test_backend_and_worker_run_the_code_of_their_repo_root(tmp_path: Path) -> None:
    """Another checkout (a git worktree) runs its own code: working directory and PYTHONPATH."""
    for cls in (BackendServer, WorkerProcess):
        default = cls({}, log_path=tmp_path / "default.log")
        other = cls({}, log_path=tmp_path / "other.log", repo_root=tmp_path)
        assert default.cwd == REPO_ROOT and default.env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
        assert other.cwd == tmp_path.resolve()
        assert other.env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path.resolve())


def test_label_studio_credentials_survive_reuse(tmp_path: Path) -> None:
    data = tmp_path / "ls"
    first = LabelStudioServer(data, token="a" * 40, username="u@example.com", password="pw")
    first._save_credentials()
    (data / "label_studio.sqlite3").write_bytes(b"")  # looks initialised
    again = LabelStudioServer(data)
    assert (again.username, again.password, again.token) == ("u@example.com", "pw", "a" * 40)
    with pytest.raises(ValueError, match="token"):
        LabelStudioServer(data, token="b" * 40)
    (data / CREDENTIALS_FILE).unlink()
    with pytest.raises(RuntimeError, match=CREDENTIALS_FILE):
        LabelStudioServer(data)


def test_fresh_label_studio_token_is_40_hex(tmp_path: Path) -> None:
    server = LabelStudioServer(tmp_path / "fresh")
    assert len(server.token) == 40 and int(server.token, 16) >= 0


# ---------------------------------------------------------------------- real Label Studio


@pytest.mark.integration
def test_label_studio_project_upload_roundtrip(label_studio: LabelStudioServer, tmp_path: Path) -> None:
    client = label_studio.client()
    project = client.projects.create(
        title="local stack roundtrip", label_config=BRUSH_CONFIG, sampling="Uncertainty sampling"
    )
    paths = write_demo_images(tmp_path, n=2, size=64, seed=11)

    task_ids = label_studio.upload_files(project.id, paths)

    assert len(task_ids) == 2
    tasks = list(client.tasks.list(project=project.id))
    assert sorted(t.id for t in tasks) == sorted(task_ids)
    for task in tasks:
        url = task.data["image"]
        assert url.startswith(f"/data/upload/{project.id}/"), url
        response = requests.get(label_studio.url + url, headers=label_studio.auth_headers, timeout=10)
        assert response.status_code == 200
        matches = [p for p in paths if url.endswith(p.name)]
        assert len(matches) == 1 and response.content == matches[0].read_bytes()
    assert client.projects.get(project.id).sampling == "Uncertainty sampling"


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_demo_smoke(label_studio: LabelStudioServer, redis_url: str, repo_root: Path, tmp_path: Path) -> None:
    """`make demo` end to end: its own Label Studio, backend, worker, import, a first training
    round from expert annotations, predictions of the trained version, cleanup."""
    data_dir = tmp_path / "demo"
    seed_from_template(data_dir / "label-studio")  # skip the migrations (label_studio built it)
    ls_port, ml_port = find_free_port(), find_free_port()
    result = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--data-dir", str(data_dir),
         "--ls-port", str(ls_port), "--ml-port", str(ml_port), "--images", "3", "--size", "160",
         "--teach", "2", "--smoke"],
        env={**os.environ, "REDIS_URL": redis_url, "TRAIN_STEPS": "10", "TRAIN_PATCH_SIZE": "128",
             "RQ_QUEUE": f"emloop-demo-test-{ls_port}"},
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=560,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "2 annotations submitted" in out and "succeeded: emloop-v1-" in out, out
    assert "3/3 tasks have predictions" in out and f"http://127.0.0.1:{ls_port}/projects/" in out, out
    assert "queue ranked by emloop-v1-" in out and "+entropy@" in out, out  # the closed loop
    for port in (ls_port, ml_port):  # everything it started is gone
        assert not port_in_use(port), out


@pytest.mark.integration
def test_label_studio_credentials_file(label_studio: LabelStudioServer) -> None:
    stored = json.loads((label_studio.data_dir / CREDENTIALS_FILE).read_text())
    assert stored["token"] == label_studio.token
    who = requests.get(
        f"{label_studio.url}/api/current-user/whoami", headers=label_studio.auth_headers, timeout=10
    )
    assert who.status_code == 200 and who.json()["email"] == label_studio.username
