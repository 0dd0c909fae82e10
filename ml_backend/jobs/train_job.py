"""The RQ training job: snapshot a project's annotations, fine-tune, publish a version.

Runs in `python -m ml_backend.worker`, on any machine that reaches Redis,
Label Studio and MODEL_DIR (shared, or mirrored through Redis); uses CUDA when the worker has it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from rq import get_current_job

from ml_backend.config import Settings
from ml_backend.images import ImageError, shared_fetcher
from ml_backend.jobs.queue_refresh import refresh_queue
from ml_backend.jobs.training_queue import ProjectTraining
from ml_backend.learner.checkpoints import CheckpointStore
from ml_backend.learner.click_checkpoints import ClickCheckpointStore
from ml_backend.learner.click_training import ClickTrainConfig, clicked_object_iou, train_clicks
from ml_backend.learner.network import default_device
from ml_backend.learner.training import TrainConfig, evaluate, fine_tune
from sdk.annotations import AnnotationError, MaskCache, choose_annotation
from sdk.label_config import BrushTarget

log = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    target: BrushTarget
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    task_ids: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # task id → why it could not be used


_masks = MaskCache()


def fetch_training_set(project: str, settings: Settings) -> TrainingSet:
    """Every annotated task of the project, decoded; tasks that fail are listed, not dropped silently."""
    fetcher = shared_fetcher(settings)
    api = fetcher.label_studio
    config = api.client().projects.get(id=int(project)).label_config
    data = TrainingSet(settings.brush_target(config))
    for task in api.iter_tasks(int(project), only_annotated=True):
        annotation = choose_annotation(task)
        if annotation is None:
            continue  # only skipped/cancelled annotations
        try:
            url = (task.get("data") or {}).get(data.target.value_key)
            image = fetcher.fetch(url)
            labels = _masks.get(annotation, data.target, image.shape[:2])
        except (ImageError, AnnotationError) as exc:
            data.skipped[task["id"]] = str(exc)
            log.warning("project %s task %s not used for training: %s", project, task["id"], exc)
            continue
        data.images.append(image)
        data.masks.append(labels)
        data.task_ids.append(task["id"])
    return data


def holdout_split(task_ids: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """Positions of (train, held-out) tasks.

    A task is held out when its id hashes below `fraction`, so it stays on its side as the
    project grows and a model is never scored on tasks an ancestor trained on. With 4 or
    more tasks and none below the threshold, the lowest hash is held out.
    """
    if len(task_ids) < 4 or fraction <= 0:
        return list(range(len(task_ids))), []
    unit = [int.from_bytes(hashlib.sha256(str(t).encode()).digest()[:8], "big") / 2**64 for t in task_ids]
    held = {i for i, u in enumerate(unit) if u < fraction} or {min(range(len(unit)), key=unit.__getitem__)}
    if len(held) == len(task_ids):
        held.discard(max(held, key=unit.__getitem__))
    return [i for i in range(len(task_ids)) if i not in held], sorted(held)


def train_project(project: str, settings: Settings, state: ProjectTraining | None = None) -> dict:
    """Fine-tune the project's newest model on all its annotations; returns the new version's record."""
    started = time.time()
    data = fetch_training_set(project, settings)
    if not data.images:
        raise ValueError(f"project {project} has no usable annotated tasks (skipped: {data.skipped})")
    train_idx, hold_idx = holdout_split(data.task_ids, settings.train_holdout)
    pick = lambda idx, items: [items[i] for i in idx]  # noqa: E731
    store = CheckpointStore.for_settings(settings, project, data.target)
    parent, net = store.load_newest_intact()
    device = default_device()
    net.to(device)
    hold_images, hold_masks = pick(hold_idx, data.images), pick(hold_idx, data.masks)
    tiles = {"tile": settings.tile_size, "overlap": settings.tile_overlap}  # as /predict sees the images
    before = evaluate(net, hold_images, hold_masks, **tiles) if hold_idx else None

    def progress(step: int, total: int, loss: float) -> None:
        if state is not None and (step % 10 == 0 or step == total):
            state.set_status(progress={"step": step, "steps": total, "loss": round(loss, 4)})
        if step % 25 == 0:
            log.info("project %s step %d/%d loss %.4f", project, step, total, loss)

    config = TrainConfig(
        steps=settings.train_steps, patch_size=settings.train_patch_size, batch_size=settings.train_batch_size
    )
    summary = fine_tune(
        net,
        pick(train_idx, data.images),
        pick(train_idx, data.masks),
        config,
        val_images=hold_images,
        val_masks=hold_masks,
        device=device,
        progress=progress,
        keep_start=parent.number > 0,  # an untrained network is no candidate
    )
    after = evaluate(net, hold_images, hold_masks, **tiles) if hold_idx else None
    metrics = {
        "holdout_before": before,
        "holdout_after": after,
        "n_train": len(train_idx),
        "n_holdout": len(hold_idx),
        "train_task_ids": pick(train_idx, data.task_ids),
        "holdout_task_ids": pick(hold_idx, data.task_ids),
        "skipped_tasks": data.skipped,
        "device": str(device),
        "seconds": round(time.time() - started, 1),
        **summary,
    }
    version = store.save(net.cpu(), parent=parent, metrics=metrics)
    log.info("project %s: published %s (held-out IoU %s → %s)", project, version.name, before, after)
    clicks = train_click_network(
        project,
        settings,
        pick(train_idx, data.images),
        pick(train_idx, data.masks),
        hold_images,
        hold_masks,
        device,
    )
    return {"version": version.name, "parent": parent.name, "metrics": metrics, "clicks": clicks}


def train_click_network(
    project: str,
    settings: Settings,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    hold_images: list[np.ndarray],
    hold_masks: list[np.ndarray],
    device: torch.device,
) -> dict:
    """Fine-tune the project's click network on the same annotations (CLICK_TRAIN_STEPS).

    A new version is published only when it finds the held-out objects at least as well as
    its parent (or nothing is held out). Never fails the run: the segmentation version stands.
    """
    if settings.click_train_steps <= 0:
        return {"skipped": "CLICK_TRAIN_STEPS=0"}
    store = ClickCheckpointStore.for_settings(settings, project)
    try:
        parent, net = store.load_newest_intact()

        def score() -> float | None:
            found = clicked_object_iou(net, hold_images, hold_masks)
            return float(np.mean(found)) if found else None

        before = score()
        config = ClickTrainConfig(steps=settings.click_train_steps)
        summary = train_clicks(net.to(device), images, masks, config, device=device)
        net.cpu()
        after = score()
        metrics = {"heldout_clicked_iou_before": before, "heldout_clicked_iou_after": after, **summary}
        if before is not None and after is not None and after < before:
            log.info("project %s: click network not published (held-out IoU %s < %s)", project, after, before)
            return {"version": parent.name, "published": False, **metrics}
        version = store.save(net, parent=parent, metrics=metrics)
    except ValueError as exc:  # e.g. no labelled object large enough to click on
        log.info("project %s: click network not trained: %s", project, exc)
        return {"skipped": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported in /status, the segmentation version stands
        log.exception("project %s: the click network was not fine-tuned", project)
        return {"error": f"{type(exc).__name__}: {exc}"}
    log.info(
        "project %s: published %s (held-out clicked-object IoU %s → %s)",
        project,
        version.name,
        before,
        after,
    )
    return {"version": version.name, "published": True, **metrics}


def reorder_queue(project: str, settings: Settings, state: ProjectTraining) -> dict | None:
    """The closed loop (QUEUE_STRATEGY); a failure here leaves the new version standing."""
    if settings.queue_strategy == "off":
        return None
    state.set_status(state="ranking", progress=None)

    def progress(stage: str, done: int, total: int | None) -> None:
        if done % 10 == 0 or done == total:
            state.set_status(progress={"stage": stage, "done": done, "total": total})

    try:
        return refresh_queue(project, settings, progress)
    except Exception as exc:  # noqa: BLE001 - reported in /status, the run itself succeeded
        log.exception("project %s: the queue was not re-ranked", project)
        return {"error": f"{type(exc).__name__}: {exc}"}


def rank_new_tasks(project: str, settings: Settings, state: ProjectTraining) -> dict:
    """Tasks were imported and nothing new to train on: rank the queue again with the current
    version, so they are served in order and pre-annotated before the next training run."""
    order = reorder_queue(project, settings, state)
    state.set_status(
        state="ranked",
        progress=None,
        finished_at=time.time(),
        ranking=order,
        message="new tasks: the queue was ranked again with the current version (no training)",
    )
    return {"ranked": order}


def run_training(project: str, queue: str) -> dict:
    """RQ entry point: wait for the quiet period, take the project's lock, train once."""
    settings = Settings.from_env()
    job = get_current_job()
    state = ProjectTraining(job.connection, project, queue)
    state.set_status(state="waiting", job_id=job.id, progress=None)
    state.wait_quiet(settings.train_debounce)
    with state.lock(job.id, settings.train_lock_ttl):
        generation, trained, forced = state.take_snapshot()
        new_tasks = state.take_new_tasks()  # a training run ranks them too
        if generation <= trained and not forced:
            if new_tasks:
                return rank_new_tasks(project, settings, state)
            state.set_status(state="skipped", message="no new annotations since the last run")
            return {"skipped": True}
        retry_of = (job.meta or {}).get("retry_of", "")
        state.set_status(
            state="running",
            job_id=job.id,
            started_at=time.time(),
            generation=generation,
            retry_of=retry_of,
            message=f"retry of interrupted job {retry_of}" if retry_of else "",
        )
        try:
            result = train_project(project, settings, state)
        except Exception as exc:
            state.set_status(state="failed", error=f"{type(exc).__name__}: {exc}", finished_at=time.time())
            raise
        state.mark_trained(generation)
        order = reorder_queue(project, settings, state)
        state.set_status(
            state="succeeded",
            error="",
            finished_at=time.time(),
            last_result={
                "queue": order,
                "version": result["version"],
                "clicks": result["clicks"],
                "metrics": {
                    k: result["metrics"][k]
                    for k in (
                        "holdout_before",
                        "holdout_after",
                        "n_train",
                        "n_holdout",
                        "steps",
                        "skipped_tasks",
                        "seconds",
                    )
                },
            },
        )
        return result
