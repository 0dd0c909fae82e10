"""Pre-annotating a whole project on the workers, in chunks, without Label Studio's timeout.

*Retrieve predictions* sends every selected task to /predict in one call that Label Studio
abandons after 100 s, so thousands of patches (what `push_volume.py` makes) never get their
pre-annotations. Here the work is split into RQ jobs of PREANNOTATE_CHUNK tasks; each predicts
with one named checkpoint version and posts its predictions through Label Studio's import API.

Idempotent and resumable: a task that already has a prediction of that version is skipped (by
the enqueuer and again by the job), and a chunk's job id is derived from the version and its
task ids, so a re-run adds nothing and enqueues only what is missing. Progress is a Redis hash
that `/status/<project>` shows as ``preannotation``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

from ml_backend.config import Settings
from ml_backend.images import ImageError, shared_fetcher
from ml_backend.jobs.status import ACTIVE, job_alive, job_pending
from ml_backend.learner.checkpoints import CheckpointStore
from ml_backend.learner.inference import PredictionTooLarge, check_prediction_size, predict_image
from ml_backend.learner.network import UNet, default_device
from sdk.label_config import BrushTarget
from sdk.labelstudio import LabelStudioAPI
from sdk.predictions import build_prediction
from sdk.queue_order import TaskRef, image_url, iter_tasks

log = logging.getLogger(__name__)

RUNNING = frozenset(s.value for s in ACTIVE)  # job states as `get_status().value` gives them
SHOWN_FAILURES = 20  # tasks listed in /status; the count covers all


class Progress:
    """One project's pre-annotation run in Redis: counts, the run's jobs, failed tasks."""

    def __init__(self, redis: Redis, project: str, queue: str) -> None:
        self.redis = redis
        self.prefix = f"emloop:{queue}:preannotate:{project}:"

    def key(self, name: str) -> str:
        return self.prefix + name

    def job_ids(self) -> list[str]:
        return sorted(j.decode() for j in self.redis.smembers(self.key("jobs")))

    def job_states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in Job.fetch_many(self.job_ids(), connection=self.redis):
            state = job.get_status().value if job is not None else "expired"
            if state in RUNNING and not job_alive(self.redis, job):
                state = "lost"  # its worker died: a re-run queues the chunk again
            counts[state] = counts.get(state, 0) + 1
        return counts

    def active(self) -> bool:
        return any(state in RUNNING for state in self.job_states())

    def begin(self, version: str, new_tasks: int, already: int, jobs: Sequence[str]) -> None:
        """Start a run, or add to the one in progress when it has the same version (a run for a
        newer version replaces the one shown; its older jobs still finish, uncounted)."""
        current = self.redis.hget(self.key("status"), "version")
        if current is None or current.decode() != version or not self.active():
            self.redis.delete(self.key("status"), self.key("jobs"), self.key("failures"))
            self.redis.hset(
                self.key("status"),
                mapping={"version": version, "started_at": time.time(), "already": already},
            )
        pipe = self.redis.pipeline()
        pipe.hincrby(self.key("status"), "total", new_tasks)
        if jobs:
            pipe.sadd(self.key("jobs"), *jobs)
        pipe.hset(self.key("status"), "updated_at", time.time())
        pipe.execute()

    def count(
        self, version: str, *, predicted: int = 0, skipped: int = 0, failures: dict[int, str] | None = None
    ) -> None:
        if self.redis.hget(self.key("status"), "version") != version.encode():
            return  # a run for another version is shown now
        pipe = self.redis.pipeline()
        pipe.hincrby(self.key("status"), "predicted", predicted)
        pipe.hincrby(self.key("status"), "skipped", skipped)
        pipe.hincrby(self.key("status"), "failed", len(failures or {}))
        if failures:
            pipe.hset(self.key("failures"), mapping={str(t): why for t, why in failures.items()})
        pipe.hset(self.key("status"), "updated_at", time.time())
        pipe.execute()

    def read(self) -> dict | None:
        """What /status shows; None when the project never pre-annotated."""
        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(self.key("status")).items()}
        if not raw:
            return None
        out: dict = {"version": raw["version"]}
        for name in ("total", "predicted", "skipped", "failed", "already"):
            out[name] = int(raw.get(name, 0))
        for name in ("started_at", "updated_at"):
            out[name] = float(raw.get(name, 0))
        out["jobs"] = self.job_states()
        out["state"] = "running" if any(s in RUNNING for s in out["jobs"]) else "finished"
        failures = self.redis.hscan(self.key("failures"), count=SHOWN_FAILURES)[1]
        out["failures"] = {k.decode(): v.decode() for k, v in list(failures.items())[:SHOWN_FAILURES]}
        return out


@dataclass
class Pending:
    """A project's tasks seen against one version."""

    tasks: list[TaskRef] = field(default_factory=list)  # without a prediction of the version
    already: int = 0  # with one
    unusable: list[int] = field(default_factory=list)  # no image in the configured field


def pending_tasks(
    api: LabelStudioAPI, project_id: int, value_key: str, version: str, *, include_labeled: bool = False
) -> Pending:
    out = Pending()
    for task in iter_tasks(api, project_id, fields="all"):
        if task.get("is_labeled") and not include_labeled:
            continue
        if version in {p.get("model_version") for p in task.get("predictions") or [] if isinstance(p, dict)}:
            out.already += 1
            continue
        url = image_url(api, task, value_key)
        if url is None:
            out.unusable.append(task["id"])
        else:
            out.tasks.append((task["id"], url))
    return out


