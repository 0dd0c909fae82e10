"""The Flask app through its test client: the Label Studio ML backend protocol and its error paths."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flask.testing import FlaskClient
from PIL import Image
from redis import Redis
from rq import Queue

from ml_backend.config import Settings
from ml_backend.learner.checkpoints import CheckpointStore, version_name
from ml_backend.learner.inference import predict_image
from ml_backend.learner.network import UNetConfig, build_unet
from ml_backend.serving.server import create_app
from sdk.brush import rle_to_mask
from sdk.label_config import parse_brush_target
from sdk.predictions import confidence_score

from .helpers import UNIT_REDIS_URL

CONFIG = (
    '<View><Image name="em" value="$image"/><BrushLabels name="brush" toName="em">'
    '<Label value="Membrane"/><Label value="Mito"/></BrushLabels></View>'
)
TARGET = parse_brush_target(CONFIG)
REDIS_DOWN = "redis://127.0.0.1:1/0"


# Tiny networks on 2 busy cores: a second torch thread only slows them down.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = {
        "model_dir": tmp_path / "models",
        "redis_url": REDIS_DOWN,
        "label_studio_url": "http://127.0.0.1:1",
        "image_timeout": 5.0,
        "tile_size": 64,
        "tile_overlap": 16,
        "local_files_roots": (tmp_path,),
    }
    return Settings(**{**values, **overrides})


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    return create_app(make_settings(tmp_path)).test_client()


@pytest.fixture
def image_path(tmp_path: Path) -> str:
    yy, xx = np.mgrid[:48, :64]
    pixels = ((np.sin(yy / 4) + np.cos(xx / 6)) * 60 + 128).astype(np.uint8)
    path = tmp_path / "slice.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def load(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def assert_clean_error(resp, status: int) -> str:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.is_json
    body = resp.get_json()
    assert isinstance(body["error"], str) and body["error"]
    text = resp.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    return body["error"]


def predict(client: FlaskClient, tasks, **extra):
    body = {"tasks": tasks, "project": "12.1712345678", "label_config": CONFIG, **extra}
    return client.post("/predict", json=body)


def one_task(**fields) -> dict:
    return {"json": {"tasks": [{"id": 1}], "project": "1", "label_config": CONFIG, **fields}}


# -- health and setup ------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/", "/health"])
def test_health(client: FlaskClient, route: str) -> None:
    resp = client.get(route)
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "UP"
    assert body["model_class"] == "EMSegmentationModel"
    assert set(body) == {"status", "model_class"}  # no internals without basic auth


def test_setup_returns_model_version(client: FlaskClient) -> None:
    resp = client.post("/setup", json={"project": "12.1712345678", "schema": CONFIG})
    assert resp.status_code == 200
    assert resp.get_json() == {"model_version": version_name(0, TARGET)}


# -- predict -------------------------------------------------------------------------------------


def test_predict_local_image(client: FlaskClient, image_path: str) -> None:
    resp = predict(client, [{"id": 1, "data": {"image": image_path}}])
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["model_version"] == version_name(0, TARGET)
    [prediction] = body["results"]
    assert prediction["model_version"] == body["model_version"]
    assert isinstance(prediction["score"], float) and 0.0 <= prediction["score"] <= 1.0
    # Version 0 is the seeded initial network: the same prediction can be made here.
    probs = predict_image(build_unet(UNetConfig(n_classes=3)), load(image_path), tile=64, overlap=16).probs
    assert prediction["score"] == pytest.approx(confidence_score(probs), abs=1e-4)


def test_the_envelope_names_the_version_the_predictions_came_from(
    client: FlaskClient, image_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version loaded while a request predicts must not relabel that request's predictions."""
    from ml_backend.model import EMSegmentationModel

    monkeypatch.setattr(EMSegmentationModel, "model_version", property(lambda self: "v99-loaded-meanwhile"))
    body = predict(client, [{"id": 1, "data": {"image": image_path}}]).get_json()
    assert body["results"][0]["model_version"] == version_name(0, TARGET)
    assert body["model_version"] == body["results"][0]["model_version"]


