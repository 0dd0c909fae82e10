"""The model-class contract of label-studio-ml 2.x, without its Flask 1 pins.

A backend model is created per request for one project and label config;
heavy state (loaded networks, image cache) lives in the shared `Runtime`.
"""

from __future__ import annotations

from typing import Any

from ml_backend.serving.runtime import Runtime

MAX_PROJECT_ID = 64  # characters: the id names a directory, and file names have limits


def project_key(project: Any) -> str:
    """Label Studio sends `"<id>.<created-timestamp>"` to /predict and /setup, `{"id": ...}` to /webhook."""
    if isinstance(project, dict):
        project = project.get("id")
    key = str(project if project is not None else "").split(".")[0].strip()
    core = key.replace("-", "").replace("_", "")
    if not core or not core.isascii() or not core.isalnum() or len(key) > MAX_PROJECT_ID:
        raise ValueError(f"invalid project id {project!r:.80}")
    return key


class MLBackendBase:
    """Subclass and implement `setup`, `predict` and `fit`, as with label-studio-ml."""

    #: Webhook actions that reach `fit`; any other event is acknowledged and ignored.
    TRAINING_EVENTS: frozenset[str] = frozenset()

    def __init__(self, project_id: Any, label_config: str | None, runtime: Runtime) -> None:
        self.project_id = project_key(project_id)
        self.label_config = label_config
        self.runtime = runtime
        self.setup()

    def setup(self) -> None:
        """Parse the label config and find the model; must be fast (3 s server timeout)."""

    @property
    def model_version(self) -> str:
        raise NotImplementedError

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> list[dict]:
        """One entry per task, in order: a prediction, or `{"error": ...}` for a task that failed."""
        raise NotImplementedError

    def fit(self, event: str, data: dict, **kwargs: Any) -> dict:
        """React to a Label Studio webhook event; return a short JSON-able status."""
        return {"status": "ignored"}
