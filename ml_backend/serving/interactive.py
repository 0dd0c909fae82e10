"""Click-to-mask for Label Studio's smart tools: the object an annotator's clicks or box point at.

Label Studio's interactive pre-annotation (`POST /api/ml/<id>/interactive-annotating`) calls
`/predict` with the smart-tool regions in `context`; the answer is one brush region of the
clicked label, from the project's click network (`ml_backend.learner.click_checkpoints`: the shipped
weights until a training run fine-tunes them on the project's annotations).
"""

from __future__ import annotations

import time

from ml_backend.learner.click_checkpoints import ClickCheckpointStore
from ml_backend.learner.clicks import segment_prompt
from ml_backend.serving.runtime import Runtime
from sdk.label_config import BrushTarget
from sdk.predictions import brush_region
from sdk.prompts import parse_prompt, prompt_regions


def click_prediction(
    runtime: Runtime, project: str, target: BrushTarget, url: str, context: object
) -> dict | None:
    """The prediction for the prompt in `context`, or None when it holds no smart-tool region."""
    if not prompt_regions(context):
        return None
    image = runtime.images.fetch(url)
    prompt = parse_prompt(context, target, *image.shape[:2])
    model = runtime.registry.current(ClickCheckpointStore.for_settings(runtime.settings, project))
    with runtime.inference_slot:
        started = time.perf_counter()
        mask = segment_prompt(model.net, image, prompt)
        seconds = time.perf_counter() - started
    runtime.metrics.inc("emloop_click_seconds_total", seconds, help="time spent turning clicks into masks")
    return {
        "result": [brush_region(mask, target, prompt.label)] if mask.any() else [],
        "model_version": model.version.name,
    }