def test_predict_serves_new_checkpoint_and_regions_match(
    client: FlaskClient, image_path: str, tmp_path: Path
) -> None:
    assert predict(client, [{"id": 1, "data": {"image": image_path}}]).status_code == 200
    # A training job publishes version 1: a random head, each class's logit centred on its
    # median over this image, so that every class wins somewhere and the check is not vacuous.
    net = build_unet(UNetConfig(n_classes=3))
    features: list[torch.Tensor] = []
    hook = net.head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    predict_image(net, load(image_path), tile=64, overlap=16)
    hook.remove()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        net.head.weight.copy_(torch.randn(net.head.weight.shape, generator=gen) * 5)
        logits = net.head(torch.cat(features)).transpose(0, 1).flatten(1)
        net.head.bias.sub_(logits.median(dim=1).values)
    store = CheckpointStore.for_project(tmp_path / "models", "12", TARGET)
    v1 = store.save(net, parent=store.latest(), metrics={})
    resp = predict(client, [{"id": 1, "data": {"image": image_path}}])
    body = resp.get_json()
    assert body["model_version"] == v1.name  # picked up without a restart
    [prediction] = body["results"]
    probs = predict_image(net, load(image_path), tile=64, overlap=16).probs
    expected = probs.argmax(axis=0)
    assert len(np.unique(expected)) == 3  # the check below is not vacuous
    assert prediction["score"] == pytest.approx(confidence_score(probs), abs=1e-4)
    labels = np.zeros((48, 64), np.int64)
    for region in prediction["result"]:
        assert (region["from_name"], region["to_name"], region["type"]) == ("brush", "em", "brushlabels")
        assert (region["original_width"], region["original_height"]) == (64, 48)
        [name] = region["value"]["brushlabels"]
        labels[rle_to_mask(region["value"]["rle"], 48, 64) > 0] = 1 + TARGET.labels.index(name)
    assert len(prediction["result"]) == 2
    assert (labels == expected).mean() > 0.995  # identical but for float near-ties (channels_last)


def test_predict_several_tasks_in_order(client: FlaskClient, image_path: str) -> None:
    tasks = [{"id": i, "data": {"image": image_path}} for i in range(3)]
    body = predict(client, tasks).get_json()
    assert len(body["results"]) == 3
    assert all("error" not in r for r in body["results"])
    assert len({r["score"] for r in body["results"]}) == 1  # same image, same model


def test_predict_uses_config_from_setup(client: FlaskClient, image_path: str) -> None:
    task = {"id": 1, "data": {"image": image_path}}
    err = assert_clean_error(client.post("/predict", json={"tasks": [task], "project": "5.1"}), 400)
    assert "label_config" in err
    client.post("/setup", json={"project": "5.1", "schema": CONFIG})
    resp = client.post("/predict", json={"tasks": [task], "project": "5.1"})
    assert resp.status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": "not json", "content_type": "text/plain"}, "JSON object"),
        ({"data": "{not json", "content_type": "application/json"}, "JSON object"),
        ({"json": ["tasks"]}, "JSON object"),
        ({"json": "tasks"}, "JSON object"),
        ({"json": {"project": "1", "label_config": CONFIG}}, "`tasks` must be a list"),
        (one_task(tasks={"id": 1}), "`tasks` must be a list"),
        (one_task(tasks=None), "`tasks` must be a list"),
        (one_task(tasks=[]), "empty"),
        (one_task(label_config="<View/>"), "label config"),
        (one_task(label_config="<View"), "label config"),
        (one_task(label_config=CONFIG.replace("Image", "Text")), "label config"),
        (one_task(label_config=CONFIG.replace("Brush", "Rectangle")), "label config"),
        (one_task(project="../etc"), "invalid project id"),
        (one_task(project="a b"), "invalid project id"),
        (one_task(project=None), "invalid project id"),
        (one_task(project={"id": "x;y"}), "invalid project id"),
    ],
)
def test_predict_bad_requests(client: FlaskClient, kwargs: dict, message: str) -> None:
    assert message in assert_clean_error(client.post("/predict", **kwargs), 400)


def test_one_bad_task_among_good_ones(client: FlaskClient, image_path: str) -> None:
    tasks = [
        {"id": 1, "data": {"image": image_path}},
        {"id": 2, "data": {"picture": image_path}},  # wrong field
        "not a task",
        {"id": 4, "data": {"image": "/data/upload/1/missing.png"}},  # Label Studio unreachable
        {"id": 5, "data": {"image": image_path}},
    ]
    resp = predict(client, tasks)
    assert resp.status_code == 200
    results = resp.get_json()["results"]
    assert len(results) == 5
    assert "score" in results[0] and "score" in results[4]
    assert results[1]["task"] == 2 and "'image'" in results[1]["error"]
    assert results[2] == {"error": "task must be a JSON object"}
    assert results[3]["task"] == 4 and "cannot download" in results[3]["error"]


def test_all_tasks_bad(client: FlaskClient, tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"definitely not a png")
    tasks = [{"id": 1, "data": {}}, {"id": 2, "data": {"image": str(tmp_path / "junk.png")}}]
    resp = predict(client, tasks)
    err = assert_clean_error(resp, 422)
    assert err.startswith("no task could be predicted")
    results = resp.get_json()["results"]
    assert [r["task"] for r in results] == [1, 2]
    assert "not a readable image" in results[1]["error"]


# -- webhook -------------------------------------------------------------------------------------


