"""Rank Label Studio tasks with the backend's model: :func:`rank_tasks` scores the tasks' images
(:func:`ml_backend.learner.scoring.score_pool`), selects with a strategy (a cold-start strategy while the
model is untrained), describes the selected tasks (brush masks, heat maps) and, when asked, numbers
them by k-means cluster of the pool's embeddings for Label Studio's cluster-aware serving;
:func:`rank_tasks_job` is the same as an RQ job, so a GPU worker can do it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml_backend.config import TILE, TILE_OVERLAP, Settings
from ml_backend.images import ImageError, shared_fetcher
from ml_backend.learner.checkpoints import CheckpointStore, Version
from ml_backend.learner.network import UNet
from ml_backend.learner.scoring import PoolScores, Progress, score_pool
from sdk.label_config import BrushTarget
from sdk.predictions import brush_results
from sdk.priority import choose_strategy, heatmap_uri, heatmap_vmax
from sdk.queue_order import TaskRef
from sdk.strategies import cluster_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringOptions:
    """How the pool is scored; the same for in-process runs and worker jobs."""

    mc_samples: int = 8
    uncertainty: str = "entropy"  # ceal / hybrid
    reduction: str = "sum"
    region_size: int = 16
    region_quantile: float = 1.0
    tile: int = TILE
    overlap: int = TILE_OVERLAP
    batch_size: int = 4
    seed: int = 0


@dataclass
class RankedTask:
    task: int
    score: float | None  # the strategy's image score; None for diversity strategies
    result: list[dict] | None = None  # brush regions of the model's prediction
    heatmap: str | None = None  # data URI
    cluster: int | None = None  # k-means cluster of the pool's embeddings, when asked for


@dataclass
class Ranking:
    version: str  # checkpoint that scored the pool
    trained: bool
    requested: str
    strategy: str  # the one used (differs at cold start)
    note: str
    pool_size: int
    ranked: list[RankedTask]
    skipped: dict[int, str] = field(default_factory=dict)  # task id -> why it was not scored
    map_kind: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Ranking:
        data = dict(data)
        data["ranked"] = [RankedTask(**r) for r in data["ranked"]]
        data["skipped"] = {int(k): v for k, v in data.get("skipped", {}).items()}
        return cls(**data)


def _load_images(
    refs: Sequence[TaskRef], load: Callable[[str], np.ndarray], kept: list[int], skipped: dict[int, str]
) -> Iterator[np.ndarray]:
    """Images of `refs`, lazily; tasks whose image fails are recorded in `skipped`, not fatal."""
    for task_id, url in refs:
        try:
            image = load(url)
        except ImageError as exc:
            skipped[task_id] = str(exc)
            log.warning("task %s not scored: %s", task_id, exc)
            continue
        kept.append(task_id)
        yield image


def rank_tasks(
    net: UNet,
    version: Version,
    target: BrushTarget,
    load: Callable[[str], np.ndarray],
    pool: Sequence[TaskRef],
    labeled: Sequence[TaskRef] = (),
    *,
    strategy: str,
    k: int,
    cold_start: str = "kmeans",
    describe: bool = True,
    heatmaps: bool = False,
    clusters: bool = False,
    options: ScoringOptions = ScoringOptions(),
    device: torch.device | None = None,
    progress: bool = True,
    on_progress: Progress | None = None,
) -> tuple[Ranking, PoolScores]:
    """Score `pool`, pick the k most informative tasks in order, and describe them.

    An untrained model (version 0) switches to the cold-start strategy. Labeled tasks
    are embedded only when the strategy covers them (coreset, hybrid). ``describe``
    predicts the picked tasks again for their brush masks (and heat maps), so the pool
    pass keeps nothing per pixel. ``clusters`` gives each ranked task its k-means cluster
    over the whole scored pool (:func:`sdk.strategies.cluster_labels`): the pool pass
    already yields every image's embedding, so this costs one k-means, no network pass.
    """
    used, note = choose_strategy(strategy, version.name, version.number > 0, cold_start)
    opts = {"uncertainty": options.uncertainty} if used in ("ceal", "hybrid") else {}
    common = {
        "mc_samples": options.mc_samples,
        "tile": options.tile,
        "overlap": options.overlap,
        "batch_size": options.batch_size,
        "device": device,
        "seed": options.seed,
        "progress": progress,
    }
    reduce_opts = {
        "reduction": options.reduction,
        "region_size": options.region_size,
        "region_quantile": options.region_quantile,
    }

    def stage(name: str, total: int) -> Callable[[int], None] | None:
        return (lambda done: on_progress(name, done, total)) if on_progress else None

    kept: list[int] = []
    skipped: dict[int, str] = {}
    scores = score_pool(
        net,
        _load_images(pool, load, kept, skipped),
        used,
        uncertainty=options.uncertainty,
        total=len(pool),
        desc=f"scoring pool ({used})",
        on_progress=stage("pool", len(pool)),
        **common,
        **reduce_opts,
    )
    labeled_embeddings = None
    if used in ("coreset", "hybrid") and labeled:
        labeled_embeddings = score_pool(
            net,
            _load_images(labeled, load, [], {}),
            None,
            total=len(labeled),
            desc="embedding labeled tasks",
            on_progress=stage("labeled", len(labeled)),
            **common,
        ).embeddings
    picks = scores.select(
        used, min(k, len(scores)), labeled_embeddings=labeled_embeddings, seed=options.seed, **opts
    )
    labels = cluster_labels(scores.embeddings, seed=options.seed) if clusters else None
    ranked = [
        RankedTask(
            task=kept[i],
            score=None if scores.scores is None else float(scores.scores[i]),
            cluster=None if labels is None else int(labels[i]),
        )
        for i in picks
    ]
    map_kind = None
    if describe and ranked:
        urls = dict(pool)
        found: list[int] = []
        details = score_pool(
            net,
            _load_images([(r.task, urls[r.task]) for r in ranked], load, found, skipped),
            used,
            uncertainty=options.uncertainty,
            keep_maps=heatmaps,
            keep_labels=True,
            total=len(ranked),
            desc="masks" + (" and heat maps" if heatmaps else "") + " of the ranked tasks",
            on_progress=stage("describe", len(ranked)),
            **common,
            **reduce_opts,
        )
        map_kind = details.map_kind
        by_task = {task: i for i, task in enumerate(found)}
        vmax = heatmap_vmax(map_kind, target.n_classes, details.uncertainty_maps or []) if heatmaps else 0.0
        for item in ranked:
            i = by_task.get(item.task)
            if i is None:
                continue  # the image vanished between the passes: ranked, but without a mask
            item.result = brush_results(details.label_maps[i], target)
            if heatmaps:
                item.heatmap = heatmap_uri(details.uncertainty_maps[i], vmax)
    ranking = Ranking(
        version=version.name,
        trained=version.number > 0,
        requested=strategy,
        strategy=used,
        note=note,
        pool_size=len(pool),
        ranked=ranked,
        skipped=skipped,
        map_kind=map_kind,
    )
    return ranking, scores


# -- the RQ job -------------------------------------------------------------------------------------------


def scores_path(store: CheckpointStore, name: str) -> Path:
    """Where a job keeps a pool's scores: beside the checkpoints they came from."""
    return store.root / "scores" / f"{name}.npz"


