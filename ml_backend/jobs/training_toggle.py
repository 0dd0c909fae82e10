"""Label Studio's "Start model training on annotation submission" toggle, made to tell the truth.

The backend trains from the webhooks Label Studio registers for all events, so every annotation
trains the model while a new project shows that toggle off. When a project first connects
(its first /setup) the backend turns the toggle on, once; from then on it honours the toggle
(`training_queue.training_decision`): a user who turns it off stops annotations from training,
and *Start Training* still trains.
"""

from __future__ import annotations

import logging
import threading

from redis.exceptions import RedisError

from ml_backend.jobs.training_queue import TOGGLE_FIELD, ProjectTraining
from sdk.labelstudio import LabelStudioAPI, LabelStudioError

log = logging.getLogger(__name__)


def turn_on_once(state: ProjectTraining, api: LabelStudioAPI) -> None:
    """Turn the toggle on if this backend never did for the project (its choice is kept after)."""
    try:
        if not state.claim_toggle():
            return
        if not api.project(int(state.project)).get(TOGGLE_FIELD):
            api.request("PATCH", f"/api/projects/{int(state.project)}", json={TOGGLE_FIELD: 1})
            log.info("project %s: turned on 'Start model training on annotation submission'", state.project)
        # Only now: until the toggle is on, annotations must keep training.
        state.manage_toggle()
    except (LabelStudioError, RedisError, ValueError) as exc:  # tried again at the next /setup
        log.warning("project %s: could not turn on training on submission: %s", state.project, exc)


def turn_on_in_background(state: ProjectTraining, api: LabelStudioAPI) -> None:
    """/setup has 3 s and Label Studio may be waiting on it: the settings are written after."""
    if not (state.project.isdigit() and api.api_key):
        return
    try:
        if state.toggle_managed():  # the common case: every /setup after the first
            return
    except RedisError as exc:
        log.warning("project %s: could not check the training toggle: %s", state.project, exc)
        return
    threading.Thread(target=turn_on_once, args=(state, api), daemon=True).start()
