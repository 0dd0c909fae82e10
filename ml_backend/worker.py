"""`python -m ml_backend.worker`: an RQ worker for emloop's training jobs.

A `SimpleWorker` (no fork per job): the worker keeps torch, the image cache and
the decoded-mask cache warm between jobs. Run one per machine (a GPU machine
trains on CUDA); all of them need the same REDIS_URL, LABEL_STUDIO_URL,
LABEL_STUDIO_API_KEY and a MODEL_DIR shared with the backend, or CHECKPOINT_STORE=redis
(set on the backend too) and a MODEL_DIR of their own.

After every successful run the worker re-ranks the project's unlabelled tasks with the new
version and writes the order (and pre-annotations) into Label Studio (QUEUE_STRATEGY; off
switches it off). Every worker also watches for runs whose worker died (their training lock expired while
they were running) and retries each once, so a killed or out-of-memory worker does not
leave a project untrained until its next annotation.
"""

from __future__ import annotations

import argparse
import logging
import threading

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker

from ml_backend.config import Settings
from ml_backend.jobs.training_queue import retry_interrupted
from sdk.strategies import get_strategy

log = logging.getLogger("emloop.worker")


def retry_dead_runs(redis: Redis, settings: Settings) -> None:
    try:
        for job_id in retry_interrupted(redis, settings):
            log.warning("a worker died during a training run; retrying it once as job %s", job_id)
    except RedisError as exc:
        log.warning("could not check for interrupted runs: %s", exc)


def watch_dead_runs(redis: Redis, settings: Settings, stop: threading.Event) -> None:
    """Every lock lifetime: a dead run is noticed within about TRAIN_LOCK_TTL seconds."""
    while not stop.wait(max(1, settings.train_lock_ttl)):
        retry_dead_runs(redis, settings)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--name", help="worker name shown in RQ (default: host and pid)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    try:
        if settings.queue_strategy != "off":
            get_strategy(settings.queue_strategy)
    except ValueError as exc:
        parser.error(f"QUEUE_STRATEGY must be off or a strategy: {exc}")
    redis = Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=redis)
    worker = SimpleWorker([queue], connection=redis, name=args.name)
    retry_dead_runs(redis, settings)  # before a --burst worker looks at the queue
    stop = threading.Event()
    threading.Thread(target=watch_dead_runs, args=(redis, settings, stop), daemon=True).start()
    try:
        worker.work(burst=args.burst, with_scheduler=False)
    finally:
        stop.set()


if __name__ == "__main__":
    main()
