"""Child processes that never outlive us: free ports, HTTP readiness, and `ManagedProcess`.

Every child gets its own process group and is registered for cleanup: context-manager exit,
``atexit`` and (on Linux) the parent-death signal all stop it, so an interrupted test run or
demo leaves no stray servers behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    pass


REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / ".run" / "logs"


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


def child_env(extra: Mapping[str, str] | None, drop: Iterable[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in set(drop)}
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


_LOG_SEQ = itertools.count(1)


def default_log(name: str) -> Path:
    return LOG_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_LOG_SEQ)}.log"
