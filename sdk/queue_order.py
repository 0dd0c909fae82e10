"""Label Studio I/O of an active-learning order: read a project's tasks, write the order back.

One implementation for `scripts/prioritize.py` and the worker's closed loop (which ranks a
project's unlabelled tasks after every training run). The rules (version names, scores, task
data) are the pure functions of `sdk.priority`; this module only talks to Label Studio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlparse

from tqdm import tqdm

from .labelstudio import LabelStudioAPI
from .priority import (
    HEATMAP_FIELD,
    PRIORITY_FIELD,
    PRIORITY_VIEW,
    UNCERTAINTY_SAMPLING,
    is_priority_version,
    priority_version,
    rank_scores,
    unique_version,
    updated_task_data,
)

log = logging.getLogger(__name__)

TaskRef = tuple[int, str]  # (task id, image URL as in the task data)


class RankedItem(Protocol):
    task: int
    result: list[dict] | None  # brush regions of the model's prediction (the pre-annotation)
    heatmap: str | None
    cluster: int | None  # Label Studio serves the least-solved cluster first, then the lowest score


class Order(Protocol):
    """What is written: `ml_backend.jobs.ranking.Ranking` is one."""

    version: str  # the checkpoint that scored the pool
    strategy: str
    ranked: Sequence[RankedItem]


@dataclass
class ProjectPool:
    """A project's tasks split for ranking."""

    tasks: list[dict]  # every task, data as stored (unresolved URLs), to write back as is
    pool: list[TaskRef] = field(default_factory=list)  # unlabelled, with an image
    labeled: list[TaskRef] = field(default_factory=list)
    urls: dict[int, str] = field(default_factory=dict)
    unusable: list[int] = field(default_factory=list)  # no image in the configured field


def iter_tasks(
    api: LabelStudioAPI, project_id: int, page_size: int = 100, fields: str | None = None
) -> Iterator[dict]:
    """Every task with its data as stored (unresolved URLs), so data can be written back as is;
    ``fields="all"`` adds each task's predictions (with their results: heavier)."""
    page, seen = 1, 0
    while True:
        params = {"project": project_id, "page": page, "page_size": page_size, "resolve_uri": "false"}
        if fields:
            params["fields"] = fields
        body = api.request("GET", "/api/tasks", params=params).json()
        yield from body["tasks"]
        seen += len(body["tasks"])
        if not body["tasks"] or seen >= body["total"]:
            return
        page += 1


def image_url(api: LabelStudioAPI, task: dict, value_key: str) -> str | None:
    """The URL the backend would fetch; cloud-storage URIs go through Label Studio's resolver."""
    url = (task.get("data") or {}).get(value_key)
    if not isinstance(url, str) or not url:
        return None
    scheme = urlparse(url).scheme
    if scheme and scheme not in ("http", "https", "file"):  # s3://, gs://, azure-blob://
        resolved = api.request("GET", f"/api/tasks/{task['id']}").json().get("data", {})
        url = resolved.get(value_key, url)
    return url


def project_pool(api: LabelStudioAPI, project_id: int, value_key: str) -> ProjectPool:
    out = ProjectPool(list(iter_tasks(api, project_id)))
    for task in out.tasks:
        url = image_url(api, task, value_key)
        if url is None:
            out.unusable.append(task["id"])
            continue
        out.urls[task["id"]] = url
        (out.labeled if task.get("is_labeled") else out.pool).append((task["id"], url))
    return out


# Bookkeeping columns hidden in that tab. Label Studio's own default tab hides the prediction
# score, the one number this loop is about; listing what to hide shows every other column.
HIDDEN_COLUMNS = [
    f"tasks:{name}"
    for name in (
        "inner_id",
        "annotations_results",
        "annotations_ids",
        "predictions_results",
        "predictions_model_versions",
        "file_upload",
        "storage_filename",
        "created_at",
        "updated_at",
        "updated_by",
        "avg_lead_time",
        "draft_exists",
        "comment_count",
        "unresolved_comment_count",
        "last_comment_updated_at",
        "comment_authors",
    )
]


