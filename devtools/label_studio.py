"""A real Label Studio (from `.ls-venv`) as a child process, with an admin and its API token, and
a migrated database template so later starts skip the migrations."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from sdk.atomic import atomic_write_bytes
from sdk.labelstudio import LabelStudioAPI

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

from devtools.processes import REPO_ROOT, ManagedProcess, child_env, find_free_port, port_in_use, wait_http

# `make ls-venv` installs Label Studio apart from emloop (its pins clash); EMLOOP_LS_BIN overrides.
DEFAULT_LS_BIN = Path(os.environ.get("EMLOOP_LS_BIN") or REPO_ROOT / ".ls-venv" / "bin" / "label-studio")
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
        self.env = child_env(
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
