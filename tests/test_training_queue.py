"""Training coordination in a real Redis: debounce, one queued job per burst, force, lock, status.

Uses database 15 of the Redis at 127.0.0.1:6379 (skipped if it does not answer), a random
project id and a private RQ queue name, and deletes exactly those keys afterwards.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import JobStatus

from ml_backend.config import Settings
from ml_backend.jobs.preannotation import Progress
from ml_backend.jobs.preannotation import enqueue as enqueue_preannotation
from ml_backend.jobs.training_queue import (
    ProjectTraining,
    all_statuses,
    connect,
    retry_interrupted,
    training_decision,
)

from .helpers import UNIT_REDIS_URL as REDIS_URL


@pytest.fixture
def settings(redis: Redis) -> Iterator[Settings]:
    name = f"emloop-test-{uuid.uuid4().hex[:12]}"  # no real worker listens on this queue
    yield Settings(redis_url=REDIS_URL, queue_name=name, train_debounce=0.3, train_job_timeout=60)
    Queue(name, connection=redis).delete(delete_jobs=True)


@pytest.fixture
def state(redis: Redis, settings: Settings) -> Iterator[ProjectTraining]:
    project = f"test-{uuid.uuid4().hex[:12]}"
    yield ProjectTraining(redis, project, settings.queue_name)
    keys = list(redis.scan_iter(match=f"emloop:{settings.queue_name}:train:{project}:*"))
    if keys:
        redis.delete(*keys)


def queued_jobs(settings: Settings, redis: Redis) -> list:
    return Queue(settings.queue_name, connection=redis).get_jobs()


def redis_get(state: ProjectTraining, name: str) -> bytes | None:
    return state.redis.get(state.key(name))


def run_in_thread(target, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def body() -> None:
        try:
            out["value"] = target(*args, **kwargs)
        finally:
            out["returned_at"] = time.time()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


# -- webhook side ------------------------------------------------------------------------------


def test_burst_enqueues_one_job(state: ProjectTraining, settings: Settings, redis: Redis) -> None:
    answers = [state.record_event("ANNOTATION_CREATED", settings) for _ in range(5)]
    assert [a["queued"] for a in answers] == [True, False, False, False, False]
    assert [a["generation"] for a in answers] == [1, 2, 3, 4, 5]
    [job] = queued_jobs(settings, redis)
    assert job.func_name == "ml_backend.jobs.train_job.run_training"
    assert job.args == (state.project, settings.queue_name)
    assert job.timeout == settings.train_job_timeout
    status = state.status()
    assert status["project"] == state.project
    assert status["state"] == "queued" and status["job_id"] == job.id
    assert status["generation"] == 5 and status["last_event"] == "ANNOTATION_CREATED"
    # `scheduled` expires, so a job lost before its snapshot cannot block training forever.
    assert 0 < redis.ttl(state.key("scheduled")) <= int(settings.train_debounce + settings.train_job_timeout)


def test_a_lost_job_is_replaced_by_the_next_event(
    state: ProjectTraining, settings: Settings, redis: Redis
) -> None:
    assert state.record_event("ANNOTATION_CREATED", settings)["queued"]
    [job] = queued_jobs(settings, redis)
    job.delete()  # e.g. the queue was flushed, or the job expired unseen
    assert state.record_event("ANNOTATION_CREATED", settings)["queued"]
    assert state.record_event("ANNOTATION_CREATED", settings)["queued"] is False
    [replacement] = queued_jobs(settings, redis)
    assert replacement.id != job.id and redis_get(state, "scheduled") == replacement.id.encode()


def test_a_job_whose_worker_died_before_its_snapshot_is_replaced(
    state: ProjectTraining, settings: Settings, redis: Redis
) -> None:
    assert state.record_event("ANNOTATION_CREATED", settings)["queued"]
    [job] = queued_jobs(settings, redis)
    job.worker_name = f"test-worker-{uuid.uuid4().hex[:6]}"
    job.set_status(JobStatus.STARTED)
    job.save()
    registration = f"rq:worker:{job.worker_name}"
    redis.set(registration, 1, ex=30)  # its worker is alive: the job is still pending
    assert state.record_event("ANNOTATION_CREATED", settings)["queued"] is False
    redis.delete(registration)  # the worker died and its registration expired
    assert state.record_event("ANNOTATION_CREATED", settings)["queued"]
    assert redis_get(state, "scheduled") != job.id.encode()


def test_projects_of_two_label_studios_do_not_mix(redis: Redis, settings: Settings) -> None:
    """Project ids restart at 1 on every Label Studio: the queue name keeps their state apart."""
    a = ProjectTraining(redis, "1", settings.queue_name)
    b = ProjectTraining(redis, "1", settings.queue_name + "-other")
    try:
        assert a.record_event("ANNOTATION_CREATED", settings)["queued"]
        other = Settings(redis_url=settings.redis_url, queue_name=b.queue, train_job_timeout=60)
        assert b.record_event("ANNOTATION_CREATED", other)["queued"]
    finally:
        Queue(b.queue, connection=redis).delete(delete_jobs=True)
        for s in (a, b):
            keys = list(redis.scan_iter(match=s.prefix + "*"))
            if keys:
                redis.delete(*keys)


def test_snapshot_clears_scheduled_so_one_follow_up_is_queued(
    state: ProjectTraining, settings: Settings, redis: Redis
) -> None:
    for _ in range(3):
        state.record_event("ANNOTATION_UPDATED", settings)
    assert len(queued_jobs(settings, redis)) == 1
    # The job takes its snapshot: it will train on generations up to 3.
    assert state.take_snapshot() == (3, 0, False)
    # Events during the run: exactly one follow-up job.
    answers = [state.record_event("ANNOTATION_CREATED", settings)["queued"] for _ in range(4)]
    assert answers == [True, False, False, False]
    assert len(queued_jobs(settings, redis)) == 2
    state.mark_trained(3)
    # The follow-up sees what is new since the last run.
    assert state.take_snapshot() == (7, 3, False)
    state.mark_trained(7)
    # Nothing new: a later job would find generation == trained and skip.
    assert state.take_snapshot() == (7, 7, False)


def test_start_training_forces_once(state: ProjectTraining, settings: Settings) -> None:
    state.record_event("ANNOTATION_CREATED", settings)
    state.mark_trained(1)
    assert redis_get(state, "force") is None
    state.record_event("START_TRAINING", settings)
    assert redis_get(state, "force") == b"1"
    generation, trained, forced = state.take_snapshot()
    assert (generation, trained, forced) == (2, 1, True)
    assert state.take_snapshot()[2] is False  # the force flag is consumed


def test_training_decision_follows_label_studios_toggle() -> None:
    on, off = {"min_annotations_to_start_training": 1}, {"min_annotations_to_start_training": 0}
    # Annotations train unless the toggle is off and the backend manages it.
    assert training_decision("ANNOTATION_CREATED", on, managed=True)[:2] == (True, False)
    assert training_decision("ANNOTATION_CREATED", off, managed=True)[0] is False
    assert training_decision("ANNOTATION_CREATED", off, managed=False)[0] is True
    assert training_decision("ANNOTATION_CREATED", None, managed=True)[0] is True  # no project sent
    # The button always trains; at once unless Label Studio sends it with every annotation.
    assert training_decision("START_TRAINING", off, managed=True)[:2] == (True, True)
    assert training_decision("START_TRAINING", None, managed=False)[:2] == (True, True)
    assert training_decision("START_TRAINING", on, managed=True)[:2] == (True, False)


def test_annotations_do_not_train_once_the_user_turned_training_off(
    state: ProjectTraining, settings: Settings, redis: Redis
) -> None:
    off = {"id": 1, "min_annotations_to_start_training": 0}
    assert state.record_event("ANNOTATION_CREATED", settings, off)["queued"]  # not managed yet
    assert not state.toggle_managed()
    state.manage_toggle()
    answer = state.record_event("ANNOTATION_CREATED", settings, off)
    assert answer["queued"] is False and "off" in answer["ignored"]
    assert redis_get(state, "generation") == b"1"  # not counted
    assert "not trained on" in state.status()["message"]
    state.record_event("START_TRAINING", settings, off)  # the button
    assert redis_get(state, "generation") == b"2" and redis_get(state, "force") == b"1"


def test_new_tasks_schedule_a_ranking_without_training(
    state: ProjectTraining, settings: Settings, redis: Redis
) -> None:
    answer = state.record_event("TASKS_CREATED", settings, {"id": 1})
    assert answer["queued"] and "generation" not in answer
    assert redis_get(state, "generation") is None and len(queued_jobs(settings, redis)) == 1
    assert state.take_snapshot() == (0, 0, False)  # nothing to train on...
    assert state.take_new_tasks() and not state.take_new_tasks()  # ...but new tasks, claimed once
    off = Settings(redis_url=REDIS_URL, queue_name=settings.queue_name, queue_strategy="off")
    assert state.record_event("TASKS_CREATED", off)["queued"] is False


def test_preannotation_chunks_are_queued_once(settings: Settings, redis: Redis) -> None:
    chunked = replace(settings, preannotate_chunk=50)
    tasks = [(i, f"http://images.example/{i}.png") for i in range(105, 0, -1)]
    ids = enqueue_preannotation(redis, chunked, "p1", "emloop-v1-abc", tasks, already=7)
    assert len(ids) == 3 and len(queued_jobs(settings, redis)) == 3
    first_chunk = queued_jobs(settings, redis)[0].args[2]
    assert [t for t, _ in first_chunk] == list(range(1, 51))  # chunks of the sorted ids
    # Queued again (a re-run while the jobs wait): the same jobs, nothing added, nothing counted twice.
    assert enqueue_preannotation(redis, chunked, "p1", "emloop-v1-abc", tasks) == ids
    assert len(queued_jobs(settings, redis)) == 3
    progress = Progress(redis, "p1", settings.queue_name).read()
    assert (progress["total"], progress["already"], progress["state"]) == (105, 7, "running")
    assert progress["jobs"] == {"queued": 3}
    # A newer version's run is the one shown; the older run's jobs are no longer counted.
    state = Progress(redis, "p1", settings.queue_name)
    enqueue_preannotation(redis, chunked, "p1", "emloop-v2-abc", tasks[:10])
    state.count("emloop-v1-abc", predicted=50)
    state.count("emloop-v2-abc", predicted=3, failures={5: "HTTP 404"})
    progress = state.read()
    assert (progress["version"], progress["total"], progress["predicted"], progress["failed"]) == (
        "emloop-v2-abc",
        10,
        3,
        1,
    )
    assert progress["failures"] == {"5": "HTTP 404"} and progress["jobs"] == {"queued": 1}
    redis.delete(*redis.scan_iter(match=f"emloop:{settings.queue_name}:preannotate:*"))


# -- job side: quiet period ----------------------------------------------------------------------


def test_forced_wait_returns_at_once(state: ProjectTraining, settings: Settings) -> None:
    state.record_event("ANNOTATION_CREATED", settings)
    state.record_event("START_TRAINING", settings)
    thread, _ = run_in_thread(state.wait_quiet, 3600.0, poll=0.05)
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_wait_quiet_waits_for_the_quiet_period(state: ProjectTraining, settings: Settings) -> None:
    state.record_event("ANNOTATION_CREATED", settings)
    last = float(redis_get(state, "last_event"))
    thread, out = run_in_thread(state.wait_quiet, 0.3, poll=0.02)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert out["returned_at"] >= last + 0.3


def test_new_event_extends_the_wait(state: ProjectTraining, settings: Settings) -> None:
    quiet = 0.5
    state.record_event("ANNOTATION_CREATED", settings)
    first = float(redis_get(state, "last_event"))
    thread, out = run_in_thread(state.wait_quiet, quiet, poll=0.02)
    time.sleep(0.1)
    state.record_event("ANNOTATION_UPDATED", settings)
    second = float(redis_get(state, "last_event"))
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert out["returned_at"] >= first + quiet
    if second < first + quiet:  # the second event arrived during the wait (always, unless stalled)
        assert out["returned_at"] >= second + quiet


def test_wait_quiet_without_events_returns(state: ProjectTraining) -> None:
    thread, _ = run_in_thread(state.wait_quiet, 0.3, poll=0.02)
    thread.join(timeout=10)
    assert not thread.is_alive()


# -- job side: lock ------------------------------------------------------------------------------


def test_lock_is_exclusive(state: ProjectTraining) -> None:
    log: list[str] = []
    a_holds, a_release = threading.Event(), threading.Event()

    def holder() -> None:
        with state.lock("job-a", ttl=10, poll=0.02):
            log.append("a in")
            a_holds.set()
            a_release.wait(10)
            log.append("a out")

    def waiter() -> None:
        with state.lock("job-b", ttl=10, poll=0.02):
            log.append("b in")
            assert redis_get(state, "lock") == b"job-b"
        log.append("b out")

    a = threading.Thread(target=holder, daemon=True)
    a.start()
    assert a_holds.wait(10)
    assert redis_get(state, "lock") == b"job-a"
    b = threading.Thread(target=waiter, daemon=True)
    b.start()
    time.sleep(0.3)  # b polls all this time
    assert log == ["a in"]
    assert b.is_alive()
    a_release.set()
    a.join(10)
    b.join(10)
    assert not a.is_alive() and not b.is_alive()
    assert log == ["a in", "a out", "b in", "b out"]
    assert redis_get(state, "lock") is None


def test_lock_expires_when_holder_vanishes(state: ProjectTraining) -> None:
    # A worker killed while holding the lock: nobody renews or deletes it.
    assert state.redis.set(state.key("lock"), "dead-job", nx=True, ex=1)
    acquired = threading.Event()

    def waiter() -> None:
        with state.lock("job-b", ttl=10, poll=0.05):
            acquired.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    assert acquired.wait(10)
    thread.join(10)
    assert not thread.is_alive()
    assert redis_get(state, "lock") is None


def test_lock_heartbeat_keeps_a_long_job_locked(state: ProjectTraining) -> None:
    with state.lock("long-job", ttl=2, poll=0.05):
        time.sleep(2.6)  # longer than the TTL: only the heartbeat keeps the key
        assert redis_get(state, "lock") == b"long-job"
    assert redis_get(state, "lock") is None


def test_lock_release_leaves_a_successors_lock(state: ProjectTraining) -> None:
    with state.lock("job-a", ttl=10, poll=0.05):
        # job-a's lock was lost (expired) and another job took it.
        state.redis.set(state.key("lock"), "job-b", ex=10)
    assert redis_get(state, "lock") == b"job-b"


# -- status --------------------------------------------------------------------------------------


def test_status_round_trip_and_interrupted(state: ProjectTraining) -> None:
    state.set_status(state="running", job_id="j1", progress={"step": 10, "max_steps": 400}, generation=3)
    status = state.status()
    assert status["state"] == "interrupted"  # running, but no lock: the worker died
    assert status["job_id"] == "j1" and status["generation"] == 3
    assert status["progress"] == {"step": 10, "max_steps": 400}
    assert isinstance(status["updated_at"], float)
    with state.lock("j1", ttl=10, poll=0.05):
        assert state.status()["state"] == "running"
    state.set_status(state="succeeded")
    assert state.status()["state"] == "succeeded"
    assert any(s["project"] == state.project for s in all_statuses(state.redis, state.queue))


def test_a_dead_run_is_retried_once(state: ProjectTraining, settings: Settings, redis: Redis) -> None:
    state.set_status(state="running", job_id="dead-1", retry_of="", generation=4)
    with state.lock("dead-1", ttl=10, poll=0.05):  # alive: nothing to retry
        assert retry_interrupted(redis, settings) == []
    [retry] = retry_interrupted(redis, settings)  # the lock is gone: the worker died
    assert retry_interrupted(redis, settings) == []  # claimed once, even by several workers
    status = state.status()
    assert status["state"] == "queued" and status["job_id"] == retry and status["retry_of"] == "dead-1"
    [job] = queued_jobs(settings, redis)
    assert job.id == retry and job.meta["retry_of"] == "dead-1"
    assert redis_get(state, "force") == b"1"  # the dead run had claimed its events
    assert redis_get(state, "scheduled") == retry.encode()  # the next event does not add a job
    assert not state.record_event("ANNOTATION_CREATED", settings)["queued"]

    # The retry dies too: it is not retried again, and /status says why.
    state.set_status(state="running", job_id=retry, retry_of="dead-1")
    assert retry_interrupted(redis, settings) == []
    status = state.status()
    assert status["state"] == "failed" and "not retried again" in status["error"]
    assert len(queued_jobs(settings, redis)) == 1


def test_unreachable_redis_fails_fast() -> None:
    conn = connect("redis://127.0.0.1:1/0")
    with pytest.raises(RedisError):
        ProjectTraining(conn, "1", "emloop").status()
