"""`python -m ml_backend.worker`: an RQ worker for emloop's training jobs.

A `SimpleWorker` (no fork per job): the worker keeps torch, the image cache and
the decoded-mask cache warm between jobs. Run one per machine (a GPU machine
trains on CUDA); all of them need the same REDIS_URL, LABEL_STUDIO_URL,
LABEL_STUDIO_API_KEY and a MODEL_DIR shared with the backend.
"""

from __future__ import annotations

import argparse
import logging

from redis import Redis
from rq import Queue, SimpleWorker

from .config import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--name", help="worker name shown in RQ (default: host and pid)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    redis = Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=redis)
    worker = SimpleWorker([queue], connection=redis, name=args.name)
    worker.work(burst=args.burst, with_scheduler=False)


if __name__ == "__main__":
    main()
