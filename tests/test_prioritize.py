"""Issue 4 end to end: scripts/prioritize.py against a REAL Label Studio 1.23.

The script runs as a subprocess, as a user runs it; the order it writes must be what
the label stream (GET /api/projects/<id>/next, used by "Label All Tasks") serves, and
the expected order is computed here with the same model and strategies.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ml_backend.learner.checkpoints import CheckpointStore
from ml_backend.learner.inference import predict_image
from ml_backend.learner.network import UNetConfig, build_unet
from ml_backend.learner.scoring import score_pool
from ml_backend.learner.training import TrainConfig, fine_tune
from sdk.label_config import parse_brush_target
from sdk.priority import PRIORITY_VIEW, is_priority_version
from sdk.strategies import image_score
from sdk.synthetic import synthetic_em

from .helpers import BRUSH_CONFIG, publish, run_prioritize, write_images

pytestmark = pytest.mark.integration

SHAPES = [(128, 128), (160, 128), (128, 192), (144, 144), (192, 160), (128, 128), (160, 160), (176, 128)]


@pytest.fixture(scope="module")
def quick_net():
    """A tiny network trained for a few seconds: enough for real masks and varied uncertainty."""
    data = [synthetic_em(128, 128, seed=100 + s) for s in range(4)]
    net = build_unet(UNetConfig(n_classes=2, base_channels=4, depth=2), seed=0)
    config = TrainConfig(steps=30, patch_size=96, batch_size=4, seed=0)
    fine_tune(net, [d[0] for d in data], [d[1] for d in data], config)
    return net


class Project:
    """A project with synthetic EM tasks, and helpers to drive its label stream."""

    def __init__(self, label_studio, tmp_path: Path, title: str, shapes=SHAPES, seed: int = 0) -> None:
        self.ls = label_studio
        self.id = label_studio.client().projects.create(title=title, label_config=BRUSH_CONFIG).id
        images = write_images(label_studio.document_root / f"prio{self.id}", shapes, seed=seed)
        self.task_ids = label_studio.upload_files(self.id, [p for p, _ in images])
        self.images = {t: np.asarray(Image.open(p)) for t, (p, _) in zip(self.task_ids, images, strict=True)}
        self.model_dir = tmp_path / f"models-{self.id}"
        self.model_dir.mkdir()

    def api(self, method: str, path: str, **kw) -> requests.Response:
        resp = requests.request(
            method, f"{self.ls.url}{path}", headers=self.ls.auth_headers, timeout=60, **kw
        )
        assert resp.status_code < 300, f"{method} {path}: HTTP {resp.status_code} {resp.text[:300]}"
        return resp

    def project(self) -> dict:
        return self.api("GET", f"/api/projects/{self.id}").json()

    def tasks(self) -> dict[int, dict]:
        body = self.api("GET", "/api/tasks", params={"project": self.id, "page_size": 100}).json()
        return {t["id"]: t for t in body["tasks"]}

    def versions(self) -> dict[str, int]:
        """Model versions with stored predictions (Label Studio also lists the project's, with 0)."""
        versions = self.api("GET", f"/api/projects/{self.id}/model-versions").json()
        return {name: count for name, count in versions.items() if count}

    def next(self) -> dict:
        return self.api("GET", f"/api/projects/{self.id}/next").json()

    def skip(self, task_id: int) -> None:
        body = {"result": [], "was_cancelled": True}
        self.api("POST", f"/api/tasks/{task_id}/annotations", params={"was_cancelled": 1}, json=body)

    def annotate(self, task_id: int, result: list[dict]) -> None:
        self.api("POST", f"/api/tasks/{task_id}/annotations", json={"result": result})

    def prioritize(self, *args: str, env: dict | None = None, model_dir: Path | None = None):
        environ = {
            "LABEL_STUDIO_URL": self.ls.url,
            "LABEL_STUDIO_API_KEY": self.ls.token,
            "MODEL_DIR": str(model_dir or self.model_dir),
            **(env or {}),
        }
        return run_prioritize("--project", str(self.id), *args, env=environ)

    def ranking(self, *args: str, **kw) -> dict:
        proc = self.prioritize(*args, "--json", "--quiet", **kw)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


def own_queue() -> str:
    return f"emloop-test-{uuid.uuid4().hex[:8]}"


def order(ranking: dict) -> list[int]:
    return [row["task"] for row in ranking["ranking"]]


def unlabeled(project: Project) -> list[int]:
    return sorted(t for t, task in project.tasks().items() if not task["is_labeled"])


# -- the order reaches the label stream ---------------------------------------------------------------------
def test_entropy_order_is_served_and_a_rerun_reprioritises(
    label_studio, backend_factory, tmp_path, quick_net
):
    p = Project(label_studio, tmp_path, "prioritize entropy")
    version = publish(quick_net, p.model_dir, p.id)
    # A queue of its own: the Redis may be shared, and annotations enqueue training jobs.
    backend = backend_factory({"RQ_QUEUE": own_queue()}, label_studio=label_studio, model_dir=p.model_dir)
    label_studio.client().ml.create(project=p.id, url=backend.url, title="emloop", is_interactive=False)
    before = p.project()

    dry = p.ranking("--strategy", "entropy", "--batch", "4", "--dry-run")
    assert dry["dry_run"] and dry["strategy"] == "entropy" and not dry["cold_start"]
    assert dry["model_version"] == version.name and dry["priority_version"] is None
    # The strategy's order, computed here the way the backend predicts each image.
    scores = {t: image_score("entropy", predict_image(quick_net, im).probs) for t, im in p.images.items()}
    expected = sorted(scores, key=lambda t: (-scores[t], t))[:4]
    assert order(dry) == expected
    assert [r["score"] for r in dry["ranking"]] == pytest.approx([scores[t] for t in expected], rel=1e-4)
    # A dry run writes nothing.
    after = p.project()
    assert (after["sampling"], after["model_version"]) == (before["sampling"], before["model_version"])
    assert p.versions() == {}
    assert not any("priority" in t["data"] for t in p.tasks().values())

    real = p.ranking("--strategy", "entropy", "--batch", "4")
    assert order(real) == expected
    name = real["priority_version"]
    assert name.startswith(f"{version.name}+entropy@") and is_priority_version(name)
    project = p.project()
    assert (project["sampling"], project["model_version"]) == ("Uncertainty sampling", name)
    tasks = p.tasks()
    assert {t: tasks[t]["data"].get("priority") for t in tasks} == {
        t: (expected.index(t) + 1 if t in expected else None) for t in tasks
    }
    views = p.api("GET", "/api/dm/views", params={"project": p.id}).json()
    (view,) = [v for v in views if v["data"].get("title") == PRIORITY_VIEW]
    assert view["data"]["ordering"] == ["tasks:data.priority"]
    hidden = view["data"]["hiddenColumns"]["explore"]
    assert "tasks:predictions_score" not in hidden and "tasks:predictions_results" in hidden

    # Predictions requested from the connected backend later do not disturb the order.
    label_studio.retrieve_predictions(p.id)
    assert p.versions() == {name: 4, version.name: 8}
    assert p.project()["model_version"] == name

    served = p.next()
    assert served["id"] == expected[0]
    (pre,) = served["predictions"]  # the pre-annotation is the model's mask under the priority version
    assert pre["model_version"] == name and pre["result"], "the ranked task should carry brush masks"
    assert pre["result"][0]["type"] == "brushlabels"
    p.annotate(expected[0], pre["result"])
    for task_id in expected[1:3]:
        assert p.next()["id"] == task_id
        p.skip(task_id)

    # Re-run after an annotation: the annotated task drops out, nothing stale remains.
    rerun = p.ranking("--strategy", "entropy", "--batch", "4")
    remaining = sorted(set(p.task_ids) - {expected[0]}, key=lambda t: (-scores[t], t))
    assert order(rerun) == remaining[:4]
    assert rerun["labeled"] == 1 and rerun["pool_size"] == 7
    new = rerun["priority_version"]
    assert new != name and p.project()["model_version"] == new
    assert p.versions() == {new: 4, version.name: 8}
    tasks = p.tasks()
    assert "priority" not in tasks[expected[0]]["data"]
    assert {t: tasks[t]["data"].get("priority") for t in tasks} == {
        t: (order(rerun).index(t) + 1 if t in order(rerun) else None) for t in tasks
    }
    skipped_by_me = set(expected[1:3])
    assert p.next()["id"] == next(t for t in order(rerun) if t not in skipped_by_me)


def expected_order(strategy: str, p: Project, net, k: int, labeled: list[int] = ()) -> list[int]:
    """The strategy's top k over the unlabeled tasks, with the same scoring functions as the script."""
    pool = unlabeled(p)
    out = score_pool(net, [p.images[t] for t in pool], strategy, mc_samples=8, progress=False)
    lab = score_pool(net, [p.images[t] for t in labeled], None, progress=False) if labeled else None
    picks = out.select(strategy, k, labeled_embeddings=None if lab is None else lab.embeddings, seed=0)
    return [pool[i] for i in picks]


@pytest.mark.parametrize("strategy", ["bald", "coreset"])
def test_bald_and_coreset_orders_are_served(label_studio, tmp_path, quick_net, strategy):
    p = Project(label_studio, tmp_path, f"prioritize {strategy}", seed=20)
    publish(quick_net, p.model_dir, p.id)
    labeled = []
    if strategy == "coreset":  # the labeled set counts as covered
        labeled = [p.task_ids[0]]
        p.annotate(labeled[0], [])
    expected = expected_order(strategy, p, quick_net, 3, labeled)

    real = p.ranking("--strategy", strategy, "--batch", "3")
    assert order(real) == expected and real["strategy"] == strategy
    assert p.project()["model_version"] == real["priority_version"]
    for task_id in expected:
        assert p.next()["id"] == task_id
        p.skip(task_id)


def test_cold_start_uses_a_diversity_strategy_and_says_so(label_studio, tmp_path):
    p = Project(label_studio, tmp_path, "prioritize cold start", shapes=SHAPES[:6], seed=40)
    proc = p.prioritize("--strategy", "entropy", "--batch", "3", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "cold start" in proc.stderr and "'entropy'" in proc.stderr and "'kmeans'" in proc.stderr
    ranking = json.loads(proc.stdout)
    assert ranking["cold_start"] and ranking["strategy"] == "kmeans"
    assert ranking["requested_strategy"] == "entropy" and ranking["model_version"].startswith("emloop-v0-")
    store = CheckpointStore.for_project(p.model_dir, str(p.id), parse_brush_target(BRUSH_CONFIG))
    assert order(ranking) == expected_order("kmeans", p, store.load_newest_intact()[1], 3)
    assert "+kmeans@" in ranking["priority_version"]
    assert p.next()["id"] == order(ranking)[0]


def test_worker_scores_the_same_and_attaches_heat_maps(
    label_studio, worker_factory, redis_url, tmp_path, quick_net
):
    p = Project(label_studio, tmp_path, "prioritize via worker", shapes=SHAPES[:6], seed=60)
    publish(quick_net, p.model_dir, p.id)
    here = p.ranking("--strategy", "bald", "--batch", "3", "--dry-run")
    env = {"REDIS_URL": redis_url, "RQ_QUEUE": own_queue()}  # no other worker may take the job
    worker_factory(env, label_studio=label_studio, model_dir=p.model_dir)
    there = p.ranking("--strategy", "bald", "--batch", "3", "--via-worker", "--heatmaps", env=env)
    assert order(there) == order(here)
    assert [r["score"] for r in there["ranking"]] == pytest.approx(
        [r["score"] for r in here["ranking"]], rel=1e-4
    )
    assert list((p.model_dir / f"project-{p.id}").glob("*/scores/bald-*.npz"))
    tasks = p.tasks()
    for task_id, task in tasks.items():
        uri = task["data"]["uncertainty"]
        image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        if task_id in order(there):  # the heat map, at the image's size (below 512 px)
            assert image.size == p.images[task_id].shape[::-1] and image.mode == "P"
        else:  # a neutral placeholder: no stale or missing heat map
            assert image.size == (8, 8)
    assert p.next()["id"] == order(there)[0]


def test_errors_are_one_line_with_a_nonzero_exit(label_studio, tmp_path):
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token, "MODEL_DIR": "x"}
    project = label_studio.client().projects.create(title="prioritize errors", label_config=BRUSH_CONFIG).id
    cases = [
        (["--project", str(project), "--strategy", "nope"], env, 2, "unknown strategy 'nope'"),
        (["--project", "987654", "--strategy", "entropy"], env, 1, "project 987654 not found"),
        (["--project", str(project), "--strategy", "entropy"], {**env, "LABEL_STUDIO_API_KEY": "wrong"}, 1,
         "check LABEL_STUDIO_API_KEY"),
    ]  # fmt: skip
    for args, environ, code, message in cases:
        proc = run_prioritize(*args, env=environ)
        assert proc.returncode == code, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stdout == ""