def chunk_job_id(queue: str, project: str, version: str, chunk: Sequence[TaskRef]) -> str:
    """The same chunk gets the same id; the queue tells apart Label Studio instances sharing Redis."""
    digest = hashlib.sha256(json.dumps([queue, project, version, [t for t, _ in chunk]]).encode())
    return f"emloop-preannotate-{project}-{digest.hexdigest()[:24]}"


def enqueue(
    redis: Redis, settings: Settings, project: str, version: str, tasks: Sequence[TaskRef], already: int = 0
) -> list[str]:
    """One job per chunk of tasks (a chunk whose job is still queued or running is not added twice)."""
    ordered = sorted(tasks)
    size = max(1, settings.preannotate_chunk)
    cut = [ordered[start : start + size] for start in range(0, len(ordered), size)]
    chunks = {chunk_job_id(settings.queue_name, project, version, chunk): chunk for chunk in cut}
    new = {}
    for job_id, chunk in chunks.items():
        if job_pending(redis, job_id):
            continue  # the same chunk is queued or running: not twice
        with contextlib.suppress(NoSuchJobError):
            Job.fetch(job_id, connection=redis).delete()  # finished, failed, or its worker died
        new[job_id] = chunk
    # Counted before enqueueing: a worker may finish a chunk before this function returns.
    Progress(redis, project, settings.queue_name).begin(
        version, sum(map(len, new.values())), already, list(chunks)
    )
    queue = Queue(settings.queue_name, connection=redis)
    for job_id, chunk in new.items():
        queue.enqueue(
            preannotate_chunk,
            project,
            version,
            [list(t) for t in chunk],
            job_id=job_id,
            job_timeout=settings.train_job_timeout,
            result_ttl=86400,
            failure_ttl=7 * 86400,
            description=f"pre-annotate {len(chunk)} tasks of project {project} with {version}",
        )
    return list(chunks)


def has_prediction(api: LabelStudioAPI, task_id: int, version: str) -> bool:
    """Asked per task (not GET /api/tasks/<id>, which makes Label Studio predict a bare task)."""
    found = api.request("GET", "/api/predictions", params={"task": task_id}).json()
    return any(p.get("model_version") == version for p in found if isinstance(p, dict))


def preannotate_chunk(project: str, version: str, tasks: list[list]) -> dict:
    """RQ entry point (``python -m ml_backend.worker``): predict `tasks` with checkpoint `version`
    and post the predictions; a failing task is reported, the others are still posted."""
    settings = Settings.from_env()
    job = get_current_job()
    progress = Progress(job.connection, project, settings.queue_name)
    fetcher = shared_fetcher(settings)
    api = fetcher.label_studio
    info = api.project(int(project))
    target = settings.brush_target(info.get("label_config"))
    store = CheckpointStore.for_settings(settings, project, target)
    found = [v for v in store.versions() if v.name == version]
    if not found:
        raise ValueError(f"project {project} has no checkpoint {version!r} in {store.root}")
    net = store.load(found[0]).to(default_device())
    predictions, failures, skipped = [], {}, 0
    for task_id, url in tasks:
        if has_prediction(api, task_id, version):
            skipped += 1
            continue
        try:
            prediction, _ = predict_url(fetcher.fetch, url, net, target, version, settings)
        except (ImageError, PredictionTooLarge) as exc:
            failures[task_id] = str(exc)
            continue
        predictions.append({"task": task_id, **prediction})
    if predictions:
        api.request("POST", f"/api/projects/{int(project)}/import/predictions", json=predictions)
    progress.count(version, predicted=len(predictions), skipped=skipped, failures=failures)
    for task_id, why in failures.items():
        log.warning("project %s task %s not pre-annotated: %s", project, task_id, why)
    return {"predicted": len(predictions), "skipped": skipped, "failed": failures}


def predict_url(
    fetch: Callable[[str], np.ndarray],
    url: str,
    net: UNet,
    target: BrushTarget,
    version: str,
    settings: Settings,
    slot: AbstractContextManager | None = None,
) -> tuple[dict, float]:
    """One task's prediction (result, score, model_version) and the network's seconds, as
    /predict and the workers make it; raises ImageError or PredictionTooLarge for an image
    that cannot be predicted. `slot` bounds concurrent forward passes in the server."""
    image = fetch(url)
    check_prediction_size(image.shape, net.config.n_classes, settings.max_predict_bytes)
    with slot or contextlib.nullcontext():
        output = predict_image(net, image, tile=settings.tile_size, overlap=settings.tile_overlap)
    return build_prediction(output.probs, target, version), output.forward_seconds


def hand_to_workers(
    redis: Redis, settings: Settings, project: str, version: str, value_key: str, tasks: Sequence[dict]
) -> list[dict]:
    """The tasks a /predict call had no time left for, queued as pre-annotation jobs.

    Each entry has no ``result``, so Label Studio stores nothing for it (it logs the entry as
    incomplete); the worker posts the prediction under the same version, which Label Studio's
    *Retrieve predictions* then counts as current.
    """
    refs, out = [], []
    for task in tasks:
        url = (task.get("data") or {}).get(value_key) if isinstance(task.get("data"), dict) else None
        if not isinstance(task.get("id"), int) or not isinstance(url, str) or not url:
            out.append({"task": task.get("id"), "error": f"task has no id or no {value_key!r} image"})
            continue
        refs.append((task["id"], url))
        out.append({"task": task["id"], "queued": True, "model_version": version})
    try:
        enqueue(redis, settings, project, version, refs)
    except RedisError as exc:
        why = f"no time left in this request (PREDICT_BUDGET_SECONDS) and no queue for workers ({exc})"
        return [{"task": e["task"], "error": why} if "queued" in e else e for e in out]
    return out
