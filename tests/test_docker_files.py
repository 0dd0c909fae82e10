"""The deployment files cannot run here (no Docker engine); check they are consistent with the code."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def env_vars_read_by_code() -> set[str]:
    pattern = re.compile(r"""(?:_int|_float|_names|environ\.get)\(\s*["']([A-Z_][A-Z0-9_]*)["']""")
    names: set[str] = set()
    for path in (ROOT / "ml_backend").rglob("*.py"):
        names |= set(pattern.findall(path.read_text()))
    return names


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services(compose: dict) -> None:
    services = compose["services"]
    assert {"redis", "label-studio", "backend", "worker", "worker-gpu"} <= set(services)
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["worker"]["command"][:3] == ["python", "-m", "ml_backend.worker"]
    assert services["label-studio"]["image"].endswith(":1.23.2")


def test_label_studio_may_call_a_backend_on_the_private_network(compose: dict) -> None:
    env = compose["services"]["label-studio"]["environment"]
    assert env["ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"
    text = COMPOSE.read_text()
    assert re.search(r"#.*private.*\n.*\n\s+ML_BLOCK_LOCAL_IP", text), "the reason must be commented"


def test_emloop_services_set_only_variables_the_code_reads(compose: dict) -> None:
    known = env_vars_read_by_code()
    assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL", "MODEL_DIR", "PORT"} <= known
    for name in ("backend", "worker", "worker-gpu"):
        env = compose["services"][name]["environment"]
        assert set(env) <= known, f"{name} sets variables nothing reads: {set(env) - known}"
        assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL", "MODEL_DIR"} <= set(env)
    backend, worker = compose["services"]["backend"], compose["services"]["worker"]
    shared = {v.split(":")[0] for v in backend["volumes"]} & {v.split(":")[0] for v in worker["volumes"]}
    assert "models" in shared, "backend and worker must share MODEL_DIR"
    assert backend["environment"]["REDIS_URL"] == worker["environment"]["REDIS_URL"]
    assert backend["environment"]["RQ_QUEUE"] == worker["environment"]["RQ_QUEUE"]


def test_dockerfile_copies_what_exists_and_runs_real_modules(compose: dict) -> None:
    build = compose["services"]["backend"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    text = DOCKERFILE.read_text()
    for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
        *sources, _ = line.split()
        for source in sources:
            assert (context / source).exists(), f"Dockerfile copies missing {source}"
    cmd = re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1)
    assert yaml.safe_load(cmd) == ["python", "-m", "ml_backend"]
    for module in ("ml_backend.__main__", "ml_backend.worker"):
        assert importlib.util.find_spec(module) is not None
    assert re.search(r'TORCH_SPEC="torch==2\.13\.0"', text)
    assert "/health" in text
