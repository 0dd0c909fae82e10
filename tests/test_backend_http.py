"""Bad input against the running backend process: clear 4xx JSON errors, no tracebacks,
one bad task never fails the others, and the server keeps serving afterwards."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from devtools.processes import find_free_port
from ml_backend.learner.network import build_unet
from sdk.label_config import parse_brush_target

from .helpers import BRUSH_CONFIG, SMALL_NET, publish, write_images

pytestmark = pytest.mark.integration

NO_BRUSH = (
    '<View><Image name="em" value="$img"/><Choices name="c" toName="em"><Choice value="a"/></Choices></View>'
)
NO_IMAGE = (
    '<View><Text name="t" value="$t"/>'
    '<BrushLabels name="b" toName="t"><Label value="x"/></BrushLabels></View>'
)


def _post(url: str, **kwargs) -> requests.Response:
    resp = requests.post(url, timeout=100, **kwargs)
    assert "Traceback" not in resp.text
    return resp


def _predict(backend, tasks, label_config=BRUSH_CONFIG, project="1.0") -> requests.Response:
    return _post(
        f"{backend.url}/predict", json={"project": project, "label_config": label_config, "tasks": tasks}
    )


@pytest.fixture
def project_with_image(label_studio, tmp_path):
    client = label_studio.client()
    project = client.projects.create(title="emloop bad input", label_config=BRUSH_CONFIG)
    ((path, _),) = write_images(tmp_path / "img", [(128, 160)])
    (task_id,) = label_studio.upload_files(project.id, [path])
    return project.id, client.tasks.get(task_id).data["img"], path


def test_malformed_requests_get_clear_4xx(backend_factory):
    backend = backend_factory()
    url = backend.url
    cases = [
        (_post(f"{url}/predict", data="not json", headers={"Content-Type": "application/json"}), 400),
        (_post(f"{url}/predict", data="[1, 2]", headers={"Content-Type": "application/json"}), 400),
        (_post(f"{url}/predict", json={"project": "1.0", "label_config": BRUSH_CONFIG}), 400),
        (_post(f"{url}/predict", json={"project": "1.0", "label_config": BRUSH_CONFIG, "tasks": "x"}), 400),
        (_predict(backend, []), 400),
        (_predict(backend, [{"id": 1, "data": {"img": "x.png"}}], label_config=NO_BRUSH), 400),
        (_predict(backend, [{"id": 1, "data": {"img": "x.png"}}], label_config=NO_IMAGE), 400),
        (_predict(backend, [{"id": 1, "data": {"img": "x.png"}}], label_config="<View"), 400),
        (_post(f"{url}/setup", json={"project": "1.0", "schema": NO_BRUSH}), 400),
        (_post(f"{url}/setup", json={"project": "../etc", "schema": BRUSH_CONFIG}), 400),
        (_post(f"{url}/webhook", data="{", headers={"Content-Type": "application/json"}), 400),
        (_post(f"{url}/webhook", json={"project": {"id": 1}}), 400),
        (requests.get(f"{url}/no-such-route", timeout=10), 404),
    ]
    for resp, status in cases:
        assert resp.status_code == status, (resp.request.body, resp.text)
        assert isinstance(resp.json().get("error"), str) and resp.json()["error"]
    # Unknown webhook events are cheap acknowledgements.
    resp = _post(f"{url}/webhook", json={"action": "SOMETHING_NEW", "project": {"id": 1}})
    assert resp.status_code == 200 and resp.json()["status"] == "ignored"
    assert requests.get(f"{url}/health", timeout=1).json()["status"] == "UP"


def test_bad_images_fail_alone(label_studio, backend_factory, project_with_image, tmp_path):
    project_id, uploaded, path = project_with_image
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((700, 700), np.uint8)).save(big)
    zeros = tmp_path / "zeros.png"  # tiny on disk, large to predict: 300 x 300 x 2 classes x 12 B > 1 MiB
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(zeros)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    backend = backend_factory(
        label_studio=label_studio, env={"MAX_IMAGE_PIXELS": str(600 * 600), "MAX_PREDICT_MB": "1"}
    )
    closed_port = find_free_port()
    tasks = [
        {"id": 1, "data": {"img": uploaded}},
        {"id": 2, "data": {"img": "/no/such/image.png"}},
        {"id": 3, "data": {"img": f"http://127.0.0.1:{closed_port}/x.png"}},
        {"id": 4, "data": {"img": str(text)}},
        {"id": 5, "data": {"img": str(big)}},
        {"id": 6, "data": {"other": "no image field"}},
        {"id": 7, "data": {"img": str(path)}},
        {"id": 8, "data": {"img": str(zeros)}},
    ]
    resp = _predict(backend, tasks, project=f"{project_id}.0")
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == len(tasks)
    errors = {r["task"]: r["error"] for r in results if "error" in r}
    assert sorted(errors) == [2, 3, 4, 5, 6, 8]
    assert "HTTP 404" in errors[2]
    assert "cannot download" in errors[3]
    assert "not a readable image" in errors[4]
    assert "MAX_IMAGE_PIXELS" in errors[5]
    assert "'img'" in errors[6]
    assert "MAX_PREDICT_MB" in errors[8]
    for good in (results[0], results[6]):
        assert 0.0 <= good["score"] <= 1.0 and "result" in good
    # All tasks bad: the whole request is unprocessable, with the reason.
    resp = _predict(backend, tasks[1:3], project=f"{project_id}.0")
    assert resp.status_code == 422 and "HTTP 404" in resp.json()["error"]
    assert requests.get(f"{backend.url}/health", timeout=1).status_code == 200


def test_local_files_only_under_the_roots(backend_factory, tmp_path):
    """Task data must never make the backend read its own files: only LOCAL_FILES_ROOTS."""
    ((inside, _),) = write_images(tmp_path / "root", [(96, 128)])
    ((outside, _),) = write_images(tmp_path / "elsewhere", [(96, 128)], seed=1)
    (tmp_path / "root" / "link.png").symlink_to(outside)
    closed = f"http://127.0.0.1:{find_free_port()}"
    backend = backend_factory(
        env={
            "LOCAL_FILES_ROOTS": str(tmp_path / "root"),
            "LABEL_STUDIO_URL": closed,
            "IMAGE_HOSTS": "*.example.org",
        }
    )
    refs = {
        1: str(inside),
        2: str(outside),  # a valid PNG outside the roots
        3: outside.as_uri(),
        4: "file:///dev/zero",
        5: "/dev/zero",
        6: "/proc/self/environ",
        7: "file:///etc",
        8: "file:///nonexistent",
        9: "http://[::1/x.png",
        10: str(tmp_path / "root" / "link.png"),
        11: inside.as_uri(),
        12: f"http://localhost:{find_free_port()}/x.png",  # not Label Studio, not in IMAGE_HOSTS
    }
    resp = _predict(backend, [{"id": i, "data": {"img": ref}} for i, ref in refs.items()])
    assert resp.status_code == 200, resp.text
    results = {r.get("task", i + 1): r for i, r in enumerate(resp.json()["results"])}
    assert all(0.0 <= results[i]["score"] <= 1.0 for i in (1, 11))
    errors = {i: r["error"] for i, r in results.items() if "error" in r}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12]
    for i in (3, 4, 7, 8):
        assert "only under LOCAL_FILES_ROOTS" in errors[i], errors[i]
    for i in (2, 5, 6):  # absolute paths outside the roots are Label Studio paths, never read here
        assert "cannot download" in errors[i] and "LOCAL_FILES_ROOTS" in errors[i], errors[i]
    assert errors[9] == "malformed URL: ValueError: Invalid IPv6 URL"
    assert "outside LOCAL_FILES_ROOTS" in errors[10]
    assert "host not in IMAGE_HOSTS" in errors[12]  # refused without a request: no port probing
    assert not any("0x" in e for e in errors.values())
    health = requests.get(f"{backend.url}/health", timeout=1).json()
    assert set(health) == {"status", "model_class"}  # no internals without basic auth


def test_caller_errors_are_4xx_with_their_reason_logged(backend_factory):
    """Hostile or broken input never gets a 5xx; each refusal's reason is in the log, without secrets."""
    backend = backend_factory(
        env={"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "s3cret", "MAX_REQUEST_MB": "1", "MAX_PROJECTS": "1"}
    )
    url, auth = backend.url, ("ls", "s3cret")

    def post(route: str, **kwargs) -> requests.Response:
        return _post(f"{url}{route}", auth=kwargs.pop("auth", auth), **kwargs)

    nested = '{"tasks": ' + "[" * 100_000 + "]" * 100_000 + "}"
    long_id = "1" * 300
    webhook = {"action": "ANNOTATION_CREATED", "project": {"id": long_id, "label_config": BRUSH_CONFIG}}
    many_labels = BRUSH_CONFIG.replace(
        '<Label value="Mitochondria" background="#ff0000"/>',
        "".join(f'<Label value="c{i}"/>' for i in range(40)),
    )
    cases = [
        (post("/predict", data=nested, headers={"Content-Type": "application/json"}), 400, "nested"),
        (post("/setup", json={"project": f"{long_id}.0", "schema": BRUSH_CONFIG}), 400, "project id"),
        (post("/webhook", json=webhook), 400, "project id"),
        (requests.get(f"{url}/status/{long_id}", auth=auth, timeout=10), 400, "project id"),
        (post("/setup", json={"project": "١٢", "schema": BRUSH_CONFIG}), 400, "project id"),
        (post("/setup", json={"project": "3.0", "schema": many_labels}), 400, "MAX_LABELS"),
        (post("/health", auth=("émile".encode(), "pässwörd".encode())), 401, "authentication"),
        (post("/setup", auth=(b"\xff\xfe", b"\xc3"), json={}), 401, "authentication"),
        (
            post("/setup", data=b"{" + b" " * 2**20 + b"}", headers={"Content-Type": "application/json"}),
            413,
            "",
        ),
    ]
    for resp, status, reason in cases:
        assert resp.status_code == status, (status, resp.text[:300])
        assert reason in resp.json()["error"]
    health = requests.get(f"{url}/health", auth=auth, timeout=1).json()
    assert health["status"] == "UP" and "device" in health and "serving" in health  # authenticated
    for project in ("1.0", "2.0"):
        assert post("/setup", json={"project": project, "schema": BRUSH_CONFIG}).status_code == 200
    serving = requests.get(f"{url}/health", auth=auth, timeout=1).json()["serving"]
    [(store, _)] = serving.items()  # MAX_PROJECTS=1: project 1's network was dropped
    assert store.startswith("project-2/")  # relative to MODEL_DIR: no absolute paths
    log = backend.log_path.read_text()
    assert log.count("WARNING") >= len(cases) and "s3cret" not in log and "pässwörd" not in log
    assert "nested too deeply" in log and "invalid project id" in log


def test_metrics_cannot_be_injected_or_grown_by_webhooks(backend_factory):
    backend = backend_factory()
    for i in range(50):
        resp = _post(
            f"{backend.url}/webhook", json={"action": f'X{i}"}} 1\nemloop_fake{{a="b', "project": {"id": 1}}
        )
        assert resp.status_code == 200 and resp.json()["status"] == "ignored"
    _post(f"{backend.url}/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    text = requests.get(f"{backend.url}/metrics", timeout=10).text
    assert not any(line.startswith("emloop_fake") for line in text.splitlines())
    webhooks = [line for line in text.splitlines() if line.startswith("emloop_webhooks_total")]
    assert sorted(webhooks) == [
        'emloop_webhooks_total{action="PROJECT_UPDATED"} 1',
        'emloop_webhooks_total{action="other"} 50',
    ]


def test_corrupt_history_is_rebuilt_and_the_served_version_reported(backend_factory, tmp_path):
    """A corrupt manifest and a corrupt newest file: the newest intact version is served and named."""
    model_dir = tmp_path / "models"
    v1, v2, v3 = (publish(build_unet(SMALL_NET, seed=s), model_dir, 5) for s in (1, 2, 3))
    root = model_dir / "project-5" / parse_brush_target(BRUSH_CONFIG).signature
    (root / "v3.pt").write_bytes(b"torn")
    (root / "manifest.json").write_text('{"versions": [')
    files = {p.name: p.read_bytes() for p in root.glob("v*.pt")}
    ((path, _),) = write_images(tmp_path / "img", [(96, 128)])
    backend = backend_factory(model_dir=model_dir)

    setup = _post(f"{backend.url}/setup", json={"project": "5.0", "schema": BRUSH_CONFIG})
    assert setup.json() == {"model_version": v2.name}
    body = _predict(backend, [{"id": 1, "data": {"img": str(path)}}], project="5.0").json()
    assert body["model_version"] == body["results"][0]["model_version"] == v2.name
    # The next training run's save is a new version: nothing overwritten, nothing dropped.
    v4 = publish(build_unet(SMALL_NET, seed=4), model_dir, 5)
    assert v4.number == 4 and all((root / name).read_bytes() == data for name, data in files.items())
    assert [e["name"] for e in json.loads((root / "manifest.json").read_text())["versions"]] == [
        v1.name,
        v2.name,
        v4.name,
    ]
    body = _predict(backend, [{"id": 1, "data": {"img": str(path)}}], project="5.0").json()
    assert body["model_version"] == body["results"][0]["model_version"] == v4.name


def test_wrong_api_key_is_named(label_studio, backend_factory, project_with_image):
    project_id, uploaded, _ = project_with_image
    backend = backend_factory(label_studio=label_studio, env={"LABEL_STUDIO_API_KEY": "0" * 40})
    resp = _predict(backend, [{"id": 1, "data": {"img": uploaded}}], project=f"{project_id}.0")
    assert resp.status_code == 422
    assert "LABEL_STUDIO_API_KEY" in resp.json()["error"]


def test_health_answers_while_predicting(backend_factory, tmp_path):
    """Label Studio gives /health 1 s: it must not wait behind a long prediction."""
    ((path, _),) = write_images(tmp_path / "img", [(1536, 1536)])
    backend = backend_factory()
    done = threading.Event()

    def slow_predict() -> None:
        _predict(backend, [{"id": 1, "data": {"img": str(path)}}] * 3)
        done.set()

    worker = threading.Thread(target=slow_predict)
    worker.start()
    checked = 0
    while not done.is_set() and checked < 20:
        assert requests.get(f"{backend.url}/health", timeout=1).status_code == 200
        assert (
            requests.post(
                f"{backend.url}/setup", json={"project": "1.0", "schema": BRUSH_CONFIG}, timeout=3
            ).status_code
            == 200
        )
        checked += 1
        done.wait(0.2)
    worker.join()
    assert checked >= 2, "the prediction finished before /health could be checked during it"


def test_health_answers_within_a_second_under_a_burst_of_predictions(backend_factory, tmp_path):
    """8 concurrent /predict clients (Label Studio's bulk pre-annotation) while it polls /health."""
    ((path, _),) = write_images(tmp_path / "img", [(1024, 1024)])
    backend = backend_factory()
    statuses: list[int] = []

    def client() -> None:
        for _ in range(2):
            statuses.append(_predict(backend, [{"id": 1, "data": {"img": str(path)}}]).status_code)

    clients = [threading.Thread(target=client) for _ in range(8)]
    for c in clients:
        c.start()
    polls = 0
    while any(c.is_alive() for c in clients):
        # Label Studio's own client timeout: a slower answer shows the model as disconnected.
        assert requests.get(f"{backend.url}/health", timeout=1).status_code == 200
        assert requests.post(
            f"{backend.url}/setup", json={"project": "1.0", "schema": BRUSH_CONFIG}, timeout=3
        ).ok
        polls += 1
        time.sleep(0.1)
    for c in clients:
        c.join()
    assert polls >= 5 and statuses == [200] * 16


def test_predictions_beyond_the_queue_get_503_with_retry_after(backend_factory, tmp_path):
    ((path, _),) = write_images(tmp_path / "img", [(1536, 1536)])
    backend = backend_factory(env={"PREDICT_QUEUE": "1"})
    responses: list[requests.Response] = []
    clients = [
        threading.Thread(
            target=lambda: responses.append(_predict(backend, [{"id": 1, "data": {"img": str(path)}}]))
        )
        for _ in range(4)
    ]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(
        r.headers["Retry-After"] == "5" and "PREDICT_QUEUE" in r.json()["error"] for r in busy
    )
    assert all(r.status_code in (200, 503) for r in responses) and any(
        r.status_code == 200 for r in responses
    )


def test_personal_access_token_fetches_images(label_studio, backend_factory, project_with_image):
    """Label Studio 1.23's personal access tokens (JWT refresh tokens) work as LABEL_STUDIO_API_KEY."""
    project_id, uploaded, _ = project_with_image
    resp = requests.post(f"{label_studio.url}/api/token/", headers=label_studio.auth_headers, timeout=30)
    assert resp.status_code == 201, resp.text
    pat = resp.json()["token"]
    assert pat.count(".") == 2
    backend = backend_factory(label_studio=label_studio, env={"LABEL_STUDIO_API_KEY": pat})
    resp = _predict(backend, [{"id": 1, "data": {"img": uploaded}}], project=f"{project_id}.0")
    assert resp.status_code == 200, resp.text
    assert "error" not in resp.json()["results"][0]