def ensure_priority_view(api: LabelStudioAPI, project_id: int) -> None:
    """A Data Manager tab sorted by priority (numerically: task data is compared as text otherwise),
    showing the prediction score."""
    views = api.request("GET", "/api/dm/views", params={"project": project_id}).json()
    if any((v.get("data") or {}).get("title") == PRIORITY_VIEW for v in views):
        return
    column = f"tasks:data.{PRIORITY_FIELD}"
    data = {
        "title": PRIORITY_VIEW,
        "type": "list",
        "target": "tasks",
        "ordering": [column],
        "columnsDisplayType": {column: "Number"},
        "hiddenColumns": {"explore": HIDDEN_COLUMNS, "labeling": HIDDEN_COLUMNS},
        "filters": {"conjunction": "and", "items": []},
    }
    api.request("POST", "/api/dm/views", json={"project": project_id, "data": data})


@dataclass
class Written:
    version: str | None  # the priority model version the project now uses (None: nothing ranked)
    ranked: int
    tasks_updated: int
    removed_versions: int


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def write_order(
    api: LabelStudioAPI,
    project: dict,
    order: Order,
    tasks: Sequence[dict],
    *,
    manage_heatmaps: bool = False,
    progress: bool = False,
    say: Callable[[str], None] = log.info,
) -> Written:
    """New priority predictions, switch the project to them, then remove the old order.

    Only predictions under priority versions (``<checkpoint>+<strategy>@<time>``) are removed:
    annotations and other predictions are never touched. Ranked items with a ``cluster``
    are posted one by one to ``/api/predictions``: Label Studio 1.23's bulk
    ``/import/predictions`` keeps only task, result, score and model version.
    """
    project_id = project["id"]
    versions = list(api.request("GET", f"/api/projects/{project_id}/model-versions").json())
    stale = [v for v in versions if is_priority_version(v)]
    name = None
    if order.ranked:
        name = unique_version(priority_version(order.version, order.strategy), versions)
        predictions = [
            {"task": item.task, "result": item.result or [], "score": score, "model_version": name}
            | ({} if item.cluster is None else {"cluster": item.cluster})
            for item, score in zip(order.ranked, rank_scores(len(order.ranked)), strict=True)
        ]
        if any("cluster" in p for p in predictions):
            for p in tqdm(predictions, desc="writing predictions", unit="task", disable=not progress):
                api.request("POST", "/api/predictions", json=p)
        else:
            for chunk in _chunks(predictions, 50):
                api.request("POST", f"/api/projects/{project_id}/import/predictions", json=chunk)
        api.request(
            "PATCH",
            f"/api/projects/{project_id}",
            json={"model_version": name, "sampling": UNCERTAINTY_SAMPLING},
        )
    for version in stale:
        api.request("DELETE", f"/api/projects/{project_id}/model-versions/", json={"model_version": version})

    ranks = {item.task: i + 1 for i, item in enumerate(order.ranked)}
    heatmaps = {item.task: item.heatmap for item in order.ranked if item.heatmap}
    heatmap_required = f'value="${HEATMAP_FIELD}"' in project.get("label_config", "")
    changes = []
    for task in tasks:
        data = updated_task_data(
            task.get("data") or {},
            rank=ranks.get(task["id"]),
            heatmap=heatmaps.get(task["id"]),
            manage_heatmaps=manage_heatmaps,
            labeled=bool(task.get("is_labeled")),
            heatmap_required=heatmap_required,
        )
        if data is not None:
            changes.append((task["id"], data))
    for task_id, data in tqdm(changes, desc="updating task data", unit="task", disable=not progress):
        api.request("PATCH", f"/api/tasks/{task_id}", json={"data": data})
    ensure_priority_view(api, project_id)
    say(
        f"wrote {len(order.ranked)} priority predictions ({name}), updated {len(changes)} tasks' data,"
        f" removed {len(stale)} old priority version(s); sampling is {UNCERTAINTY_SAMPLING!r}"
    )
    if not project.get("show_collab_predictions", True):
        say(
            "note: 'Use predictions to prelabel tasks' is off, so annotators see no pre-annotation;"
            " the order still applies (turning that setting off again clears it)"
        )
    return Written(name, len(order.ranked), len(changes), len(stale))
