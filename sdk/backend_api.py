"""A client of emloop's own ML-backend endpoints (beyond Label Studio's protocol).

`POST /preannotate/<project>` queues a project's pre-annotation on the workers and
`GET /status/<project>` reports training and pre-annotation; scripts and the demo follow
a run through them instead of talking to Redis.
"""

from __future__ import annotations

import os
import time
from typing import Any

import requests
from tqdm import tqdm


class BackendError(RuntimeError):
    """The backend could not be reached or refused; the message says which."""


class BackendAPI:
    def __init__(self, url: str, user: str | None = None, password: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        user = os.environ.get("BASIC_AUTH_USER") if user is None else user
        if user:
            password = os.environ.get("BASIC_AUTH_PASS", "") if password is None else password
            self.session.auth = (user, password)

    def call(self, method: str, path: str, **kwargs: Any) -> dict:
        kwargs.setdefault("timeout", 600)
        try:
            resp = self.session.request(method, self.url + path, **kwargs)
        except requests.RequestException as exc:
            raise BackendError(f"cannot reach the ML backend at {self.url} ({type(exc).__name__})") from None
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:300]}
        if resp.status_code >= 400:
            raise BackendError(f"the ML backend answered HTTP {resp.status_code}: {body.get('error', body)}")
        return body

    def preannotate(self, project: int, *, include_labeled: bool = False) -> dict:
        return self.call("POST", f"/preannotate/{project}", json={"include_labeled": include_labeled})

    def follow_preannotation(self, project: int, *, poll: float = 1.0, progress: bool = True) -> dict:
        """The run's status once no job is queued or running, with a progress bar meanwhile."""
        with tqdm(desc="pre-annotating", unit="task", disable=not progress) as bar:
            while True:
                status = self.call("GET", f"/status/{project}", timeout=30).get("preannotation") or {}
                bar.total = status.get("total", 0)
                bar.n = sum(status.get(k, 0) for k in ("predicted", "skipped", "failed"))
                bar.set_postfix(failed=status.get("failed", 0), refresh=False)
                bar.refresh()
                if status.get("state") != "running":
                    return status
                time.sleep(poll)
