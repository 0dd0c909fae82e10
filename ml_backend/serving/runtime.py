"""Process-wide state shared by every request: settings, loaded networks, image cache."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property

from redis import Redis

from ml_backend.config import Settings
from ml_backend.images import ImageFetcher
from ml_backend.jobs.training_queue import ProjectTraining, connect
from ml_backend.serving.metrics import Metrics
from ml_backend.serving.registry import ModelRegistry


@dataclass
class Runtime:
    settings: Settings
    registry: ModelRegistry
    images: ImageFetcher
    metrics: Metrics = field(default_factory=Metrics)
    # One forward pass at a time: CPU cores are shared and memory stays bounded.
    inference_slot: threading.Semaphore = field(default_factory=lambda: threading.BoundedSemaphore(1))
    # /predict requests admitted at once (one in the forward pass, the others waiting for it);
    # more are refused at once, so request threads stay free for /health, /setup and /webhook.
    predict_admission: threading.Semaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(Settings.predict_queue)
    )

    @cached_property
    def redis(self) -> Redis:
        """Short timeouts: a webhook must answer quickly even when Redis is down."""
        return connect(self.settings.redis_url)

    def training(self, project: str) -> ProjectTraining:
        return ProjectTraining(self.redis, project, self.settings.queue_name)

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        return cls(
            settings=settings,
            registry=ModelRegistry(max_projects=settings.max_projects),
            images=ImageFetcher.from_settings(settings),
            predict_admission=threading.BoundedSemaphore(settings.predict_queue),
        )
