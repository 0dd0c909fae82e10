"""`python -m ml_backend`: serve the ML backend (gunicorn, one process, threads)."""

from __future__ import annotations

import argparse
import logging

from gunicorn.app.base import BaseApplication

from ml_backend.config import Settings
from ml_backend.serving.server import create_app


class _Gunicorn(BaseApplication):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        # One process: loaded networks and the image cache are shared by its threads.
        self.cfg.set("bind", f"{s.host}:{s.port}")
        self.cfg.set("workers", 1)
        self.cfg.set("worker_class", "gthread")
        # Admitted predictions may all wait for the inference slot: THREADS more stay free.
        self.cfg.set("threads", s.threads + s.predict_queue)
        self.cfg.set("timeout", 600)
        self.cfg.set("accesslog", "-")

    def load(self):  # noqa: ANN201 - gunicorn's WSGI callable
        return create_app(self.settings)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ml_backend",
        description="emloop's Label Studio ML backend. Configure with environment variables "
        "(see README: HOST, PORT, MODEL_DIR, LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, REDIS_URL, ...).",
    )
    parser.add_argument("--host", help="overrides HOST (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="overrides PORT (default 9090)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        settings = Settings(**{**settings.__dict__, **overrides})
    _Gunicorn(settings).run()


if __name__ == "__main__":
    main()
