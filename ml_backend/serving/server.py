"""The HTTP protocol Label Studio speaks to ML backends, on Flask 3.

Routes: `GET /` and `/health` (never touch the model, so they answer at once),
`POST /setup`, `POST /predict`, `POST /webhook`, `GET /versions`, `GET /status`, `GET /metrics`. Caller errors
are 4xx with `{"error": ...}`; nothing returns a traceback.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from ml_backend.config import Settings
from ml_backend.jobs.preannotation import enqueue, pending_tasks
from ml_backend.jobs.training_queue import all_statuses
from ml_backend.jobs.training_toggle import turn_on_in_background
from ml_backend.learner.checkpoints import CheckpointStore, trained_version_names
from ml_backend.model import EMSegmentationModel
from ml_backend.serving.base import MLBackendBase, project_key
from ml_backend.serving.runtime import Runtime
from sdk.label_config import LabelConfigError
from sdk.labelstudio import LabelStudioError, ProjectNotFound
from sdk.lru import LRU

log = logging.getLogger(__name__)


def queue_project(runtime: Runtime, project: str, *, include_labeled: bool = False) -> dict:
    """Queue every task of `project` without a prediction of the version the backend serves."""
    settings = runtime.settings
    api = runtime.images.label_studio
    info = api.project(int(project))
    target = settings.brush_target(info.get("label_config"))
    store = CheckpointStore.for_settings(settings, project, target)
    version = runtime.registry.current(store).version.name
    pending = pending_tasks(api, int(project), target.value_key, version, include_labeled=include_labeled)
    jobs = enqueue(runtime.redis, settings, project, version, pending.tasks, pending.already)
    return {
        "project": project,
        "version": version,
        "queued_tasks": len(pending.tasks),
        "jobs": len(jobs),
        "already": pending.already,
        "unusable": pending.unusable,
    }


class Refused(Exception):
    """A request answered with an error status and the reason (4xx; 503 when busy)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


RETRY_AFTER_SECONDS = 5  # a busy /predict: about a few forward passes


# Label Studio's webhook actions; any other is counted as "other", so callers cannot grow /metrics.
WEBHOOK_ACTIONS = frozenset(
    {
        "PROJECT_CREATED",
        "PROJECT_UPDATED",
        "PROJECT_DELETED",
        "TASKS_CREATED",
        "TASKS_DELETED",
        "ANNOTATION_CREATED",
        "ANNOTATIONS_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_DELETED",
        "LABEL_LINK_CREATED",
        "LABEL_LINK_UPDATED",
        "LABEL_LINK_DELETED",
        "START_TRAINING",
    }
)


