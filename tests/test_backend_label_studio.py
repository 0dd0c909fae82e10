"""Issue 2 end to end: a REAL Label Studio 1.23 and a REAL backend process.

Predictions are retrieved through the Data Manager action, then checked against the
masks the same checkpoint produces in this process, and Label Studio's uncertainty
sampling must serve the lowest-score task first.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests
from PIL import Image

from ml_backend.learner.checkpoints import CheckpointStore
from ml_backend.learner.inference import predict_image
from ml_backend.serving.registry import ModelRegistry
from sdk.brush import rle_to_mask
from sdk.label_config import parse_brush_target
from sdk.predictions import confidence_score, label_map

from .helpers import BRUSH_CONFIG, publish, train_small_net, write_images

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained_net():
    return train_small_net()


def test_predictions_stored_by_label_studio_match_the_model(
    label_studio, backend_factory, tmp_path, trained_net
):
    client = label_studio.client()
    project = client.projects.create(title="emloop predictions", label_config=BRUSH_CONFIG)
    shapes = [(256, 256), (200, 320), (300, 260), (160, 400), (256, 256)]
    images = write_images(label_studio.document_root / f"p{project.id}", shapes, seed=7)
    task_ids = label_studio.upload_files(project.id, [p for p, _ in images])
    assert len(task_ids) == len(images)

    model_dir = tmp_path / "models"
    version = publish(trained_net, model_dir, project.id)
    backend = backend_factory(label_studio=label_studio, model_dir=model_dir)
    client.ml.create(project=project.id, url=backend.url, title="emloop", is_interactive=False)
    label_studio.retrieve_predictions(project.id)

    # What the model produces for each image, computed here with the same checkpoint.
    target = parse_brush_target(BRUSH_CONFIG)
    loaded = ModelRegistry().current(CheckpointStore.for_project(model_dir, str(project.id), target))
    assert loaded.version.name == version.name

    tasks = {t.id: t for t in client.tasks.list(project=project.id, fields="all")}
    scores: dict[int, float] = {}
    foreground_tasks = 0
    for task_id, (path, _) in zip(sorted(tasks), images, strict=True):
        predictions = list(client.predictions.list(task=task_id))
        assert len(predictions) == 1, f"task {task_id}: {len(predictions)} predictions"
        pred = predictions[0]
        assert pred.model_version == version.name
        image = np.asarray(Image.open(path))
        probs = predict_image(loaded.net, image).probs
        expected = label_map(probs)
        decoded = np.zeros_like(expected)
        for region in pred.result:
            assert region["type"] == "brushlabels"
            assert (region["from_name"], region["to_name"]) == ("organelle", "em")
            assert (region["original_height"], region["original_width"]) == image.shape
            assert region["value"]["format"] == "rle"
            assert region["value"]["brushlabels"] == ["Mitochondria"]
            decoded[rle_to_mask(region["value"]["rle"], *image.shape) > 0] = 1
        np.testing.assert_array_equal(decoded, expected, err_msg=f"task {task_id} ({path.name})")
        foreground_tasks += bool(expected.any())
        assert pred.score == pytest.approx(confidence_score(probs), abs=1e-6)
        assert 0.0 <= pred.score <= 1.0
        scores[task_id] = pred.score
    assert foreground_tasks >= 3, "the trained checkpoint should find mitochondria"
    assert len(set(np.round(list(scores.values()), 6))) == len(scores), "scores should differ between tasks"

    # Uncertainty sampling serves the lowest score (most uncertain) first.
    client.projects.update(id=project.id, sampling="Uncertainty sampling", model_version=version.name)
    resp = requests.get(
        f"{label_studio.url}/api/projects/{project.id}/next", headers=label_studio.auth_headers, timeout=30
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"] == min(scores, key=scores.get)


def test_image_references_label_studio_hands_over(label_studio, backend_factory, tmp_path, trained_net):
    """Uploaded files, local-files storage URLs and plain paths all predict the same."""
    client = label_studio.client()
    project = client.projects.create(title="emloop references", label_config=BRUSH_CONFIG)
    ((path, _),) = write_images(label_studio.document_root / f"refs{project.id}", [(192, 224)], seed=3)
    model_dir = tmp_path / "models"
    publish(trained_net, model_dir, project.id)
    backend = backend_factory(label_studio=label_studio, model_dir=model_dir)
    (upload_id,) = label_studio.upload_files(project.id, [path])
    uploaded = client.tasks.get(upload_id).data["img"]
    assert uploaded.startswith("/data/upload/")
    # Label Studio serves /data/local-files/ only below a project's local storage.
    client.import_storage.local.create(project=project.id, path=str(path.parent), use_blob_urls=True)
    relative = path.relative_to(label_studio.document_root)
    references = [uploaded, f"/data/local-files/?d={relative}", str(path), f"{label_studio.url}{uploaded}"]
    body = {
        "project": f"{project.id}.0",
        "label_config": BRUSH_CONFIG,
        "tasks": [{"id": i, "data": {"img": ref}} for i, ref in enumerate(references)],
    }
    resp = requests.post(f"{backend.url}/predict", json=body, timeout=100)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r.get("error") for r in results] == [None] * len(results)
    rles = [[region["value"]["rle"] for region in r["result"]] for r in results]
    assert rles[0], "the trained checkpoint should find mitochondria"
    assert all(r == rles[0] for r in rles)
