"""Shared fixtures: real Redis, Label Studio, ML backend and worker processes.

Integration fixtures skip when their prerequisites are missing on a developer machine, but
fail under CI (``CI=true``) so that a broken setup can never pass as "all skipped".
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import pytest
from redis import Redis
from redis.exceptions import RedisError

from devtools.label_studio import DEFAULT_LS_BIN, LabelStudioServer, seed_from_template
from devtools.local_stack import BackendServer, WorkerProcess, ensure_redis
from devtools.processes import REPO_ROOT

from .helpers import STACK_REDIS_DB, UNIT_REDIS_URL, claim_database, release_database, with_database

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip locally, fail in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true, so this is an error rather than a skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-network unit tests, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def simulate():
    """The module behind scripts/simulate.py."""
    import ml_backend.cli.simulate as module

    return module


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def vnc_dir(repo_root: Path) -> Path:
    """The shared VNC ssTEM dataset (read-only), beside the repository."""
    path = repo_root.parent / "shared" / "data" / "vnc"
    if not path.is_dir():
        pytest.skip(f"VNC dataset not found at {path}")
    return path


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    """Database 15 of the local Redis, for unit tests of Redis-backed state."""
    try:
        conn = claim_database(UNIT_REDIS_URL)
    except (RedisError, RuntimeError) as exc:
        unavailable(f"no Redis database for the unit tests at {UNIT_REDIS_URL}: {exc}")
    yield conn
    release_database(conn)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis that answers (``$REDIS_URL``/127.0.0.1:6379, or a private one we start), at database
    STACK_REDIS_DB, which the session empties at its end."""
    try:
        handle = ensure_redis(os.environ.get("REDIS_URL"))
    except (RuntimeError, ConnectionError) as exc:
        unavailable(f"no Redis: {exc}")
    url = with_database(handle.url, STACK_REDIS_DB)
    with handle:
        try:
            conn = claim_database(url)
        except (RedisError, RuntimeError) as exc:
            unavailable(str(exc))
        yield url
        release_database(conn)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """One Label Studio for the whole session, in a temp data dir.

    Local files under the session's base temp dir are servable (``document_root``). Set
    ``EMLOOP_LS_TEMPLATE=0`` to skip the cached pre-migrated template and migrate afresh.
    """
    if not DEFAULT_LS_BIN.exists():
        unavailable(f"Label Studio is not installed at {DEFAULT_LS_BIN}: run `make ls-venv`")
    data_dir = tmp_path_factory.mktemp("label-studio")
    if os.environ.get("EMLOOP_LS_TEMPLATE", "1") != "0":
        seed_from_template(data_dir)
    server = LabelStudioServer(data_dir, document_root=tmp_path_factory.getbasetemp())
    with server:
        yield server


BackendFactory = Callable[..., BackendServer]
WorkerFactory = Callable[..., WorkerProcess]


# Tests never share a queue with a demo or another session's workers on the same Redis.
SESSION_QUEUE = f"emloop-test-{uuid.uuid4().hex[:8]}"


def stack_env(
    model_dir: Path, redis_url: str, label_studio: LabelStudioServer | None, files: Path
) -> dict[str, str]:
    """``files``: the session's temp dir, where tests write the images they pass as local paths."""
    env = {
        "MODEL_DIR": str(model_dir),
        "REDIS_URL": redis_url,
        "RQ_QUEUE": SESSION_QUEUE,
        "LOCAL_FILES_ROOTS": str(files),
        "CLICK_TRAIN_STEPS": "2",  # the click network's fine-tuning, kept short as TRAIN_STEPS is
    }
    if label_studio is not None:
        env |= {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    return env


@pytest.fixture
def backend_factory(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[BackendFactory]:
    """``start(env=None, *, label_studio=None, port=None, model_dir=None, **kw) -> BackendServer``.

    Each call starts ``python -m ml_backend`` (ready on ``/health``) with a fresh MODEL_DIR in
    ``tmp_path`` (or ``model_dir`` to share one across restarts), REDIS_URL, LOCAL_FILES_ROOTS
    (the session's temp dir) and, given a
    ``label_studio``, its URL and token; ``env`` overrides all of them. Stopped at teardown.
    """
    started: list[BackendServer] = []

    def start(
        env: Mapping[str, str] | None = None,
        *,
        label_studio: LabelStudioServer | None = None,
        port: int | None = None,
        model_dir: Path | None = None,
        **kwargs: Any,
    ) -> BackendServer:
        n = len(started)
        model_dir = model_dir or tmp_path / f"models-{n}"
        base = stack_env(model_dir, redis_url, label_studio, tmp_path_factory.getbasetemp())
        server = BackendServer(
            {**base, **(env or {})}, port=port, log_path=tmp_path / f"backend-{n}.log", **kwargs
        )
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def worker_factory(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[WorkerFactory]:
    """``start(env=None, *, label_studio=None, model_dir=None, wait=True) -> WorkerProcess``.

    Same environment rules as ``backend_factory`` (pass the backend's ``model_dir``); with
    ``wait`` it returns once RQ lists the worker. Stopped at teardown.
    """
    started: list[WorkerProcess] = []

    def start(
        env: Mapping[str, str] | None = None,
        *,
        label_studio: LabelStudioServer | None = None,
        model_dir: Path | None = None,
        wait: bool = True,
        **kwargs: Any,
    ) -> WorkerProcess:
        n = len(started)
        base = stack_env(
            model_dir or tmp_path / "models-0", redis_url, label_studio, tmp_path_factory.getbasetemp()
        )
        merged = {**base, **(env or {})}
        worker = WorkerProcess(merged, log_path=tmp_path / f"worker-{n}.log", **kwargs)
        started.append(worker)
        worker.start()
        if wait:
            worker.wait_ready(merged["REDIS_URL"])
        return worker

    yield start
    for worker in reversed(started):
        worker.stop()
