"""The closed loop: after a training run, re-rank the project's queue with the new version.

Label Studio's Community edition serves the next task by the lowest prediction score of the
project's model version ("Uncertainty sampling"); it never re-ranks by itself. After every
successful run the worker scores the unlabelled tasks with the new checkpoint, writes one
prediction per task (the pre-annotation, with the strategy's rank as its score) under a new
priority version, switches the project to it and removes the older priority versions: the same
writing `scripts/prioritize.py` does (`sdk.queue_order`).

With QUEUE_CLUSTERS (the default) each prediction also carries the task's k-means cluster of
the pool's embeddings: Label Studio then serves the least-solved cluster first, so the tasks
labelled before the next training run are the best-ranked of different clusters instead of
near-identical neighbours that all rank high together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ml_backend.config import Settings
from ml_backend.images import shared_fetcher
from ml_backend.jobs.ranking import ScoringOptions, rank_tasks
from ml_backend.learner.checkpoints import CheckpointStore
from ml_backend.learner.network import default_device
from sdk.queue_order import project_pool, write_order

log = logging.getLogger(__name__)


def refresh_queue(
    project: str, settings: Settings, on_progress: Callable[[str, int, int | None], None] | None = None
) -> dict:
    """Rank every unlabelled task of `project` with its newest version and write the order."""
    fetcher = shared_fetcher(settings)
    api = fetcher.label_studio
    info = api.project(int(project))
    target = settings.brush_target(info.get("label_config"))
    tasks = project_pool(api, int(project), target.value_key)
    if not tasks.pool:
        return {"priority_version": None, "ranked": 0, "note": "no unlabelled tasks"}
    version, net = CheckpointStore.for_settings(settings, project, target).load_newest_intact()
    if version.number == 0:
        return {"priority_version": None, "ranked": 0, "note": "no trained version yet"}
    ranking, _ = rank_tasks(
        net,
        version,
        target,
        fetcher.fetch,
        tasks.pool,
        tasks.labeled,
        strategy=settings.queue_strategy,
        k=len(tasks.pool),
        clusters=settings.queue_clusters,
        options=ScoringOptions(tile=settings.tile_size, overlap=settings.tile_overlap),
        device=default_device(),
        progress=False,
        on_progress=on_progress,
    )
    written = write_order(
        api, info, ranking, tasks.tasks, say=lambda m: log.info("project %s: %s", project, m)
    )
    return {
        "priority_version": written.version,
        "strategy": ranking.strategy,
        "ranked": written.ranked,
        "skipped": len(ranking.skipped),
        "removed_versions": written.removed_versions,
    }
