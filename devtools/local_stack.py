"""Launch the local stack (Redis, the ML backend, RQ workers; Label Studio: `devtools.label_studio`)
as child processes (`devtools.processes`).

Shared by ``tests/conftest.py``, ``devtools/demo.py`` (``make demo``) and the end-to-end
benchmarks, so that tests exercise exactly the processes a user runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

import requests

if TYPE_CHECKING:
    pass

from devtools.processes import (
    REPO_ROOT,
    ManagedProcess,
    child_env,
    default_log,
    find_free_port,
    port_in_use,
    wait_http,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


# --------------------------------------------------------------------------------- Redis


class RedisHandle:
    """A Redis URL plus the server we started for it, if any (never stops a foreign one)."""

    def __init__(self, url: str, process: ManagedProcess | None = None, tmpdir: Path | None = None):
        self.url = url
        self.process = process
        self._tmpdir = tmpdir

    @property
    def started(self) -> bool:
        return self.process is not None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=5.0)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> RedisHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisHandle {self.url} {'started' if self.started else 'external'}>"


def redis_ping(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def is_loopback_url(url: str) -> bool:
    """True for redis:// URLs on this machine (the only ones we may replace by our own)."""
    parts = urlsplit(url)
    return parts.scheme in ("redis", "") and parts.hostname in (
        None, "127.0.0.1", "localhost", "::1",
    )  # fmt: skip


def ensure_redis(
    url: str | None = None,
    *,
    redis_server: str = "redis-server",
    timeout: float = 15.0,
) -> RedisHandle:
    """Use the Redis at ``url`` if it answers, else start a throw-away local one.

    A started server listens on a free loopback port, persists nothing and lives in a temp
    dir; ``RedisHandle.url`` points at it. A non-local URL that does not answer is an error
    rather than being silently replaced.
    """
    url = url or DEFAULT_REDIS_URL
    if redis_ping(url):
        return RedisHandle(url)
    if not is_loopback_url(url):
        raise ConnectionError(f"Redis at {url} does not answer; it is not local, so none is started")
    parts = urlsplit(url)
    binary = shutil.which(redis_server)
    if binary is None:
        raise RuntimeError(
            f"No Redis answers at {url} and no '{redis_server}' binary is on PATH: "
            "install it (apt-get install redis-server) or set REDIS_URL to a running Redis."
        )
    port = find_free_port()
    tmpdir = Path(tempfile.mkdtemp(prefix="emloop-redis-"))
    proc = ManagedProcess(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmpdir),
            "--daemonize",
            "no",
        ],
        env=child_env(None),
        log_path=tmpdir / "redis.log",
    )
    proc.name = "redis-server"
    proc.spawn()
    db = parts.path.lstrip("/") or "0"
    new_url = urlunsplit(("redis", f"127.0.0.1:{port}", f"/{db}", "", ""))
    handle = RedisHandle(new_url, proc, tmpdir)
    deadline = time.monotonic() + timeout
    while not redis_ping(new_url, timeout=0.5):
        if not proc.alive or time.monotonic() > deadline:
            tail = proc.log_tail()
            handle.stop()
            raise RuntimeError(f"redis-server on port {port} did not come up\n{tail}")
        time.sleep(0.1)
    return handle


# --------------------------------------------------------------------- ML backend & worker


def _python_env(env: Mapping[str, str], root: Path = REPO_ROOT) -> dict[str, str]:
    merged = child_env(env)
    pythonpath = merged.get("PYTHONPATH", "")
    merged["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), pythonpath) if p)
    merged.setdefault("PYTHONUNBUFFERED", "1")
    return merged


class BackendServer(ManagedProcess):
    """``python -m ml_backend`` on loopback, ready once ``/health`` says UP.

    ``repo_root`` is the checkout whose code runs (first on PYTHONPATH, and the working
    directory): another ``git worktree`` runs another version of emloop with the same venv.
    """

    name = "ml-backend"

    def __init__(
        self,
        env: Mapping[str, str],
        port: int | None = None,
        python: str = sys.executable,
        *,
        host: str = "127.0.0.1",
        start_timeout: float = 120.0,
        log_path: Path | None = None,
        repo_root: str | os.PathLike[str] = REPO_ROOT,
    ) -> None:
        self.port = port or find_free_port()
        self.host = host
        self.start_timeout = start_timeout
        root = Path(repo_root).resolve()
        merged = _python_env({**env, "HOST": host, "PORT": str(self.port)}, root)
        super().__init__(
            [python, "-m", "ml_backend"],
            env=merged,
            log_path=log_path or default_log(f"backend-{self.port}"),
            cwd=root,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackendServer:
        if port_in_use(self.port, self.host):
            raise RuntimeError(f"port {self.port} is already in use; pick another ML backend port")
        self.spawn()
        # With basic auth on, /health needs the credentials too.
        user, password = self.env.get("BASIC_AUTH_USER", ""), self.env.get("BASIC_AUTH_PASS", "")
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user else ""
        try:
            wait_http(
                f"http://{credentials}{self.host}:{self.port}/health",
                timeout=self.start_timeout,
                ok=_health_up,
                alive=lambda: self.alive,
                describe=self.log_tail,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> BackendServer:
        if self.proc is None:
            self.start()
        return self


def _health_up(response: requests.Response) -> bool:
    if response.status_code != 200:
        return False
    try:
        return response.json().get("status") == "UP"
    except ValueError:
        return False


class WorkerProcess(ManagedProcess):
    """``python -m ml_backend.worker`` (an RQ worker); ``repo_root`` as for ``BackendServer``."""

    name = "ml-worker"

    def __init__(
        self,
        env: Mapping[str, str],
        python: str = sys.executable,
        *,
        log_path: Path | None = None,
        repo_root: str | os.PathLike[str] = REPO_ROOT,
    ) -> None:
        root = Path(repo_root).resolve()
        super().__init__(
            [python, "-m", "ml_backend.worker"],
            env=_python_env(env, root),
            log_path=log_path or default_log("worker"),
            cwd=root,
        )

    def start(self) -> WorkerProcess:
        self.spawn()
        return self

    def wait_ready(self, redis_url: str | None = None, timeout: float = 60.0) -> None:
        """Block until RQ lists a worker with our pid (i.e. it is consuming jobs)."""
        from redis import Redis
        from rq import Worker

        url = redis_url or self.env.get("REDIS_URL") or DEFAULT_REDIS_URL
        conn = Redis.from_url(url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if not self.alive:
                    raise RuntimeError(f"worker exited with rc={self.returncode}\n{self.log_tail()}")
                if any(w.pid == self.pid for w in Worker.all(connection=conn)):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker not registered in RQ after {timeout:.0f}s\n{self.log_tail()}")
                time.sleep(0.2)
        finally:
            conn.close()

    def __enter__(self) -> WorkerProcess:
        if self.proc is None:
            self.start()
        return self
