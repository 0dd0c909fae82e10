"""Checkpoints through Redis between machines with separate MODEL_DIRs (real Redis, database 15)."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from ml_backend.config import Settings
from ml_backend.learner.checkpoint_mirror import MirrorError, RedisMirror
from ml_backend.learner.checkpoints import CheckpointStore
from ml_backend.serving.registry import ModelRegistry
from tests.test_checkpoints import TARGET, TINY, outputs, perturbed, same_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUEUE = f"emloop-test-{uuid.uuid4().hex[:8]}"  # the deployment: keys of other runs never mix in
PROJECT = "7"


@pytest.fixture
def project(redis: Redis) -> Iterator[str]:
    yield PROJECT
    keys = list(redis.scan_iter(match=f"emloop:{QUEUE}:checkpoints:*"))
    if keys:
        redis.delete(*keys)


def machine(tmp_path: Path, name: str, project: str, redis: Redis) -> CheckpointStore:
    """A store in its own MODEL_DIR with its own mirror object, as on a separate machine."""
    store = CheckpointStore.for_project(tmp_path / name, project, TARGET, RedisMirror(redis, QUEUE))
    store.network = TINY
    return store


def files_key(store: CheckpointStore) -> str:
    return f"emloop:{QUEUE}:checkpoints:{store.lineage}:files"


def test_a_version_saved_on_one_machine_is_served_on_another(tmp_path: Path, project: str, redis: Redis):
    worker = machine(tmp_path, "worker", project, redis)
    backend = machine(tmp_path, "backend", project, redis)
    assert [v.number for v in backend.versions()] == [0]
    net = perturbed(1)
    v1 = worker.save(net, parent=worker.latest(), metrics={"iou": 0.5})
    assert backend.latest() == v1  # same number, name, hash and metrics
    assert (backend.root / "v1.pt").is_file() and backend.root != worker.root
    assert hashlib.sha256((backend.root / "v1.pt").read_bytes()).hexdigest() == v1.sha256
    assert same_weights(backend.load(backend.latest()), net)
    # The backend's registry follows the next version the worker publishes.
    registry = ModelRegistry()
    assert registry.current(backend).version == v1
    v2 = worker.save(perturbed(2), parent=v1, metrics={})
    assert registry.current(backend).version == v2
    assert outputs(registry.current(backend).net).allclose(outputs(perturbed(2)), atol=1e-5)


def test_numbers_never_clash_between_workers(tmp_path: Path, project: str, redis: Redis) -> None:
    a, b = machine(tmp_path, "a", project, redis), machine(tmp_path, "b", project, redis)
    v1 = a.save(perturbed(1), parent=a.latest(), metrics={})
    v2 = b.save(perturbed(2), parent=b.latest(), metrics={})  # b adopts v1 first, then goes past it
    assert (v1.number, v2.number) == (1, 2) and v2.parent == v1.name
    assert [v.number for v in a.versions()] == [0, 1, 2]
    with pytest.raises(MirrorError, match="already published"):
        RedisMirror(redis, QUEUE).publish(a.lineage, 2, b"other bytes", "{}")
    # A worker whose MODEL_DIR holds a stray v3 (killed before its manifest) and did not see
    # the published v3 still takes a new number.
    c = machine(tmp_path, "c", project, redis)
    v3 = a.save(perturbed(3), parent=v2, metrics={})
    c.root.mkdir(parents=True)
    (c.root / "v4.pt").write_bytes(b"half-written")
    assert c.save(perturbed(4), parent=v3, metrics={}).number == 5


def test_turning_the_mirror_on_publishes_the_history_a_model_dir_holds(
    tmp_path: Path, project: str, redis: Redis
) -> None:
    backend = machine(tmp_path, "backend", project, redis)
    before = CheckpointStore(backend.root, TARGET, TINY)  # trained while MODEL_DIR was the only store
    v1 = before.save(perturbed(1), parent=before.latest(), metrics={})
    v2 = before.save(perturbed(2), parent=v1, metrics={})
    assert backend.latest() == v2  # the backend's first look publishes v1 and v2
    worker = machine(tmp_path, "worker", project, redis)
    assert worker.versions()[1:] == [v1, v2]
    v3 = worker.save(perturbed(3), parent=v2, metrics={})
    assert backend.latest() == v3


def test_the_same_project_of_another_deployment_does_not_mix(tmp_path: Path, project: str, redis: Redis):
    ours = machine(tmp_path, "ours", project, redis)
    ours.save(perturbed(1), parent=ours.latest(), metrics={})
    other = RedisMirror(redis, QUEUE + "-b")
    theirs = CheckpointStore.for_project(tmp_path / "theirs", project, TARGET, other)
    assert [v.number for v in theirs.versions()] == [0]


def test_bytes_that_do_not_match_their_hash_are_not_adopted(
    tmp_path: Path, project: str, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    worker = machine(tmp_path, "worker", project, redis)
    backend = machine(tmp_path, "backend", project, redis)
    v1 = worker.save(perturbed(1), parent=worker.latest(), metrics={})
    assert backend.latest() == v1
    v2 = worker.save(perturbed(2), parent=v1, metrics={})
    redis.hset(files_key(worker), "2", b"tampered")
    with caplog.at_level(logging.ERROR):
        assert backend.latest() == v1
    assert "do not match its SHA-256" in caplog.text and not (backend.root / "v2.pt").exists()
    # Repaired in Redis, it is adopted on a later look (not on every request meanwhile).
    redis.hset(files_key(worker), "2", (worker.root / "v2.pt").read_bytes())
    backend.mirror._retry[backend.lineage] = 0.0  # the retry delay has passed
    assert backend.latest() == v2


def test_without_redis_a_machine_serves_what_it_has_and_saves_nothing(
    tmp_path: Path, project: str, redis: Redis
) -> None:
    worker = machine(tmp_path, "worker", project, redis)
    v1 = worker.save(perturbed(1), parent=worker.latest(), metrics={})
    down = RedisMirror(Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2), QUEUE)
    offline = CheckpointStore(worker.root, TARGET, TINY, mirror=down)
    assert offline.latest() == v1
    with pytest.raises(MirrorError, match="cannot"):
        offline.save(perturbed(2), parent=v1, metrics={})
    assert [v.number for v in worker.versions()] == [0, 1] and not (worker.root / "v2.pt").exists()


def test_checkpoint_store_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHECKPOINT_STORE", raising=False)
    assert Settings.from_env().checkpoint_store == "disk"
    monkeypatch.setenv("CHECKPOINT_STORE", "Redis")
    assert Settings.from_env().checkpoint_store == "redis"
    monkeypatch.setenv("CHECKPOINT_STORE", "s3")
    with pytest.raises(ValueError, match="CHECKPOINT_STORE must be one of disk, redis"):
        Settings.from_env()
