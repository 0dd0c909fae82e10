"""emloop's Label Studio ML backend model: brush-mask pre-annotations with confidence scores,
and click-to-mask for Label Studio's smart tools.

Reads like a label-studio-ml example on purpose: `setup`, `predict`, `fit`.
The network, checkpoints, image fetching and training jobs live in their own modules.
"""

from __future__ import annotations

import time
from typing import Any

from ml_backend.images import ImageError
from ml_backend.jobs.preannotation import hand_to_workers, predict_url
from ml_backend.jobs.training_queue import TRAINING_EVENTS
from ml_backend.learner.checkpoints import CheckpointStore
from ml_backend.learner.inference import PredictionTooLarge
from ml_backend.serving.base import MLBackendBase
from ml_backend.serving.interactive import click_prediction
from sdk.prompts import PromptError


class EMSegmentationModel(MLBackendBase):
    """A 2D U-Net per project and label config; background + one class per `<Label>`."""

    TRAINING_EVENTS = TRAINING_EVENTS

    def setup(self) -> None:
        self.target = self.runtime.settings.brush_target(self.label_config)
        self.store = CheckpointStore.for_settings(self.runtime.settings, self.project_id, self.target)

    @property
    def model_version(self) -> str:
        """The version actually served: past a corrupt newest file, the one that loaded."""
        return self.runtime.registry.current(self.store).version.name

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> list[dict]:
        if context and tasks:  # a smart tool's clicks or box: the one object they point at
            clicked = self._predict_clicks(tasks[0], context)
            if clicked is not None:
                return [clicked]
        model = self.runtime.registry.current(self.store)  # every task of this request uses it
        settings = self.runtime.settings
        deadline = time.monotonic() + settings.predict_budget
        predictions = []
        for i, task in enumerate(tasks):
            if time.monotonic() > deadline:  # Label Studio gives up at 100 s: workers do the rest
                rest, version, key = tasks[i:], model.version.name, self.target.value_key
                queued = hand_to_workers(self.runtime.redis, settings, self.project_id, version, key, rest)
                return predictions + queued
            try:
                prediction, seconds = predict_url(
                    self.runtime.images.fetch, self._image_url(task), model.net, self.target,
                    model.version.name, settings, self.runtime.inference_slot,
                )  # fmt: skip
            except (ImageError, PredictionTooLarge) as exc:
                predictions.append({"task": task.get("id"), "error": str(exc)})
                continue
            self.runtime.metrics.inc(
                "emloop_forward_seconds_total", seconds, help="time inside the network's forward pass"
            )
            predictions.append(prediction)
        return predictions

    def _predict_clicks(self, task: dict, context: dict) -> dict | None:
        try:
            return click_prediction(
                self.runtime, self.project_id, self.target, self._image_url(task), context
            )
        except (ImageError, PromptError) as exc:
            return {"task": task.get("id"), "error": str(exc)}

    def fit(self, event: str, data: dict, **kwargs: Any) -> dict:
        """Never trains here (Label Studio waits 1 s): records the event for the RQ worker."""
        training = self.runtime.training(self.project_id)
        return training.record_event(event, self.runtime.settings, data.get("project"))

    def _image_url(self, task: dict) -> str:
        data = task.get("data")
        if not isinstance(data, dict) or self.target.value_key not in data:
            raise ImageError(f"task data has no {self.target.value_key!r} field for the image")
        return data[self.target.value_key]
