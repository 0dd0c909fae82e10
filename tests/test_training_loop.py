"""Issue 3 end to end: Label Studio's own webhooks → backend → Redis/RQ → a real worker
process → a new checkpoint version → new predictions. Real everything, no mocks."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import requests
from redis import Redis

from sdk.label_config import parse_brush_target
from sdk.predictions import brush_results

from .helpers import BRUSH_CONFIG, publish, run_prioritize, train_small_net, write_images

pytestmark = pytest.mark.integration
TARGET = parse_brush_target(BRUSH_CONFIG)


def wait_for(what: str, check: Callable[[], object], timeout: float = 300, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def manifest(model_dir: Path, project: int) -> list[dict]:
    path = model_dir / f"project-{project}" / TARGET.signature / "manifest.json"
    return json.loads(path.read_text())["versions"] if path.exists() else []


class Loop:
    """A project wired to a backend and workers, as a lab would run it."""

    def __init__(self, label_studio, backend_factory, worker_factory, tmp_path, net, *, n_images=12, **env):
        self.ls = label_studio
        self.client = label_studio.client()
        self.project = self.client.projects.create(
            title=f"loop {uuid.uuid4().hex[:6]}", label_config=BRUSH_CONFIG
        )
        self.images = write_images(tmp_path / "images", [(192, 192)] * n_images, seed=40)
        self.task_ids = label_studio.upload_files(self.project.id, [p for p, _ in self.images])
        self.model_dir = tmp_path / "models"
        publish(net, self.model_dir, self.project.id)  # v1: the starting point fine-tuning continues from
        self.env = {
            "RQ_QUEUE": f"emloop-test-{uuid.uuid4().hex[:8]}",
            "TRAIN_DEBOUNCE_SECONDS": "2",
            "TRAIN_LOCK_TTL": "4",
            "TRAIN_STEPS": "12",
            "TRAIN_PATCH_SIZE": "128",
            "TRAIN_BATCH_SIZE": "2",
            "CLICK_TRAIN_STEPS": "2",
            **env,
        }
        self.worker_factory = worker_factory
        self.backend = backend_factory(self.env, label_studio=label_studio, model_dir=self.model_dir)
        self.ml = self.client.ml.create(
            project=self.project.id, url=self.backend.url, title="emloop", is_interactive=False
        )

    def worker(self):
        return self.worker_factory(self.env, label_studio=self.ls, model_dir=self.model_dir)

    def annotate(self, index: int) -> None:
        _, mask = self.images[index]
        result = brush_results(mask.astype(np.uint8), TARGET)
        self.client.annotations.create(id=self.task_ids[index], result=result, was_cancelled=False)

    def status(self) -> dict:
        return requests.get(f"{self.backend.url}/status/{self.project.id}", timeout=5).json()

    def versions(self) -> list[dict]:
        return manifest(self.model_dir, self.project.id)

    def wait_for_step(self, step: int) -> None:
        """Until the running training job reports `step` steps done."""
        wait_for(
            f"training step {step}",
            lambda: (self.status().get("progress") or {}).get("step", 0) >= step,
            timeout=180,
            every=0.2,
        )

    def wait_versions(self, n: int, timeout: float = 400) -> list[dict]:
        return wait_for(
            f"{n} checkpoint versions", lambda: len(self.versions()) >= n and self.versions(), timeout
        )

    def served_version(self) -> str:
        path, _ = self.images[0]
        body = {
            "project": f"{self.project.id}.0",
            "label_config": BRUSH_CONFIG,
            "tasks": [{"id": 1, "data": {"img": str(path)}}],
        }
        return requests.post(f"{self.backend.url}/predict", json=body, timeout=100).json()["results"][0][
            "model_version"
        ]


@pytest.fixture(scope="module")
def start_net():
    return train_small_net(steps=15)


def test_burst_trains_once_and_predictions_follow(
    label_studio, backend_factory, worker_factory, tmp_path, start_net
):
    loop = Loop(label_studio, backend_factory, worker_factory, tmp_path, start_net)
    loop.worker()
    started = time.monotonic()
    for i in range(10):
        loop.annotate(i)
    assert time.monotonic() - started < 5, "submitting 10 annotations took too long for a burst"
    versions = loop.wait_versions(2)
    time.sleep(3 * float(loop.env["TRAIN_DEBOUNCE_SECONDS"]))  # any late follow-up run would start by now
    status = wait_for(
        "training to settle", lambda: (s := loop.status())["state"] in ("succeeded", "skipped") and s
    )
    versions = loop.versions()
    runs = len(versions) - 1  # v1 was published by the test
    assert 1 <= runs <= 2, f"a burst of 10 annotations led to {runs} training runs"

    trained = versions[1]
    assert trained["parent"] == versions[0]["name"], "training must continue from the current checkpoint"
    metrics = trained["metrics"]
    assert metrics["n_train"] + metrics["n_holdout"] == 10 and metrics["n_holdout"] >= 1
    assert 0.0 <= metrics["holdout_after"]["iou"] <= 1.0 and 0.0 <= metrics["holdout_before"]["iou"] <= 1.0
    reported = status["last_result"]["metrics"]
    assert reported["holdout_after"] == loop.versions()[-1]["metrics"]["holdout_after"]
    clicks = status["last_result"]["clicks"]  # the click network fine-tuned in the same job
    assert clicks["version"].startswith("emloop-clicks-v") and clicks["steps"] == 2, clicks
    assert clicks["published"] == (clicks["version"] != "emloop-clicks-v0")

    # Label Studio asks again; predictions carry the new version.
    label_studio.retrieve_predictions(loop.project.id)
    newest = loop.versions()[-1]["name"]
    assert loop.served_version() == newest
    for task_id in loop.task_ids[10:]:
        versions_stored = {p.model_version for p in loop.client.predictions.list(task=task_id)}
        assert newest in versions_stored


def test_training_reorders_the_queue_by_itself(
    label_studio, backend_factory, worker_factory, tmp_path, start_net
):
    """Issue 14: connect, annotate 5 of 12 - no script, no setting - and Label Studio's queue
    follows the newly trained model, with its pre-annotations."""
    loop = Loop(label_studio, backend_factory, worker_factory, tmp_path, start_net)
    loop.worker()
    for i in range(5):
        loop.annotate(i)
    loop.wait_versions(2)
    time.sleep(3 * float(loop.env["TRAIN_DEBOUNCE_SECONDS"]))  # a follow-up run would have started
    status = wait_for(
        "training and ranking to settle",
        lambda: (s := loop.status())["state"] in ("succeeded", "skipped") and s,
    )
    versions_before = loop.versions()
    newest = versions_before[-1]["name"]
    queue = wait_for("the newest run's ranking", lambda: loop.status()["last_result"]["queue"], timeout=60)
    project = loop.client.projects.get(id=loop.project.id)
    assert queue["priority_version"].startswith(f"{newest}+entropy@"), (status, queue)
    assert project.model_version == queue["priority_version"] and queue["ranked"] == 7
    clusters = set()
    for task_id in loop.task_ids[5:]:
        current = [
            p for p in loop.client.predictions.list(task=task_id) if p.model_version == project.model_version
        ]
        assert len(current) == 1 and current[0].result, task_id
        assert {r["type"] for r in current[0].result} == {"brushlabels"}
        clusters.add(current[0].cluster)
    assert clusters == {0, 1}, "QUEUE_CLUSTERS (default on): 7 tasks form round(sqrt(3.5)) = 2 clusters"

    # /next serves the task that prioritize.py ranks first for this version.
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    args = ["--project", str(loop.project.id), "--strategy", "entropy", "--batch", "100", "--dry-run"]
    proc = run_prioritize(*args, "--json", "--quiet", env={**env, "MODEL_DIR": str(loop.model_dir)})
    assert proc.returncode == 0, proc.stderr
    ranking = json.loads(proc.stdout)
    assert ranking["model_version"] == newest
    served = requests.get(
        f"{label_studio.url}/api/projects/{loop.project.id}/next",
        headers=label_studio.auth_headers,
        timeout=30,
    ).json()
    assert served["id"] == ranking["ranking"][0]["task"]

    # Tasks imported later are ranked (and pre-annotated) by the current version, no training.
    new_ids = label_studio.upload_files(
        loop.project.id, [p for p, _ in write_images(tmp_path / "new", [(192, 192)] * 2, seed=7)]
    )
    status = wait_for(
        "the new tasks' ranking", lambda: (s := loop.status())["state"] == "ranked" and s, timeout=120
    )
    assert status["ranking"]["ranked"] == 9 and len(loop.versions()) == len(versions_before), status
    assert loop.client.projects.get(id=loop.project.id).model_version == status["ranking"]["priority_version"]
    for task_id in new_ids:
        current = [
            p
            for p in loop.client.predictions.list(task=task_id)
            if p.model_version == status["ranking"]["priority_version"]
        ]
        assert len(current) == 1 and current[0].result, task_id


def test_label_studios_training_toggle_is_turned_on_and_honoured(
    label_studio, backend_factory, worker_factory, tmp_path, start_net
):
    """Issue 14: connecting turns *Start model training on annotation submission* on (what the
    backend does); turned off by a user, annotations do not train, and *Start Training* does."""
    loop = Loop(label_studio, backend_factory, worker_factory, tmp_path, start_net)
    api, path = label_studio.api(), f"/api/projects/{loop.project.id}"
    toggle = lambda: api.request("GET", path).json()["min_annotations_to_start_training"]  # noqa: E731
    turned_on = lambda: "turned on 'Start model training" in loop.backend.log_tail(400)  # noqa: E731
    wait_for("the backend to turn the toggle on", lambda: turned_on() and toggle() == 1, timeout=30)

    def turn_off() -> bool:
        """The user turns it off, after the backend's change (its log says it is done): in CI a
        user's change made while the backend's was in flight was undone by it."""
        api.request("PATCH", path, json={"min_annotations_to_start_training": 0})
        time.sleep(1)
        return toggle() == 0

    wait_for("the user's change to hold", turn_off, timeout=30, every=1)
    loop.worker()
    loop.annotate(0)
    loop.annotate(1)
    wait_for("the webhooks", lambda: "not trained on" in loop.status().get("message", ""), timeout=30)
    time.sleep(3 * float(loop.env["TRAIN_DEBOUNCE_SECONDS"]))  # a run would have started by now
    status = loop.status()
    assert "generation" not in status and len(loop.versions()) == 1, status
    assert toggle() == 0  # the user's choice stays: /setup again does not turn it back on
    label_studio.retrieve_predictions(loop.project.id)  # Label Studio calls /setup first
    assert toggle() == 0

    api.request("POST", f"/api/ml/{loop.ml.id}/train")  # the Start Training button
    trained = loop.wait_versions(2)[1]["metrics"]
    assert trained["n_train"] + trained["n_holdout"] == 2, (trained, loop.status())


def test_a_worker_with_its_own_model_dir_trains_through_redis(
    label_studio, backend_factory, worker_factory, tmp_path, start_net, redis_url
):
    """Issue 15: CHECKPOINT_STORE=redis, and the worker's MODEL_DIR is not the backend's. The
    backend publishes the v1 it holds, the worker fine-tunes it, and the backend serves the
    worker's version (the same bytes, adopted into its own MODEL_DIR)."""
    loop = Loop(
        label_studio, backend_factory, worker_factory, tmp_path, start_net,
        CHECKPOINT_STORE="redis", QUEUE_STRATEGY="off",
    )  # fmt: skip
    try:
        (v1,) = loop.versions()
        assert loop.served_version() == v1["name"]
        worker_dir = tmp_path / "worker-models"
        worker_factory(loop.env, label_studio=loop.ls, model_dir=worker_dir)
        for i in range(3):
            loop.annotate(i)
        trained = wait_for(
            "the worker's version to be served",
            lambda: (name := loop.served_version()) != v1["name"] and name,
            timeout=400,
            every=2,
        )
        on_worker = manifest(worker_dir, loop.project.id)
        assert [v["name"] for v in on_worker] == [v1["name"], trained]
        assert on_worker[1]["parent"] == v1["name"]
        assert loop.versions() == on_worker
        lineage = Path(f"project-{loop.project.id}") / TARGET.signature / on_worker[1]["file"]
        assert (loop.model_dir / lineage).read_bytes() == (worker_dir / lineage).read_bytes()
    finally:
        redis = Redis.from_url(redis_url)
        keys = list(redis.scan_iter(match=f"emloop:{loop.env['RQ_QUEUE']}:checkpoints:*"))
        if keys:
            redis.delete(*keys)


