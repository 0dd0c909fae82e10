"""Thin Label Studio REST access shared by the backend, the worker and the scripts.

label-studio-sdk covers most calls; this adds the few it lacks on the open-source
server (file upload as tasks, Data Manager actions) and one place that knows both
kinds of API key: legacy tokens (``Authorization: Token ...``) and personal access
tokens (JWT refresh tokens exchanged for short-lived access tokens).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import requests

ACCESS_TOKEN_SECONDS = 240  # Label Studio's access tokens live 5 minutes


class LabelStudioError(RuntimeError):
    """Label Studio refused or failed a request; the message says which and why."""


class ProjectNotFound(LabelStudioError):
    """No such project (or not visible with this API key)."""


def label_studio_error_message(exc: BaseException, url: str) -> str | None:
    """One readable line for a label-studio-sdk (HTTP status) or httpx (network) error, else None.

    The SDK's own message dumps every response header; scripts print this instead.
    """
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        body = getattr(exc, "body", None)
        detail = body.get("detail") or body if isinstance(body, dict) else body
        return f"Label Studio at {url} answered HTTP {status}: {detail}"
    if type(exc).__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3"):
        return f"cannot reach Label Studio at {url} ({type(exc).__name__}: {exc})"
    return None


def is_personal_access_token(api_key: str) -> bool:
    return api_key.count(".") == 2


class LabelStudioAPI:
    def __init__(self, url: str, api_key: str, *, timeout: float = 120.0) -> None:
        if not url:
            raise LabelStudioError("no Label Studio URL: set LABEL_STUDIO_URL")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.session = requests.Session()
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, url: str | None = None, api_key: str | None = None) -> LabelStudioAPI:
        url = url or os.environ.get("LABEL_STUDIO_URL", "")
        api_key = api_key if api_key is not None else os.environ.get("LABEL_STUDIO_API_KEY", "")
        if not api_key:
            raise LabelStudioError("no API key: set LABEL_STUDIO_API_KEY (Account & Settings → Access Token)")
        return cls(url, api_key)

    # -- auth ---------------------------------------------------------------------------
    def auth_headers(self, refresh: bool = False) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not is_personal_access_token(self.api_key):
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if refresh or not self._access or self._access[1] < time.time():
                self._access = (self._exchange_token(), time.time() + ACCESS_TOKEN_SECONDS)
            return {"Authorization": f"Bearer {self._access[0]}"}

    def _exchange_token(self) -> str:
        try:
            resp = self.session.post(
                f"{self.url}/api/token/refresh/", json={"refresh": self.api_key}, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise LabelStudioError(
                f"cannot reach Label Studio at {self.url} ({type(exc).__name__})"
            ) from None
        if resp.status_code != 200:
            raise LabelStudioError(
                f"Label Studio refused the personal access token (HTTP {resp.status_code});"
                " check LABEL_STUDIO_API_KEY"
            )
        return resp.json().get("access", "")

    def is_own_url(self, url: str) -> bool:
        """Only URLs of this server get the API key."""
        from urllib.parse import urlparse

        a, b = urlparse(url), urlparse(self.url)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc)

    # -- requests --------------------------------------------------------------------------
    def authorised(self, send: Callable[[dict[str, str]], requests.Response]) -> requests.Response:
        """`send(headers)` with this server's credentials, and once more with a fresh access token
        when a personal access token's short-lived one has expired (HTTP 401)."""
        resp = send(self.auth_headers())
        if resp.status_code == 401 and is_personal_access_token(self.api_key):
            resp.close()
            resp = send(self.auth_headers(refresh=True))
        return resp

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """`path` relative to the server (``/api/...``) or absolute on it; raises LabelStudioError."""
        url = path if path.startswith("http") else f"{self.url}/{path.lstrip('/')}"
        kwargs.setdefault("timeout", self.timeout)
        try:
            resp = self.authorised(
                lambda headers: self.session.request(method, url, headers=headers, **kwargs)
            )
        except requests.RequestException as exc:
            raise LabelStudioError(f"cannot reach {url} ({type(exc).__name__})") from None
        if resp.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio refused the credentials for {url} (HTTP {resp.status_code});"
                " check LABEL_STUDIO_API_KEY"
            )
        if resp.status_code >= 400:
            raise LabelStudioError(f"{method} {url}: HTTP {resp.status_code} {resp.text[:300]}")
        return resp

    def project(self, project_id: int) -> dict:
        """A project's settings: label config, model version, sampling, toggles."""
        try:
            return self.request("GET", f"/api/projects/{int(project_id)}").json()
        except LabelStudioError as exc:
            if "HTTP 404" in str(exc):
                raise ProjectNotFound(
                    f"project {project_id} not found in Label Studio at {self.url}"
                ) from None
            raise

    def client(self):  # noqa: ANN201 - label_studio_sdk.LabelStudio, imported lazily
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.api_key, timeout=self.timeout)

    # -- what the SDK lacks on the open-source server ------------------------------------------
    def upload_files(
        self, project_id: int, paths: Iterable[str | os.PathLike[str]], *, chunk: int = 16
    ) -> list[int]:
        """One task per file via the import endpoint; returns the new task ids.

        Each file needs its own multipart field: Label Studio keeps only the last file per name.
        """
        paths = [Path(p) for p in paths]
        task_ids: list[int] = []
        for start in range(0, len(paths), chunk):
            with contextlib.ExitStack() as stack:
                files = {
                    f"file{i}": (p.name, stack.enter_context(open(p, "rb")))
                    for i, p in enumerate(paths[start : start + chunk])
                }
                resp = self.request(
                    "POST",
                    f"/api/projects/{project_id}/import",
                    params={"return_task_ids": "true"},
                    files=files,
                )
            task_ids.extend(resp.json().get("task_ids", []))
        return task_ids

    def import_tasks(self, project_id: int, tasks: Sequence[dict]) -> list[int]:
        """Create tasks from JSON (`{"data": ...}` objects); returns their ids."""
        resp = self.request(
            "POST", f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, json=list(tasks)
        )
        return list(resp.json().get("task_ids", []))

    def retrieve_predictions(self, project_id: int, task_ids: Sequence[int] | None = None) -> dict:
        """The Data Manager action 'Retrieve predictions' (`ml.predict_all_tasks` is Enterprise-only).

        Label Studio sends all selected tasks to the backend in one /predict call (100 s timeout),
        so pass `task_ids` in batches for large projects.
        """
        selected: dict[str, Any] = (
            {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": list(task_ids)}
        )
        resp = self.request(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": selected},
        )
        return resp.json()

    def iter_tasks(self, project_id: int, *, only_annotated: bool | None = None) -> Iterator[dict]:
        """Every task of the project as a plain dict, annotations included."""
        for task in self.client().tasks.list(project=project_id, fields="all", only_annotated=only_annotated):
            yield task.model_dump() if hasattr(task, "model_dump") else dict(task)
