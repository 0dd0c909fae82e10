"""Bulk pre-annotation (issue 14, item 2) against a real Label Studio, backend, Redis and worker:
hundreds of tasks through the job path, and *Retrieve predictions* on hundreds of selected tasks
answering within its timeout by handing what it cannot predict in time to the worker."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
import requests

from ml_backend.learner.checkpoints import version_name
from sdk.label_config import parse_brush_target

from .helpers import BRUSH_CONFIG, run_script, write_images

pytestmark = pytest.mark.integration
VERSION = version_name(0, parse_brush_target(BRUSH_CONFIG))  # the untrained network: no training needed


def predictions_per_task(api, project: int) -> Counter:
    """How many predictions of VERSION each task has (tasks without one are absent)."""
    found = api.request("GET", "/api/predictions", params={"project": project}).json()
    return Counter(p["task"] for p in found if p["model_version"] == VERSION)


def wait_finished(backend_url: str, project: int, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{backend_url}/status/{project}", timeout=10).json().get("preannotation")
        if status and status["state"] == "finished":
            return status
        time.sleep(0.5)
    raise AssertionError(f"pre-annotation of project {project} did not finish in {timeout:.0f} s")


@pytest.fixture
def stack(label_studio, backend_factory, worker_factory, tmp_path):
    env = {"RQ_QUEUE": f"emloop-test-{uuid.uuid4().hex[:8]}", "PREANNOTATE_CHUNK": "40"}
    backend = backend_factory({**env, "PREDICT_BUDGET_SECONDS": "0.5"}, label_studio=label_studio)
    worker_factory(env, label_studio=label_studio, model_dir=backend.env["MODEL_DIR"])
    return backend, env


def new_project(label_studio, backend, tmp_path, n: int, seed: int) -> tuple[int, list[int]]:
    client = label_studio.client()
    project = client.projects.create(title=f"bulk {uuid.uuid4().hex[:6]}", label_config=BRUSH_CONFIG)
    images = write_images(tmp_path / f"images-{seed}", [(48, 48)] * n, seed=seed)
    task_ids = label_studio.upload_files(project.id, [p for p, _ in images])
    client.ml.create(project=project.id, url=backend.url, title="emloop", is_interactive=False)
    return project.id, task_ids


def test_a_whole_project_is_preannotated_by_jobs_once(label_studio, stack, tmp_path):
    backend, _ = stack
    project, task_ids = new_project(label_studio, backend, tmp_path, 300, seed=1)
    api = label_studio.api()
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}

    first = run_script("preannotate.py", "--project", str(project), "--json", env=env, timeout=900)
    assert first.returncode == 0, first.stderr
    assert "300 task(s) queued in 8 job(s)" in first.stderr
    assert "pre-annotating" in first.stderr  # the progress bar
    counts = predictions_per_task(api, project)
    assert sorted(counts) == sorted(task_ids) and set(counts.values()) == {1}
    regions = api.request("GET", "/api/predictions", params={"project": project}).json()
    assert all(p["score"] is not None and isinstance(p["result"], list) for p in regions)

    again = run_script("preannotate.py", "--project", str(project), env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "0 task(s) queued in 0 job(s)" in again.stderr and "300 already had" in again.stderr
    assert predictions_per_task(api, project) == counts

    missing = requests.post(f"{backend.url}/preannotate/987654", timeout=30)
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    usage = run_script("preannotate.py", "--project", str(project), "--poll", "0", env=env)
    assert usage.returncode == 2 and "--poll must be positive" in usage.stderr


def test_retrieve_predictions_on_hundreds_of_tasks_hands_the_rest_to_workers(label_studio, stack, tmp_path):
    backend, _ = stack
    project, task_ids = new_project(label_studio, backend, tmp_path, 200, seed=2)
    api = label_studio.api()

    answer = label_studio.retrieve_predictions(project)  # all 200 selected, one /predict call
    assert answer.get("processed_items") == 200

    status = wait_finished(backend.url, project)
    assert 0 < status["total"] < 200, status  # some predicted within the request, the rest by the worker
    assert status["failed"] == 0 and status["predicted"] + status["skipped"] == status["total"]
    counts = predictions_per_task(api, project)
    assert sorted(counts) == sorted(task_ids) and set(counts.values()) == {1}

    label_studio.retrieve_predictions(project)  # every task is current now: nothing is added
    assert predictions_per_task(api, project) == counts