def _json_body() -> dict:
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        raise Refused("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise Refused("request body must be a JSON object")
    return body


def _utf8(text: str | None) -> bytes:
    """`hmac.compare_digest` takes non-ASCII only as bytes."""
    return (text or "").encode("utf-8", "surrogateescape")


def create_app(
    settings: Settings | None = None, model_class: type[MLBackendBase] = EMSegmentationModel
) -> Flask:
    settings = settings or Settings.from_env()
    runtime = Runtime.from_settings(settings)
    metrics = runtime.metrics
    # Project → label config seen in /setup or /predict, 64 KiB a project on average (real ones
    # are a few KiB); Label Studio sends it with every /predict, so a forgotten one costs nothing.
    configs: LRU[str, str] = LRU(settings.max_projects * 2**16, size=len)
    app = Flask("emloop")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes  # larger bodies: 413
    app.extensions["emloop.runtime"] = runtime

    def refuse(message: str, status: int) -> tuple[Response, int]:
        """A caller error, logged with its reason: Label Studio shows only the status code."""
        log.warning("%s %r refused (%d): %r", request.method, request.path, status, message)
        return jsonify(error=message), status

    def make_model(project: Any, label_config: str | None) -> MLBackendBase:
        try:
            key = project_key(project)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        label_config = label_config or configs.get(key)
        if not label_config:
            raise Refused("no label_config in the request and none known for this project")
        try:
            model = model_class(key, label_config, runtime)
        except LabelConfigError as exc:
            raise Refused(f"label config: {exc}") from None
        configs.put(key, label_config)
        return model

    @app.before_request
    def _authenticate() -> Response | None:
        g.started = time.perf_counter()
        if not settings.basic_auth_user:
            return None
        auth = request.authorization
        ok = (
            auth is not None
            and hmac.compare_digest(_utf8(auth.username), _utf8(settings.basic_auth_user))
            and hmac.compare_digest(_utf8(auth.password), _utf8(settings.basic_auth_pass))
        )
        if ok:
            return None
        resp, status = refuse("authentication required", 401)
        resp.status_code = status
        resp.headers["WWW-Authenticate"] = 'Basic realm="emloop"'
        return resp

    @app.after_request
    def _count(resp: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.inc(
            "emloop_http_requests_total",
            help="HTTP requests by route and status",
            route=endpoint,
            status=str(resp.status_code),
        )
        started = g.get("started")
        if started is not None:
            metrics.observe(
                "emloop_http_request",
                time.perf_counter() - started,
                help="time spent answering",
                route=endpoint,
            )
        return resp

    @app.errorhandler(Refused)
    def _refused(exc: Refused) -> tuple[Response, int]:
        resp, status = refuse(str(exc), exc.status)
        if status == 503:
            resp.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return resp, status

    @app.errorhandler(RedisError)
    def _redis_down(exc: RedisError) -> tuple[Response, int]:
        log.error("Redis at %s unavailable: %s", settings.redis_url, exc)
        return jsonify(error=f"training queue unavailable (Redis: {type(exc).__name__}); retry later"), 503

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        return refuse(exc.description or exc.name, exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error ({type(exc).__name__}); see the backend's log"), 500

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        """Label Studio needs only `status`; the device and the served versions (project ids)
        are shown only to callers that authenticated, i.e. when basic auth is on."""
        body: dict[str, Any] = {"status": "UP", "model_class": model_class.__name__}
        if settings.basic_auth_user:
            body.update(device=str(runtime.registry.device), serving=runtime.registry.loaded_versions())
        return jsonify(body)

    @app.post("/setup")
    def setup() -> Response:
        body = _json_body()
        model = make_model(body.get("project"), body.get("schema"))
        turn_on_in_background(runtime.training(model.project_id), runtime.images.label_studio)
        return jsonify(model_version=model.model_version)

    @app.post("/predict")
    def predict() -> tuple[Response, int]:
        if not runtime.predict_admission.acquire(blocking=False):
            raise Refused(
                f"busy: {settings.predict_queue} predictions queued (PREDICT_QUEUE); retry later", 503
            )
        try:
            return _predict()
        finally:
            runtime.predict_admission.release()

    def _predict() -> tuple[Response, int]:
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise Refused("`tasks` must be a list of Label Studio tasks")
        if not tasks:
            raise Refused("`tasks` is empty: nothing to predict")
        model = make_model(body.get("project"), body.get("label_config"))
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        good = [t for t in tasks if isinstance(t, dict)]
        predicted = iter(model.predict(good, context=params.get("context")))
        results = [
            next(predicted) if isinstance(t, dict) else {"error": "task must be a JSON object"} for t in tasks
        ]
        failed = [r for r in results if "error" in r]
        queued = sum(1 for r in results if r.get("queued"))
        predicted = len(results) - len(failed) - queued
        metrics.inc("emloop_predicted_tasks_total", predicted, help="tasks given a prediction")
        metrics.inc("emloop_queued_tasks_total", queued, help="tasks handed to the workers (no time left)")
        metrics.inc("emloop_failed_tasks_total", len(failed), help="tasks that could not be predicted")
        for r in failed:
            log.warning("task %s not predicted: %s", r.get("task"), r["error"])
        if len(failed) == len(results):
            return jsonify(error=f"no task could be predicted: {failed[0]['error']}", results=results), 422
        # The version the predictions came from, even if a newer one was loaded meanwhile.
        served = next((r["model_version"] for r in results if "model_version" in r), model.model_version)
        return jsonify(results=results, model_version=served), 200

    @app.post("/webhook")
    def webhook() -> Response:
        body = _json_body()
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise Refused("webhook body has no `action`")
        counted = action if action in WEBHOOK_ACTIONS | model_class.TRAINING_EVENTS else "other"
        metrics.inc("emloop_webhooks_total", help="webhook events received", action=counted)
        if action not in model_class.TRAINING_EVENTS:
            return jsonify(status="ignored", action=action)
        project = body.get("project")
        label_config = project.get("label_config") if isinstance(project, dict) else None
        model = make_model(project, label_config)
        return jsonify(action=action, **model.fit(action, body))

    @app.post("/preannotate/<project>")
    def preannotate(project: str) -> Response:
        """Queue pre-annotation of a project's tasks on the workers (`scripts/preannotate.py`)."""
        body = request.get_json(silent=True) if request.data else {}
        include_labeled = bool(body.get("include_labeled")) if isinstance(body, dict) else False
        try:
            key = project_key(project)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        try:
            return jsonify(queue_project(runtime, key, include_labeled=include_labeled))
        except LabelConfigError as exc:
            raise Refused(f"label config: {exc}") from None
        except ProjectNotFound as exc:
            raise Refused(str(exc), 404) from None
        except LabelStudioError as exc:
            raise Refused(f"Label Studio: {exc}", 502) from None

    @app.get("/versions")
    def model_versions() -> Response:
        """Label Studio's model-version list (asked without a project): every trained version."""
        return jsonify(versions=trained_version_names(settings.model_dir))

    @app.get("/status")
    def training_status() -> Response:
        """Training state of every project: queued / waiting / running (progress) / result / error."""
        return jsonify(projects=all_statuses(runtime.redis, settings.queue_name))

    @app.get("/status/<project>")
    def project_status(project: str) -> Response:
        try:
            key = project_key(project)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        return jsonify(runtime.training(key).status())

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    return app
