"""Coordination of training runs in Redis: debounce, one run per project, status.

Keys per project (prefix ``emloop:<queue>:train:<project>:``; the queue name, RQ_QUEUE,
tells apart Label Studio instances that share one Redis, as their project ids overlap):
- ``generation``: incremented by every training event;
- ``last_event``: time of the newest event (the quiet period counts from it);
- ``scheduled``: the id of the job queued that has not yet taken its snapshot, so a
  burst of events enqueues one job (if that job was lost, the next event replaces it);
- ``force``: START_TRAINING was pressed, skip the quiet period;
- ``lock``: held (with a TTL renewed by a heartbeat) by the one running job;
- ``trained_generation``: the generation the last run's snapshot included;
- ``status``: a hash the backend's `/status` shows.

A job clears ``scheduled`` only when it takes its snapshot of the annotations,
so an event arriving during a run enqueues exactly one follow-up job, which
waits for the lock and then includes it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from ml_backend.config import Settings
from ml_backend.jobs.preannotation import Progress
from ml_backend.jobs.status import job_pending

#: New tasks: re-ranked with the current version (no training), so they are served in order
#: and pre-annotated by the newest model before the next training run.
RANK_EVENTS = frozenset({"TASKS_CREATED"})
#: Label Studio webhook actions the worker acts on: these (re)train the model, and RANK_EVENTS.
TRAINING_EVENTS = (
    frozenset(
        {
            "ANNOTATION_CREATED",
            "ANNOTATION_UPDATED",
            "ANNOTATIONS_CREATED",
            "ANNOTATIONS_DELETED",
            "START_TRAINING",
        }
    )
    | RANK_EVENTS
)
FORCE_EVENTS = frozenset({"START_TRAINING"})
#: Label Studio's *Settings → Model → Start model training on annotation submission* (0 = off).
TOGGLE_FIELD = "min_annotations_to_start_training"


def training_decision(action: str, project: object, managed: bool) -> tuple[bool, bool, str]:
    """(train, skip the quiet period, why) for a training event under the project's toggle.

    With the toggle on, Label Studio itself sends START_TRAINING on every N-th annotation save, so
    that event is debounced like the annotation events; with it off only the *Start Training*
    button sends it, which trains at once. Annotation events are ignored while the toggle is off,
    but only once the backend manages the toggle (`managed`: it turned it on, or found it on), so a
    backend that cannot reach Label Studio's settings keeps training from every annotation.
    """
    toggle = project.get(TOGGLE_FIELD) if isinstance(project, dict) else None
    on = isinstance(toggle, int) and toggle > 0
    if action in FORCE_EVENTS:
        return (
            True,
            not on,
            "debounced: Label Studio sends it with annotations while the toggle is on" if on else "",
        )
    if toggle == 0 and managed:
        return (
            False,
            False,
            "'Start model training on annotation submission' is off in the project's settings",
        )
    return True, False, ""


class QueueUnavailable(RuntimeError):
    """Redis did not answer; the webhook says so instead of hanging."""


def connect(url: str, timeout: float | None = 0.5) -> Redis:
    return Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


class ProjectTraining:
    """The Redis state of one project's training."""

    def __init__(self, redis: Redis, project: str, queue: str) -> None:
        self.redis = redis
        self.project = project
        self.queue = queue
        self.prefix = f"emloop:{queue}:train:{project}:"

    def key(self, name: str) -> str:
        return self.prefix + name

    # -- status ----------------------------------------------------------------------
    def set_status(self, **fields: object) -> None:
        values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        values["updated_at"] = json.dumps(time.time())
        self.redis.hset(self.key("status"), mapping=values)

    def status(self) -> dict:
        raw = self.redis.hgetall(self.key("status"))
        out: dict = {"project": self.project}
        for k, v in raw.items():
            text = v.decode()
            try:
                out[k.decode()] = json.loads(text)
            except ValueError:
                out[k.decode()] = text
        if out.get("state") == "running" and not self.redis.exists(self.key("lock")):
            out["state"] = "interrupted"  # the worker died; its lock expired with it
        preannotation = Progress(self.redis, self.project, self.queue).read()
        if preannotation:
            out["preannotation"] = preannotation
        return out

    # -- webhook side -------------------------------------------------------------------
    def toggle_managed(self) -> bool:
        """Whether the backend set (or found) Label Studio's toggle on (see training_decision)."""
        return bool(self.redis.exists(self.key("toggle_managed")))

    def claim_toggle(self, seconds: int = 30) -> bool:
        """One /setup at a time turns the toggle on: two could both read "off", the second after
        the user had turned it off again."""
        return not self.toggle_managed() and bool(
            self.redis.set(self.key("toggle_claim"), 1, nx=True, ex=seconds)
        )

    def manage_toggle(self) -> None:
        self.redis.set(self.key("toggle_managed"), 1)

    def record_event(self, action: str, settings: Settings, project: object = None) -> dict:
        """Count the event and enqueue a job unless one is already waiting; `project` is the
        webhook's project object, whose toggle decides whether annotations train."""
        now = time.time()
        pipe = self.redis.pipeline()
        if action in RANK_EVENTS:
            if settings.queue_strategy == "off":
                return {"queued": False, "ignored": "QUEUE_STRATEGY is off"}
            pipe.set(self.key("new_tasks"), 1)
        else:
            train, forced, why = training_decision(action, project, self.toggle_managed())
            if not train:
                message = f"{action} not trained on: {why}"
                self.set_status(last_event=action, last_event_at=now, message=message)
                return {"queued": False, "ignored": why}
            pipe.incr(self.key("generation"))
            if forced:
                pipe.set(self.key("force"), 1)
        pipe.set(self.key("last_event"), now)
        written = pipe.execute()
        generation = None if action in RANK_EVENTS else written[0]
        # Expires so that a lost job cannot block training for long, even unnoticed.
        ttl = int(settings.train_debounce + settings.train_job_timeout)
        job_id = uuid.uuid4().hex
        enqueue = bool(self.redis.set(self.key("scheduled"), job_id, nx=True, ex=ttl))
        if not enqueue and not job_pending(self.redis, self.redis.get(self.key("scheduled"))):
            enqueue = bool(self.redis.set(self.key("scheduled"), job_id, ex=ttl))
        state: dict = {"last_event": action, "last_event_at": now}
        if generation is not None:
            state["generation"] = generation
        if enqueue:
            self._enqueue(job_id, settings)
            state.update(state="queued", job_id=job_id)
        self.set_status(**state)
        return {"queued": bool(enqueue), **({"generation": generation} if generation is not None else {})}

    def _enqueue(self, job_id: str, settings: Settings, retry_of: str = "") -> None:
        Queue(self.queue, connection=self.redis).enqueue(
            "ml_backend.jobs.train_job.run_training",  # by name: the job module imports this one
            self.project,
            self.queue,
            job_id=job_id,
            job_timeout=settings.train_job_timeout,
            result_ttl=7 * 86400,
            failure_ttl=7 * 86400,
            description=f"train project {self.project}" + (f" (retry of {retry_of})" if retry_of else ""),
            meta={"retry_of": retry_of},
        )

    def retry_if_interrupted(self, settings: Settings) -> str | None:
        """Re-enqueue, once, a run whose worker died (killed, out of memory): the id of the new
        job, or None. A run that was itself a retry is marked failed instead, so a run that
        kills its worker every time cannot loop; the next annotation starts it again."""
        status = self.status()
        dead = str(status.get("job_id") or "")
        if status.get("state") != "interrupted" or not dead:
            return None
        # Several workers may notice the same dead run: the first to claim it acts.
        if not self.redis.set(self.key(f"retried:{dead}"), 1, nx=True, ex=7 * 86400):
            return None
        if status.get("retry_of"):
            self.set_status(
                state="failed",
                error=f"the worker stopped during job {dead}, a retry of interrupted job "
                f"{status['retry_of']}; not retried again (see the worker's log: killed or out of memory?)",
                finished_at=time.time(),
            )
            return None
        job_id = uuid.uuid4().hex
        ttl = int(settings.train_debounce + settings.train_job_timeout)
        pipe = self.redis.pipeline()
        pipe.set(self.key("force"), 1)  # the dead run had claimed the events it was training on
        pipe.set(self.key("scheduled"), job_id, ex=ttl)
        pipe.execute()
        self._enqueue(job_id, settings, retry_of=dead)
        self.set_status(
            state="queued", job_id=job_id, retry_of=dead, message=f"retry of interrupted job {dead}"
        )
        return job_id

    # -- job side -------------------------------------------------------------------------
    def wait_quiet(self, quiet: float, poll: float = 0.2) -> None:
        """Return once no event arrived for `quiet` seconds, or at once if forced."""
        while True:
            if self.redis.get(self.key("force")):
                return
            last = float(self.redis.get(self.key("last_event")) or 0)
            remaining = last + quiet - time.time()
            if remaining <= 0:
                return
            time.sleep(min(poll, remaining))

    @contextmanager
    def lock(self, token: str, ttl: int, poll: float = 0.5) -> Iterator[None]:
        """Hold the project's training lock; a heartbeat keeps it while the job lives."""
        key = self.key("lock")
        while not self.redis.set(key, token, nx=True, ex=ttl):
            time.sleep(poll)
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(max(0.2, ttl / 3)):
                try:
                    if self.redis.get(key) == token.encode():
                        self.redis.expire(key, ttl)
                except RedisError:
                    pass

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            if self.redis.get(key) == token.encode():
                self.redis.delete(key)

    def take_snapshot(self) -> tuple[int, int, bool]:
        """Claim all events so far: (generation now, generation trained last, forced)."""
        pipe = self.redis.pipeline()
        pipe.delete(self.key("scheduled"))
        pipe.get(self.key("generation"))
        pipe.get(self.key("trained_generation"))
        pipe.getdel(self.key("force"))
        _, generation, trained, forced = pipe.execute()
        return int(generation or 0), int(trained or 0), bool(forced)

    def take_new_tasks(self) -> bool:
        """Claim the "tasks were imported" flag: whether the queue needs ranking without training."""
        return bool(self.redis.getdel(self.key("new_tasks")))

    def mark_trained(self, generation: int) -> None:
        self.redis.set(self.key("trained_generation"), generation)


def project_ids(redis: Redis, queue: str) -> list[str]:
    """Every project with a training status on `queue`."""
    pattern = f"emloop:{queue}:*:*:status"  # training, pre-annotation
    return sorted({key.decode().split(":")[-2] for key in redis.scan_iter(match=pattern, count=500)})


def all_statuses(redis: Redis, queue: str) -> list[dict]:
    return [ProjectTraining(redis, p, queue).status() for p in project_ids(redis, queue)]


def retry_interrupted(redis: Redis, settings: Settings) -> list[str]:
    """`ProjectTraining.retry_if_interrupted` over every project: the new jobs' ids."""
    queue = settings.queue_name
    jobs = [
        ProjectTraining(redis, p, queue).retry_if_interrupted(settings) for p in project_ids(redis, queue)
    ]
    return [job for job in jobs if job]
