"""What RQ does not say directly about a job."""

from __future__ import annotations

from redis import Redis
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED})


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
