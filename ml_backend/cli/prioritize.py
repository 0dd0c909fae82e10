"""Order a Label Studio project's unlabeled tasks by an active-learning strategy.

Scores every unlabeled task with the project's current model (the newest intact
checkpoint in MODEL_DIR, the one the ML backend serves), selects --batch tasks with
--strategy and writes that order into Label Studio:

- one prediction per ranked task under a new model version
  ``<checkpoint>+<strategy>@<time>``, carrying the model's brush masks (the
  pre-annotation) and a rank-based score (ascending = strategy order); the project
  switches to it and to "Uncertainty sampling", so "Label All Tasks" (GET
  /api/projects/<id>/next) serves the ranked tasks most informative first;
- ``priority`` (1 = first) in the task data, and a Data Manager tab "Priority"
  sorted by it; previous priorities and priority predictions are removed.

Before the first training round (model version 0) uncertainty is noise: the
cold-start strategy (--cold-start, default kmeans over embeddings) is used instead.

--clusters also gives each ranked prediction the task's k-means cluster of the pool's
embeddings: Label Studio then serves the least-solved cluster first and the lowest score
within it, so near-identical tasks are not served in a row (the closed loop does this by
default, QUEUE_CLUSTERS). Without it the served order is exactly the ranking.

--heatmaps puts a colour-mapped PNG of the pixel-wise uncertainty (<= 512 px, as a
data: URI) in data.uncertainty of each ranked task; show it beside the image with
<Image name="uncertainty" value="$uncertainty"/> in the label config.

Exit status: 0 done (or nothing to do), 1 failure (Label Studio, model, worker),
2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from ml_backend.config import Settings
from ml_backend.jobs.status import JobFailed, wait_for_job
from sdk.cli import prog_name, run_main
from sdk.label_config import BrushTarget, LabelConfigError
from sdk.labelstudio import LabelStudioAPI, LabelStudioError
from sdk.priority import HEATMAP_FIELD
from sdk.queue_order import TaskRef, project_pool, write_order
from sdk.strategies import (
    COLD_START_STRATEGIES,
    REDUCTIONS,
    STRATEGIES,
    check_cold_start,
    check_uncertainty,
    get_strategy,
)

if TYPE_CHECKING:  # torch-heavy: imported when scoring starts, so usage errors answer fast
    from ml_backend.jobs.ranking import Ranking, ScoringOptions

PROG = prog_name("prioritize")
log = logging.getLogger(PROG)


class UsageError(Exception):
    """Bad arguments or environment: exit status 2."""


class Failure(Exception):
    """Something outside the arguments failed: exit status 1."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog_name("scripts/prioritize.py"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Environment: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, MODEL_DIR (as for the backend);"
            " TILE_SIZE, TILE_OVERLAP and the image limits of the backend apply; --via-worker also"
            " uses REDIS_URL and RQ_QUEUE. Strategies: " + ", ".join(STRATEGIES) + "."
        ),
    )
    parser.add_argument("--project", required=True, type=int, metavar="ID", help="Label Studio project id")
    parser.add_argument("--strategy", required=True, metavar="NAME", help="sampling strategy (see below)")
    parser.add_argument("--batch", type=int, default=10, metavar="K", help="how many tasks to rank [10]")
    parser.add_argument(
        "--cold-start",
        default=COLD_START_STRATEGIES[0],
        metavar="NAME",
        help=f"strategy while the model is untrained: {', '.join(COLD_START_STRATEGIES)} [%(default)s]",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the ranking, write nothing")
    parser.add_argument("--json", action="store_true", help="print the ranking as JSON on stdout")
    parser.add_argument(
        "--heatmaps",
        action="store_true",
        help=f"attach a PNG heat map of the pixel-wise uncertainty to ranked tasks (data.{HEATMAP_FIELD})",
    )
    parser.add_argument(
        "--clusters",
        action="store_true",
        help="cluster the pool (k-means of the embeddings) and let Label Studio serve one task per "
        "cluster before a second of any",
    )
    parser.add_argument(
        "--via-worker",
        action="store_true",
        help="score on an RQ worker (python -m ml_backend.worker, e.g. on a GPU machine) instead of here",
    )
    parser.add_argument(
        "--mc-samples", type=int, default=8, metavar="T", help="MC-dropout passes for bald [8]"
    )
    parser.add_argument(
        "--reduction", default="sum", help=f"pixel scores to image score: {', '.join(REDUCTIONS)} [sum]"
    )
    parser.add_argument(
        "--uncertainty", default="entropy", help="uncertainty measure of ceal and hybrid [entropy]"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random, kmeans and MC dropout [0]")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass [4]")
    parser.add_argument(
        "--timeout", type=int, default=3600, help="seconds to wait for the worker job (--via-worker) [3600]"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    try:
        get_strategy(args.strategy)
        check_cold_start(args.cold_start)
        check_uncertainty(args.uncertainty)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    if args.reduction not in REDUCTIONS:
        raise UsageError(f"--reduction must be one of {', '.join(REDUCTIONS)}, got {args.reduction!r}")
    if args.mc_samples < 1 or args.batch_size < 1:
        raise UsageError("--mc-samples and --batch-size must be at least 1")


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# -- reading Label Studio ------------------------------------------------------------------------------
# -- ranking -----------------------------------------------------------------------------------------------
def scoring_options(args: argparse.Namespace, settings: Settings) -> ScoringOptions:
    from ml_backend.jobs.ranking import ScoringOptions

    return ScoringOptions(
        mc_samples=args.mc_samples,
        uncertainty=args.uncertainty,
        reduction=args.reduction,
        tile=settings.tile_size,
        overlap=settings.tile_overlap,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def rank_here(
    args: argparse.Namespace,
    settings: Settings,
    project_id: int,
    target: BrushTarget,
    pool: list[TaskRef],
    labeled: list[TaskRef],
) -> Ranking:
    from ml_backend.images import ImageFetcher
    from ml_backend.jobs.ranking import rank_tasks
    from ml_backend.learner.checkpoints import CheckpointStore
    from ml_backend.learner.network import default_device

    store = CheckpointStore.for_settings(settings, str(project_id), target)
    if not store.root.exists():
        say(f"no checkpoints for this project in MODEL_DIR={settings.model_dir}: using the untrained network")
    version, net = store.load_newest_intact()
    fetcher = ImageFetcher.from_settings(settings)
    device = default_device()
    say(f"scoring {len(pool)} unlabeled tasks with {version.name} on {device}")
    ranking, _ = rank_tasks(
        net,
        version,
        target,
        fetcher.fetch,
        pool,
        labeled,
        strategy=args.strategy,
        k=args.batch,
        cold_start=args.cold_start,
        describe=not args.dry_run,
        heatmaps=args.heatmaps and not args.dry_run,
        clusters=args.clusters,
        options=scoring_options(args, settings),
        device=device,
        progress=not args.quiet,
    )
    return ranking


def rank_on_worker(
    args: argparse.Namespace,
    settings: Settings,
    project_id: int,
    label_config: str,
    pool: list[TaskRef],
    labeled: list[TaskRef],
) -> Ranking:
    from redis import Redis
    from redis.exceptions import RedisError
    from rq import Queue, Worker

    from ml_backend.jobs.ranking import Ranking, rank_tasks_job

    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30)
    try:
        redis.ping()
    except (RedisError, OSError) as exc:
        raise Failure(f"cannot reach Redis at {settings.redis_url} (REDIS_URL): {exc}") from None
    queue = Queue(settings.queue_name, connection=redis)
    if not Worker.all(queue=queue):
        raise Failure(
            f"no RQ worker listens on queue {settings.queue_name!r} at {settings.redis_url};"
            " start one with `python -m ml_backend.worker`"
        )
    job = queue.enqueue_call(
        rank_tasks_job,
        args=[str(project_id), label_config, pool, labeled],
        kwargs={
            "strategy": args.strategy,
            "k": args.batch,
            "cold_start": args.cold_start,
            "describe": not args.dry_run,
            "heatmaps": args.heatmaps and not args.dry_run,
            "clusters": args.clusters,
            "options": asdict(scoring_options(args, settings)),
        },
        timeout=args.timeout,
        result_ttl=24 * 3600,
        failure_ttl=7 * 24 * 3600,
        description=f"prioritize project {project_id} ({args.strategy})",
    )
    say(f"scoring {len(pool)} unlabeled tasks on a worker (job {job.id})")
    bar: tqdm | None = None

    def show(meta: dict) -> None:
        nonlocal bar
        progress = meta.get("progress")
        if not progress or args.quiet:
            return
        if bar is None or bar.desc != f"worker: {progress['stage']}":
            if bar is not None:
                bar.close()
            bar = tqdm(total=progress["total"], desc=f"worker: {progress['stage']}", unit="img")
        bar.n = progress["done"]
        bar.refresh()

    try:
        wait_for_job(job, timeout=args.timeout + 60, on_meta=show)
    except KeyboardInterrupt:
        job.cancel()
        raise
    finally:
        if bar is not None:
            bar.close()
    result = dict(job.return_value(refresh=True))
    say(f"worker saved the pool's scores to {result.pop('scores_path')}")
    return Ranking.from_dict(result)


# -- main ----------------------------------------------------------------------------------------------------
def report(
    args: argparse.Namespace,
    project_id: int,
    ranking: Ranking,
    n_labeled: int,
    urls: dict[int, str],
    name: str | None,
) -> None:
    rows = [
        {
            "rank": i + 1,
            "task": item.task,
            "score": item.score,
            "cluster": item.cluster,
            "image": urls.get(item.task),
        }
        for i, item in enumerate(ranking.ranked)
    ]
    if args.json:
        out: dict[str, Any] = {
            "project": project_id,
            "dry_run": args.dry_run,
            "model_version": ranking.version,
            "trained": ranking.trained,
            "requested_strategy": ranking.requested,
            "strategy": ranking.strategy,
            "cold_start": not ranking.trained,
            "note": ranking.note,
            "pool_size": ranking.pool_size,
            "labeled": n_labeled,
            "skipped": {str(k): v for k, v in ranking.skipped.items()},
            "priority_version": name,
            "ranking": rows,
        }
        print(json.dumps(out, indent=1))
        return
    print(f"{'rank':>4}  {'task':>8}  {'score':>12}  image")
    for row in rows:
        value = "-" if row["score"] is None else f"{row['score']:.6g}"
        print(f"{row['rank']:>4}  {row['task']:>8}  {value:>12}  {row['image']}")


def run(args: argparse.Namespace) -> None:
    check_args(args)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not settings.label_studio_api_key:
        raise UsageError("no API key: set LABEL_STUDIO_API_KEY (Account & Settings -> Access Token)")
    api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key)
    project = api.project(args.project)
    try:
        target = settings.brush_target(project.get("label_config"))
    except LabelConfigError as exc:
        raise Failure(f"project {args.project}: {exc}") from None

    tasks = project_pool(api, args.project, target.value_key)
    pool, labeled, urls, unusable = tasks.pool, tasks.labeled, tasks.urls, tasks.unusable
    if unusable:
        say(f"{len(unusable)} task(s) have no {target.value_key!r} image and are left out: {unusable[:10]}")
    say(f"project {args.project}: {len(tasks.tasks)} tasks, {len(pool)} unlabeled, {len(labeled)} labeled")

    if not pool:
        say("nothing to prioritise: no unlabeled tasks")
        from ml_backend.jobs.ranking import Ranking

        ranking = Ranking("", True, args.strategy, args.strategy, "no unlabeled tasks", 0, [])
    elif args.via_worker:
        ranking = rank_on_worker(args, settings, args.project, project["label_config"], pool, labeled)
    else:
        ranking = rank_here(args, settings, args.project, target, pool, labeled)
    if pool:
        say(ranking.note)
    for task_id, reason in ranking.skipped.items():
        say(f"task {task_id} not scored: {reason}")
    if pool and len(ranking.skipped) == len(pool):
        reason = next(iter(ranking.skipped.values()))
        raise Failure(f"none of the {len(pool)} unlabeled tasks' images could be read, e.g.: {reason}")

    name = None
    if args.dry_run:
        say("dry run: nothing written to Label Studio")
    else:
        name = write_order(
            api,
            project,
            ranking,
            tasks.tasks,
            manage_heatmaps=args.heatmaps,
            progress=not args.quiet,
            say=say,
        ).version
    report(args, args.project, ranking, len(labeled), urls, name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    url = os.environ.get("LABEL_STUDIO_URL", "http://localhost:8080")
    return run_main(
        PROG,
        lambda: run(args),
        input_errors=(UsageError,),
        failures=(Failure, JobFailed, LabelStudioError),
        url=url,
    )
