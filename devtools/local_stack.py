"""Launch the local stack (Redis, Label Studio, ML backend, RQ worker) as child processes.

Shared by ``tests/conftest.py``, ``devtools/demo.py`` (``make demo``) and the end-to-end
benchmarks, so that tests exercise exactly the processes a user runs. Every child gets its own
process group and is registered for cleanup: context-manager exit, ``atexit`` and (on Linux) the
parent-death signal all stop it, so an interrupted test run or demo leaves no stray servers behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from sdk.atomic import atomic_write_bytes
from sdk.labelstudio import LabelStudioAPI

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# `make ls-venv` installs Label Studio apart from emloop (its pins clash); EMLOOP_LS_BIN overrides.
DEFAULT_LS_BIN = Path(os.environ.get("EMLOOP_LS_BIN") or REPO_ROOT / ".ls-venv" / "bin" / "label-studio")
LOG_DIR = REPO_ROOT / ".run" / "logs"
CREDENTIALS_FILE = "emloop-credentials.json"

# Label Studio reads these *unprefixed* names too (core.utils.params.get_env), so a HOST or
# PORT meant for the ML backend would silently reconfigure it; never pass them through.
_LS_SCRUBBED_ENV = (
    "HOST",
    "PORT",
    "USERNAME",
    "PASSWORD",
    "USER_TOKEN",
    "DATABASE_NAME",
    "BASE_DATA_DIR",
    "DJANGO_DB",
    "DEBUG",
    "LOCAL_FILES_SERVING_ENABLED",
    "LOCAL_FILES_DOCUMENT_ROOT",
)


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a port that was free a moment ago (the OS picks it, so collisions are rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_http(
    url: str,
    timeout: float = 30.0,
    *,
    interval: float = 0.25,
    ok: Callable[[requests.Response], bool] | None = None,
    alive: Callable[[], bool] | None = None,
    describe: Callable[[], str] | None = None,
) -> requests.Response:
    """Poll ``url`` until ``ok(response)`` (default: HTTP 200).

    ``alive`` lets the caller abort early when the server process has already died;
    ``describe`` adds context (e.g. a log tail) to the error.
    """
    check = ok or (lambda r: r.status_code == 200)
    deadline = time.monotonic() + timeout
    last = "no response yet"
    while True:
        if alive is not None and not alive():
            extra = f"\n{describe()}" if describe else ""
            raise RuntimeError(f"process serving {url} exited before becoming ready{extra}")
        try:
            response = requests.get(url, timeout=max(1.0, min(5.0, interval * 4)))
            if check(response):
                return response
            last = f"HTTP {response.status_code}: {response.text[:200]!r}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            extra = f"\n{describe()}" if describe else ""
            raise TimeoutError(f"{url} not ready after {timeout:.0f}s (last: {last}){extra}")
        time.sleep(interval)


# --------------------------------------------------------------------------- process plumbing

_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.stop(grace=5.0)


atexit.register(_stop_all)


def _parent_death_preexec() -> Callable[[], None] | None:
    """Ask Linux to SIGTERM the child if we die without cleaning up (e.g. SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not after fork
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


_PREEXEC = _parent_death_preexec()


def install_sigterm_handler() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``with`` blocks and atexit still clean up."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class ManagedProcess:
    """A child in its own process group, logged to a file, stopped group-wide.

    Start it from a long-lived thread: the parent-death signal fires when the *thread* that
    spawned the child exits, not just the process.
    """

    name = "process"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- lifecycle
    def spawn(self) -> None:
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"\n=== {time.strftime('%F %T')} {' '.join(self.argv)}\n".encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        except BaseException:
            self._log.close()
            self._log = None
            raise
        with _LIVE_LOCK:
            _LIVE.add(self)

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Signal the whole group (SIGTERM: graceful), SIGKILL what is left after ``grace`` s."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None or self._group_alive():
                self._signal_group(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
                # The leader may be gone while forked children (gunicorn/RQ work-horses) linger.
                self._signal_group(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5.0)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if self._log is not None:
                self._log.close()
                self._log = None

    def kill(self, sig: int = signal.SIGKILL, *, group: bool = True) -> None:
        """Send ``sig`` without waiting (tests use it to simulate a crash)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        if group:
            self._signal_group(sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self.proc.wait(timeout=timeout)

    # -- state
    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)  # start_new_session: pgid == pid

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive else f"rc={self.returncode}"
        return f"<{type(self).__name__} pid={self.proc.pid if self.proc else None} {state}>"


def _child_env(extra: Mapping[str, str] | None, drop: Iterable[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in set(drop)}
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


_LOG_SEQ = itertools.count(1)


def _default_log(name: str) -> Path:
    return LOG_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_LOG_SEQ)}.log"


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
        env=_child_env(None),
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


# -------------------------------------------------------------------------- Label Studio


class LabelStudioServer(ManagedProcess):
    """Label Studio (sqlite, legacy token auth) in ``data_dir``.

    Credentials are stored in ``data_dir/emloop-credentials.json`` because Label Studio only
    applies ``--user-token`` when it first creates the user: a reused data dir keeps the
    token it was created with, so we must remember it.
    """

    name = "label-studio"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        ls_bin: str | os.PathLike[str] | None = None,
        document_root: str | os.PathLike[str] | None = None,
        bind: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        start_timeout: float = 600.0,
        log_path: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.ls_bin = Path(ls_bin) if ls_bin else DEFAULT_LS_BIN
        self.port = port
        self.bind = bind
        self.document_root = Path(document_root).resolve() if document_root else self.data_dir
        self.start_timeout = start_timeout
        self.extra_env = dict(env or {})
        self.was_initialised = False
        self.startup_seconds: float | None = None
        self.username, self.password, self.token = self._resolve_credentials(username, password, token)
        super().__init__([], env={}, log_path=log_path or self.data_dir / "label-studio.log")

    # -- credentials
    @property
    def database(self) -> Path:
        return self.data_dir / "label_studio.sqlite3"

    @property
    def initialised(self) -> bool:
        return self.database.exists()

    def _resolve_credentials(
        self, username: str | None, password: str | None, token: str | None
    ) -> tuple[str, str, str]:
        stored: dict[str, str] = {}
        creds_path = self.data_dir / CREDENTIALS_FILE
        if creds_path.exists():
            stored = json.loads(creds_path.read_text())
        if self.initialised:
            if not stored:
                if token is None or username is None:
                    raise RuntimeError(
                        f"{self.data_dir} holds a Label Studio database but no {CREDENTIALS_FILE}; "
                        "pass username= and token= explicitly, or use a fresh data dir."
                    )
                stored = {"username": username, "password": password or "", "token": token}
            for key, given in (("username", username), ("token", token)):
                if given is not None and given != stored[key]:
                    raise ValueError(
                        f"{key} {given!r} differs from the one {self.data_dir} was created with "
                        f"({stored[key]!r}); Label Studio cannot change it on restart."
                    )
            return stored["username"], password or stored.get("password", ""), stored["token"]
        return (
            username or "admin@emloop.local",
            password or "emloop-admin",
            token or secrets.token_hex(20),
        )

    def _save_credentials(self) -> None:
        data = {"username": self.username, "password": self.password, "token": self.token}
        atomic_write_bytes(self.data_dir / CREDENTIALS_FILE, json.dumps(data, indent=2).encode(), mode=0o600)

    # -- lifecycle
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("Label Studio not started")
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "") else self.bind
        return f"http://{host}:{self.port}"

    def start(self) -> LabelStudioServer:
        if not self.ls_bin.exists():
            raise FileNotFoundError(f"{self.ls_bin} not found: run `make ls-venv`")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or find_free_port()
        if port_in_use(self.port):
            # Label Studio would silently move to port+1; refuse instead.
            raise RuntimeError(f"port {self.port} is already in use; pick another Label Studio port")
        self.was_initialised = self.initialised
        self.argv = [
            str(self.ls_bin), "start", "--no-browser",
            "--internal-host", self.bind, "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--username", self.username, "--password", self.password,
            "--user-token", self.token, "--enable-legacy-api-token",
        ]  # fmt: skip
        self.env = _child_env(
            {
                "DJANGO_DB": "sqlite",
                "ML_BLOCK_LOCAL_IP": "false",
                "SSRF_PROTECTION_ENABLED": "false",
                "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
                # No network here: skip the PyPI version check, analytics and Sentry.
                "LATEST_VERSION_CHECK": "false",
                "COLLECT_ANALYTICS": "false",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
                **self.extra_env,
            },
            drop=[
                k for k in os.environ
                if k in _LS_SCRUBBED_ENV or k.startswith(("LABEL_STUDIO_", "HEARTEX_"))
            ],
        )  # fmt: skip
        self._save_credentials()  # before the DB exists, so a failed first start can be retried
        t0 = time.monotonic()
        self.spawn()
        try:
            wait_http(
                f"{self.url}/health",
                timeout=self.start_timeout,
                interval=0.5,
                ok=lambda r: r.status_code == 200 and "UP" in r.text,
                alive=lambda: self.alive,
                describe=self.log_tail,
            )
            self._check_token()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _check_token(self) -> None:
        response = requests.get(f"{self.url}/api/current-user/whoami", headers=self.auth_headers, timeout=10)
        if response.status_code != 200:
            raise RuntimeError(
                f"Label Studio is up but rejects the API token (HTTP {response.status_code}); "
                f"{self.data_dir} was probably created with another token.\n{self.log_tail(20)}"
            )

    def __enter__(self) -> LabelStudioServer:
        if self.proc is None:
            self.start()
        return self

    # -- API helpers
    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def client(self, timeout: float = 120.0) -> LabelStudio:
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token, timeout=timeout)

    def api(self) -> LabelStudioAPI:
        return LabelStudioAPI(self.url, self.token, timeout=300)

    def upload_files(self, project_id: int, paths: Iterable[str | os.PathLike[str]]) -> list[int]:
        """Import files as tasks (one per image); returns the new task ids."""
        return self.api().upload_files(project_id, paths)

    def retrieve_predictions(self, project_id: int, task_ids: Sequence[int] | None = None) -> dict:
        """The Data Manager 'Retrieve predictions' action (``ml.predict_all_tasks`` is Enterprise-only)."""
        return self.api().retrieve_predictions(project_id, task_ids)


def label_studio_version(ls_bin: str | os.PathLike[str] | None = None) -> str:
    """Version of the Label Studio installed beside ``ls_bin`` (from its dist-info)."""
    venv = Path(ls_bin or DEFAULT_LS_BIN).resolve().parent.parent
    found = sorted(venv.glob("lib/python*/site-packages/label_studio-*.dist-info"))
    return found[-1].name.removeprefix("label_studio-").removesuffix(".dist-info") if found else "unknown"


def seed_from_template(
    data_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    ls_bin: str | os.PathLike[str] | None = None,
) -> bool:
    """Copy a migrated, empty Label Studio data dir into ``data_dir``.

    A first start spends most of its ~40-60 s on migrations; starting on a copy takes ~5 s.
    The template (with its credentials) is built once per Label Studio version under
    ``.cache/``. Returns False when ``data_dir`` was already initialised.
    """
    data_dir = Path(data_dir)
    if (data_dir / "label_studio.sqlite3").exists():
        return False
    root = Path(cache_dir) if cache_dir else REPO_ROOT / ".cache"
    template = root / f"label-studio-{label_studio_version(ls_bin)}-template"
    if not (template / CREDENTIALS_FILE).exists():
        build = root / f"{template.name}.build-{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        with LabelStudioServer(build, ls_bin=ls_bin):
            pass
        (build / "label-studio.log").unlink(missing_ok=True)
        try:
            build.rename(template)
        except OSError:  # another process won the race; theirs is as good as ours
            shutil.rmtree(build, ignore_errors=True)
    shutil.copytree(template, data_dir, dirs_exist_ok=True)
    return True


# --------------------------------------------------------------------- ML backend & worker


def _python_env(env: Mapping[str, str], root: Path = REPO_ROOT) -> dict[str, str]:
    merged = _child_env(env)
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
            log_path=log_path or _default_log(f"backend-{self.port}"),
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
            log_path=log_path or _default_log("worker"),
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