def test_annotation_during_training_gets_a_follow_up_run(
    label_studio, backend_factory, worker_factory, tmp_path, start_net
):
    loop = Loop(label_studio, backend_factory, worker_factory, tmp_path, start_net, TRAIN_STEPS="60")
    loop.worker()
    for i in range(5):
        loop.annotate(i)
    loop.wait_for_step(1)
    late_task = loop.task_ids[7]
    loop.annotate(7)
    versions = loop.wait_versions(3)
    first, follow_up = versions[1]["metrics"], versions[2]["metrics"]
    seen = lambda m: m["train_task_ids"] + m["holdout_task_ids"]  # noqa: E731
    assert late_task not in seen(first)
    assert late_task in seen(follow_up)
    time.sleep(3 * float(loop.env["TRAIN_DEBOUNCE_SECONDS"]))
    assert len(loop.versions()) == 3, "exactly one follow-up run"


def test_killed_worker_is_retried_once_and_serving_untouched(
    label_studio, backend_factory, worker_factory, tmp_path, start_net
):
    loop = Loop(label_studio, backend_factory, worker_factory, tmp_path, start_net, TRAIN_STEPS="400")
    before = loop.served_version()
    worker = loop.worker()
    for i in range(5):
        loop.annotate(i)
    loop.wait_for_step(10)
    dead = loop.status()["job_id"]
    worker.kill(signal.SIGKILL)
    worker.wait(timeout=30)
    assert len(loop.versions()) == 1
    assert loop.served_version() == before
    wait_for("the dead run to show", lambda: loop.status().get("state") == "interrupted", timeout=30)

    # The next worker to start retries the dead run once, with no new annotation or button.
    loop.env["TRAIN_STEPS"] = "12"
    loop.worker()
    versions = loop.wait_versions(2, timeout=600)
    assert versions[1]["metrics"]["n_train"] + versions[1]["metrics"]["n_holdout"] == 5
    assert loop.served_version() == versions[1]["name"]
    status = wait_for("the retry to finish", lambda: (s := loop.status())["state"] == "succeeded" and s)
    assert status["retry_of"] == dead and status["job_id"] != dead