def test_webhook_unknown_action_ignored(client: FlaskClient) -> None:
    resp = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}})
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ignored", "action": "PROJECT_UPDATED"}


@pytest.mark.parametrize("body", [{}, {"action": ""}, {"action": 5}, {"project": {"id": 3}}])
def test_webhook_without_action(client: FlaskClient, body: dict) -> None:
    assert "action" in assert_clean_error(client.post("/webhook", json=body), 400)


def test_webhook_not_json(client: FlaskClient) -> None:
    assert_clean_error(client.post("/webhook", data="x", content_type="text/plain"), 400)


def test_training_webhook_without_label_config(client: FlaskClient) -> None:
    resp = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}})
    assert "label_config" in assert_clean_error(resp, 400)


def test_training_webhook_with_redis_down(client: FlaskClient) -> None:
    body = {"action": "ANNOTATION_CREATED", "project": {"id": 3, "label_config": CONFIG}}
    err = assert_clean_error(client.post("/webhook", json=body), 503)
    assert "training queue unavailable" in err
    assert "unavailable" in assert_clean_error(client.get("/status/3"), 503)
    assert "unavailable" in assert_clean_error(client.get("/status"), 503)


def test_training_webhook_queues_a_job(tmp_path: Path, redis: Redis) -> None:
    project, queue_name = f"test-{uuid.uuid4().hex[:12]}", f"emloop-test-{uuid.uuid4().hex[:12]}"
    settings = make_settings(tmp_path, redis_url=UNIT_REDIS_URL, queue_name=queue_name)
    client = create_app(settings).test_client()
    try:
        body = {"action": "ANNOTATION_CREATED", "project": {"id": project, "label_config": CONFIG}}
        first = client.post("/webhook", json=body)
        second = client.post("/webhook", json=body)
        assert first.status_code == second.status_code == 200
        assert first.get_json() == {"action": "ANNOTATION_CREATED", "queued": True, "generation": 1}
        assert second.get_json() == {"action": "ANNOTATION_CREATED", "queued": False, "generation": 2}
        assert Queue(queue_name, connection=redis).count == 1
        status = client.get(f"/status/{project}").get_json()
        assert status["project"] == project and status["state"] == "queued"
    finally:
        Queue(queue_name, connection=redis).delete(delete_jobs=True)
        keys = list(redis.scan_iter(match=f"emloop:train:{project}:*"))
        if keys:
            redis.delete(*keys)


def test_status_rejects_bad_project(client: FlaskClient) -> None:
    assert "invalid project id" in assert_clean_error(client.get("/status/a%20b"), 400)


# -- auth, errors, metrics -----------------------------------------------------------------------