def rank_tasks_job(
    project: str,
    label_config: str,
    pool: list[TaskRef],
    labeled: list[TaskRef],
    *,
    options: dict | None = None,
    **selection: Any,
) -> dict:
    """RQ entry point (``python -m ml_backend.worker``): :func:`rank_tasks` with the project's newest
    intact checkpoint in MODEL_DIR, on the worker's device; images come by URL like the backend's.
    `selection` is :func:`rank_tasks`' keywords (strategy, k, cold_start, describe, heatmaps, clusters).

    Returns :meth:`Ranking.to_dict` plus ``scores_path``, the pool's scores and embeddings
    saved as .npz under MODEL_DIR (``task_ids`` aligned with them). Progress goes to
    ``job.meta["progress"]``.
    """
    from rq import get_current_job

    settings = Settings.from_env()
    target = settings.brush_target(label_config)
    store = CheckpointStore.for_settings(settings, project, target)
    version, net = store.load_newest_intact()
    job = get_current_job()
    last = [0.0]

    def report(stage: str, done: int, total: int | None) -> None:
        if job is None or (time.monotonic() - last[0] < 1.0 and done != total):
            return
        last[0] = time.monotonic()
        job.meta["progress"] = {"stage": stage, "done": done, "total": total}
        job.save_meta()

    ranking, scores = rank_tasks(
        net,
        version,
        target,
        shared_fetcher(settings).fetch,
        [tuple(ref) for ref in pool],
        [tuple(ref) for ref in labeled],
        options=ScoringOptions(**(options or {})),
        progress=False,
        on_progress=report,
        **selection,
    )
    scored = [task for task, _ in pool if task not in ranking.skipped]
    path = scores_path(store, f"{ranking.strategy}-{job.id if job else int(time.time())}")
    scores.save(path, task_ids=np.asarray(scored, dtype=np.int64))
    return {**ranking.to_dict(), "scores_path": str(path)}
