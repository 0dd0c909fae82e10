"""What RQ does not say directly about a job: whether it is still alive, its state now, why it failed."""

from __future__ import annotations

import time
from collections.abc import Callable

from redis import Redis
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED})
FAILED = frozenset({JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})


def job_pending(redis: Redis, job_id: bytes | str | None) -> bool:
    """Whether an RQ job still exists and `job_alive`."""
    if not job_id:
        return False
    try:
        job = Job.fetch(job_id.decode() if isinstance(job_id, bytes) else job_id, connection=redis)
    except NoSuchJobError:
        return False
    return job_alive(redis, job)


def job_alive(redis: Redis, job: Job) -> bool:
    """Whether a job has not finished and, once started, still has a live worker (a job whose
    worker was killed stays "started" forever)."""
    status = job.get_status()
    worker = job.worker_name and Worker.redis_worker_namespace_prefix + job.worker_name
    if status == JobStatus.STARTED and worker and not redis.exists(worker):
        return False  # its worker died (its registration expired)
    return status in ACTIVE


def job_status(job: Job) -> JobStatus | None:
    """The job's state as Redis has it now (not as it was when the job object was fetched)."""
    return job.get_status(refresh=True)


def failure_reason(job: Job) -> str:
    """The last line of the worker's traceback: what a user can act on, without the traceback."""
    result = job.latest_result()
    text = (getattr(result, "exc_string", None) or "").strip()
    return text.splitlines()[-1] if text else "no traceback recorded"


class JobFailed(RuntimeError):
    """A job failed on its worker, or did not finish in time; the message says which and why."""


def wait_for_job(
    job: Job, *, timeout: float, on_meta: Callable[[dict], None] | None = None, poll: float = 0.5
) -> None:
    """Until `job` has finished; JobFailed when it fails, or runs past `timeout` seconds (it is then
    cancelled). `on_meta` gets the job's meta (its progress) on every poll."""
    deadline = time.monotonic() + timeout
    while (status := job_status(job)) != JobStatus.FINISHED:
        if status in FAILED:
            raise JobFailed(f"worker job {job.id} {status.value}: {failure_reason(job)}")
        if time.monotonic() > deadline:
            job.cancel()
            raise JobFailed(f"worker job {job.id} did not finish within {timeout:g} s")
        if on_meta is not None:
            on_meta(job.get_meta(refresh=True))
        time.sleep(poll)
