"""Whole-volume segmentation on RQ workers: one job per block of slices, with ids derived from the
plan (a resubmission waits for the blocks still queued or running rather than enqueueing them
twice), and a wait that follows the blocks' done markers."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from ml_backend.jobs.status import ACTIVE, FAILED, failure_reason, job_status
from ml_backend.learner.volume_segmentation import Progress, SegmentationPlan, run_block


def run_block_job(plan: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """RQ entry point (``python -m ml_backend.worker``): one block of a planned run."""
    return run_block(SegmentationPlan.from_dict(plan), start, stop)


def enqueue_blocks(
    plan: SegmentationPlan,
    blocks: Sequence[tuple[int, int]],
    redis: Any,
    queue_name: str,
    *,
    job_timeout: int = 3600,
) -> list[Any]:
    """One job per block, with ids derived from the plan: a block still queued or running from an
    earlier (interrupted) submission is waited for, not enqueued twice."""
    queue = Queue(queue_name, connection=redis)
    jobs = []
    for start, stop in blocks:
        job_id = plan.job_id(start)
        try:
            job = Job.fetch(job_id, connection=redis)
            if job_status(job) in ACTIVE:
                jobs.append(job)
                continue
            job.delete()
        except NoSuchJobError:
            pass
        jobs.append(
            queue.enqueue(
                run_block_job,
                plan.to_dict(),
                start,
                stop,
                job_id=job_id,
                job_timeout=job_timeout,
                result_ttl=86400,
                failure_ttl=7 * 86400,
                description=f"segment {Path(plan.volume).name} {plan.axis}[{start}:{stop}]",
            )
        )
    return jobs


def wait_for_jobs(
    plan: SegmentationPlan,
    jobs: Sequence[Any],
    *,
    on_done: Callable[[int], None] | None = None,
    on_idle: Callable[[], None] | None = None,
    poll: float = 0.5,
) -> None:
    """Block until every job's marker exists; raise RuntimeError when a job fails or vanishes.

    ``on_done(n)`` gets the number of finished blocks; ``on_idle()`` is called when nothing moved
    for a while (e.g. to warn that no worker is listening).
    """
    progress = Progress(plan.progress_dir)
    wanted = {plan.job_id(b[0]): b for b in plan.blocks()}
    pending = {job.id: job for job in jobs}
    last_change, last_count = time.monotonic(), -1
    while True:
        finished = {job_id for job_id in pending if progress.is_done(*wanted[job_id])}
        for job_id in finished:
            del pending[job_id]
        count = len(jobs) - len(pending)
        if count != last_count:
            last_change, last_count = time.monotonic(), count
            if on_done is not None:
                on_done(count)
        if not pending:
            return
        for job in list(pending.values()):
            status = job_status(job)
            if status in FAILED:
                raise RuntimeError(f"job {job.id} failed on a worker: {failure_reason(job)}")
            if status == JobStatus.FINISHED and not progress.is_done(*wanted[job.id]):
                raise RuntimeError(f"job {job.id} finished but left no marker in {progress.done_dir}")
        if on_idle is not None and time.monotonic() - last_change > 30:
            on_idle()
            last_change = time.monotonic()
        time.sleep(poll)