def test_basic_auth(tmp_path: Path) -> None:
    client = create_app(make_settings(tmp_path, basic_auth_user="ls", basic_auth_pass="s3cret")).test_client()

    def auth(user: str, password: str) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    resp = client.get("/health")
    assert_clean_error(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert_clean_error(client.get("/health", headers=auth("ls", "wrong")), 401)
    assert_clean_error(client.get("/health", headers=auth("other", "s3cret")), 401)
    assert_clean_error(client.post("/setup", json={"project": "1", "schema": CONFIG}), 401)
    assert client.get("/health", headers=auth("ls", "s3cret")).status_code == 200
    resp = client.post("/setup", json={"project": "1", "schema": CONFIG}, headers=auth("ls", "s3cret"))
    assert resp.status_code == 200
    # Authenticated callers see the internals: the device and what each project serves.
    body = client.get("/health", headers=auth("ls", "s3cret")).get_json()
    assert body["device"] in ("cpu", "cuda")
    assert list(body["serving"].values()) == [resp.get_json()["model_version"]]


def test_hostile_input_gets_4xx_never_5xx(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, basic_auth_user="ls", basic_auth_pass="pässwörd", max_request_bytes=2**20
    )
    client = create_app(settings).test_client()

    def auth(user: str, password: str) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    ok = auth("ls", "pässwörd")
    nested = '{"tasks": ' + "[" * 100_000 + "]" * 100_000 + "}"
    post = client.post
    assert "nested" in assert_clean_error(
        post("/predict", data=nested, content_type="application/json", headers=ok), 400
    )
    long_id = "7" * 300
    assert "project id" in assert_clean_error(
        post("/setup", json={"project": long_id, "schema": CONFIG}, headers=ok), 400
    )
    assert "project id" in assert_clean_error(client.get(f"/status/{long_id}", headers=ok), 400)
    assert_clean_error(client.get("/health", headers=auth("émile", "ünïcode")), 401)
    assert_clean_error(client.get("/health", headers=auth("ls", "passwörd")), 401)
    assert_clean_error(
        post("/setup", data=b"{" + b" " * 2**20 + b"}", content_type="application/json", headers=ok), 413
    )
    assert client.get("/health", headers=ok).status_code == 200


def test_label_count_limit(tmp_path: Path) -> None:
    client = create_app(make_settings(tmp_path, max_labels=1)).test_client()
    error = assert_clean_error(client.post("/setup", json={"project": "1", "schema": CONFIG}), 400)
    assert "has 2 labels, more than 1 (MAX_LABELS)" in error


def test_prediction_memory_limit_fails_only_its_task(tmp_path: Path, image_path: str) -> None:
    # 48 x 64 pixels x 3 classes x 12 B = 110 592 B: over the limit; 16 x 16 is not.
    client = create_app(make_settings(tmp_path, max_predict_bytes=50_000)).test_client()
    small = tmp_path / "small.png"
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(small)
    resp = predict(
        client, [{"id": 1, "data": {"image": image_path}}, {"id": 2, "data": {"image": str(small)}}]
    )
    assert resp.status_code == 200
    big, ok = resp.get_json()["results"]
    assert (
        big["task"] == 1
        and "a 48x64 image with 3 classes" in big["error"]
        and "MAX_PREDICT_MB" in big["error"]
    )
    assert "error" not in ok and ok["model_version"]


def test_projects_kept_in_memory_are_bounded(tmp_path: Path, image_path: str) -> None:
    app = create_app(make_settings(tmp_path, max_projects=2, basic_auth_user="ls", basic_auth_pass="pw"))
    client, auth = app.test_client(), {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    padded = CONFIG + "<!-- " + "x" * 50_000 + " -->"  # 50 KB: three do not fit in 2 x 64 KiB
    for project in ("1", "2", "3"):
        resp = client.post("/setup", json={"project": project, "schema": padded}, headers=auth)
        assert resp.status_code == 200
    serving = client.get("/health", headers=auth).get_json()["serving"]
    assert len(serving) == 2  # project 1's network was dropped
    # Project 1's label config was forgotten too: /predict must carry it again (Label Studio's does).
    task = [{"id": 1, "data": {"image": image_path}}]
    body = {"project": "1", "tasks": task}
    assert "none known" in assert_clean_error(client.post("/predict", json=body, headers=auth), 400)
    resp = client.post("/predict", json={**body, "label_config": CONFIG}, headers=auth)
    assert resp.status_code == 200 and resp.get_json()["results"][0]["result"]  # reloaded from disk
    assert len(client.get("/health", headers=auth).get_json()["serving"]) == 2


def test_metrics_labels_are_escaped_and_bounded(client: FlaskClient) -> None:
    for i in range(20):
        client.post("/webhook", json={"action": f'A{i}"}} 1\nemloop_injected 1\n#', "project": {"id": 1}})
    text = client.get("/metrics").get_data(as_text=True)
    assert not any(line.startswith("emloop_injected") for line in text.splitlines())
    assert 'emloop_webhooks_total{action="other"} 20' in text


def test_versions_lists_every_trained_version_newest_first(client: FlaskClient, tmp_path: Path) -> None:
    assert client.get("/versions").get_json() == {"versions": []}
    names = []
    for project in ("12", "13", "12"):
        store = CheckpointStore.for_project(tmp_path / "models", project, TARGET)
        names.append(store.save(build_unet(UNetConfig(n_classes=3)), parent=store.latest(), metrics={}).name)
    (tmp_path / "models" / "project-99" / "x").mkdir(parents=True)
    (tmp_path / "models" / "project-99" / "x" / "manifest.json").write_text("{torn")
    # Label Studio asks without a project: every project's versions (names repeat across projects).
    assert client.get("/versions").get_json() == {"versions": [names[2], names[0]]}


def test_unknown_route_and_method(client: FlaskClient) -> None:
    assert_clean_error(client.get("/nope"), 404)
    assert_clean_error(client.get("/predict"), 405)


def test_metrics(client: FlaskClient, image_path: str) -> None:
    client.get("/health")
    predict(client, [{"id": 1, "data": {"image": image_path}}, {"id": 2, "data": {}}])
    client.post("/webhook", json={"action": "PROJECT_UPDATED"})
    client.post("/predict", json=[])
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.mimetype == "text/plain"
    text = resp.get_data(as_text=True)
    assert 'emloop_http_requests_total{route="/health",status="200"} 1' in text
    assert 'emloop_http_requests_total{route="/predict",status="200"} 1' in text
    assert 'emloop_http_requests_total{route="/predict",status="400"} 1' in text
    assert "emloop_predicted_tasks_total 1" in text
    assert "emloop_failed_tasks_total 1" in text
    assert 'emloop_webhooks_total{action="PROJECT_UPDATED"} 1' in text
    assert 'emloop_http_request_seconds_count{route="/predict"} 2' in text
    assert "# TYPE emloop_http_requests_total counter" in text
