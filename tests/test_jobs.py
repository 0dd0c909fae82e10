"""`ml_backend.jobs.status.wait_for_job`: the one poll loop over an RQ job's state (a small fake job)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from rq.job import JobStatus

from ml_backend.jobs.status import JobFailed, wait_for_job


class FakeJob:
    def __init__(self, states: list[JobStatus], traceback: str = "") -> None:
        self.id, self.states, self.cancelled, self.metas = "job-1", list(states), False, []
        self.traceback = traceback

    def get_status(self, refresh: bool = True) -> JobStatus:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def get_meta(self, refresh: bool = True) -> dict:
        return {"progress": {"stage": "score", "done": len(self.states), "total": 9}}

    def latest_result(self) -> SimpleNamespace:
        return SimpleNamespace(exc_string=self.traceback)

    def cancel(self) -> None:
        self.cancelled = True


def test_returns_when_the_job_finishes_and_passes_its_progress_on() -> None:
    job, seen = FakeJob([JobStatus.QUEUED, JobStatus.STARTED, JobStatus.FINISHED]), []
    wait_for_job(job, timeout=5, on_meta=seen.append, poll=0)
    assert [meta["progress"]["done"] for meta in seen] == [2, 1]  # one poll while queued, one while started


def test_a_failure_names_the_last_traceback_line() -> None:
    job = FakeJob([JobStatus.STARTED, JobStatus.FAILED], "Traceback ...\n  ...\nValueError: bad image 7")
    with pytest.raises(JobFailed, match="job-1 failed: ValueError: bad image 7"):
        wait_for_job(job, timeout=5, poll=0)


def test_a_job_past_its_deadline_is_cancelled() -> None:
    job = FakeJob([JobStatus.STARTED])
    with pytest.raises(JobFailed, match="did not finish within 0 s"):
        wait_for_job(job, timeout=0, poll=0)
    assert job.cancelled
