"""The closed loop's latency: from an annotator's last submission to Label Studio serving a task
ranked by the model trained on it.

A real Label Studio, Redis, backend and worker (the product's defaults unless overridden) and a
project of synthetic EM images (`sdk.synthetic`, 256 x 256). Each round annotates --tasks more
tasks through Label Studio's API, as an annotator would; Label Studio's webhooks make the worker
train a new version and re-rank the queue (QUEUE_STRATEGY). The round's latency ends when
`GET /api/projects/<id>/next` serves a task whose prediction under the project's model version
is one of the new version's ranking predictions. The phases come from the backend's /status:
waiting (the debounce, TRAIN_DEBOUNCE_SECONDS, and the queue), training, ranking; the rest is
Label Studio and polling (0.5 s).

    .venv/bin/python -m benchmarks.bench_loop_latency                   # 3 rounds, product defaults
    .venv/bin/python -m benchmarks.bench_loop_latency --rounds 1 --set TRAIN_STEPS=20 --json /tmp/x.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
from PIL import Image

from benchmarks.bench_worker_training import machine
from devtools.label_studio import LabelStudioServer, seed_from_template
from devtools.local_stack import BackendServer, WorkerProcess, ensure_redis
from sdk.atomic import atomic_write_bytes
from sdk.label_config import parse_brush_target
from sdk.predictions import brush_results
from sdk.synthetic import synthetic_em

ROOT = Path(__file__).resolve().parents[1]

BRUSH_CONFIG = (
    '<View><Image name="em" value="$img" zoom="true"/>'
    '<BrushLabels name="organelle" toName="em"><Label value="Mitochondria"/></BrushLabels></View>'
)
TARGET = parse_brush_target(BRUSH_CONFIG)
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "loop_latency.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--images", type=int, default=40, help="tasks in the project [40]")
    parser.add_argument("--tasks", type=int, default=5, help="tasks annotated per round [5]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds [3]")
    parser.add_argument("--set", action="append", default=[], metavar="VAR=VALUE", help="backend/worker env")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a round may take [1800]")
    parser.add_argument(
        "--json", type=Path, help=f"results file [{DEFAULT_JSON.relative_to(ROOT)} for defaults]"
    )
    args = parser.parse_args(argv)
    if args.images < args.tasks * args.rounds + 1:
        parser.error("--images must exceed --tasks x --rounds (something must stay unlabelled)")
    return args


def say(message: str) -> None:
    print(f"bench_loop_latency: {message}", file=sys.stderr, flush=True)


def served_version(ls: LabelStudioServer, project: int) -> tuple[int, str | None]:
    """The task /next serves and the project's model version, if that task has a prediction of it."""
    headers = ls.auth_headers
    version = requests.get(f"{ls.url}/api/projects/{project}", headers=headers, timeout=30).json()[
        "model_version"
    ]
    task = requests.get(f"{ls.url}/api/projects/{project}/next", headers=headers, timeout=30).json()
    predictions = requests.get(
        f"{ls.url}/api/predictions", params={"task": task["id"]}, headers=headers, timeout=30
    )
    current = [p for p in predictions.json() if p["model_version"] == version]
    return task["id"], version if current else None


def run_round(ls, backend, project: int, task_ids: list[int], masks: dict, timeout: float) -> dict:
    client = ls.client()
    before = requests.get(f"{backend.url}/status/{project}", timeout=10).json().get("finished_at", 0)
    for task_id in task_ids:
        client.annotations.create(
            id=task_id, result=brush_results(masks[task_id], TARGET), was_cancelled=False
        )
    submitted = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{backend.url}/status/{project}", timeout=10).json()
        if status.get("state") == "failed":
            raise RuntimeError(f"training failed: {status.get('error')}")
        queue = (status.get("last_result") or {}).get("queue") or {}
        if status.get("state") == "succeeded" and status.get("finished_at", 0) > before and queue:
            if queue.get("error"):
                raise RuntimeError(f"ranking failed: {queue['error']}")
            task, version = served_version(ls, project)
            if version == queue["priority_version"]:
                served = time.time()
                break
        time.sleep(0.5)
    else:
        raise TimeoutError(f"no task ranked by a new version was served within {timeout:g} s")
    trained = status["last_result"]["metrics"]["seconds"]
    return {
        "annotated": len(task_ids),
        "latency_seconds": round(served - submitted, 1),
        "waiting_seconds": round(status["started_at"] - submitted, 1),
        "training_seconds": round(trained, 1),
        "ranking_seconds": round(status["finished_at"] - status["started_at"] - trained, 1),
        "serving_seconds": round(served - status["finished_at"], 1),
        "version": status["last_result"]["version"],
        "priority_version": queue["priority_version"],
        "ranked": queue["ranked"],
        "served_task": task,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    results: dict = {
        "meta": {
            "machine": machine(),
            "images": args.images,
            "image_size": 256,
            "tasks_per_round": args.tasks,
            "env_overrides": overrides,
        },
        "rounds": [],
    }
    with contextlib.ExitStack() as exits:
        work = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="emloop-bench-loop-")))
        paths, masks = [], []
        for i in range(args.images):
            image, mask = synthetic_em(256, 256, seed=i)
            paths.append(work / f"em-{i:03d}.png")
            Image.fromarray(image).save(paths[-1])
            masks.append(mask)
        redis = exits.enter_context(ensure_redis(os.environ.get("REDIS_URL")))
        seed_from_template(work / "ls")
        say("starting Label Studio, backend and worker")
        ls = exits.enter_context(LabelStudioServer(work / "ls", log_path=work / "label-studio.log"))
        project = ls.client().projects.create(title="bench loop latency", label_config=BRUSH_CONFIG).id
        task_ids = ls.upload_files(project, paths)
        env = {
            "MODEL_DIR": str(work / "models"),
            "REDIS_URL": redis.url,
            "RQ_QUEUE": f"emloop-bench-loop-{uuid.uuid4().hex[:8]}",
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.token,
            **overrides,
        }
        backend = exits.enter_context(BackendServer(env, log_path=work / "backend.log"))
        worker = exits.enter_context(WorkerProcess(env, log_path=work / "worker.log"))
        worker.wait_ready(redis.url)
        ls.client().ml.create(project=project, url=backend.url, title="emloop", is_interactive=False)
        by_task = dict(zip(task_ids, masks, strict=True))
        for r in range(args.rounds):
            chosen = task_ids[r * args.tasks : (r + 1) * args.tasks]
            say(f"round {r + 1}: annotating {len(chosen)} tasks")
            try:
                row = run_round(ls, backend, project, chosen, by_task, args.timeout)
            except (RuntimeError, TimeoutError):
                print(worker.log_tail(30), file=sys.stderr)
                raise
            results["rounds"].append({"round": r + 1, **row})
            say(json.dumps(row))
    latencies = [row["latency_seconds"] for row in results["rounds"]]
    results["median_latency_seconds"] = statistics.median(latencies)
    path = args.json or (DEFAULT_JSON if not overrides else None)
    if path is not None:
        atomic_write_bytes(path, (json.dumps(results, indent=2) + "\n").encode())
        say(f"results in {path}")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
