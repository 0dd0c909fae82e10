#!/usr/bin/env python3
"""`make demo`: Label Studio + the emloop ML backend on this machine, with images to label.

Starts (or reuses) Redis, starts Label Studio, the ML backend and an RQ worker, creates
the "emloop demo" project, imports synthetic EM sections (or slices of your own volume),
connects the backend, annotates a few synthetic sections with their ground truth as an
expert would (Label Studio's webhooks make the worker train a first model version),
pre-annotates every task on the worker and then waits. Ctrl-C stops everything it started; a Redis that
was already running is left alone. State lives in `.run/demo/`, so a second run reuses
the database and the project.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from devtools.label_studio import LabelStudioServer
from devtools.local_stack import BackendServer, RedisHandle, WorkerProcess, ensure_redis
from devtools.processes import ManagedProcess, install_sigterm_handler
from sdk.backend_api import BackendAPI
from sdk.label_config import parse_brush_target
from sdk.predictions import brush_results
from sdk.queue_order import ensure_priority_view
from sdk.synthetic import write_demo_images

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_TITLE = "emloop demo"
LABEL_CONFIG = (
    '<View><Image name="image" value="$image" zoom="true"/>'
    '<BrushLabels name="tag" toName="image">'
    '<Label value="Mitochondria" background="#ff0000"/></BrushLabels></View>'
)
SAMPLING = "Uncertainty sampling"
IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment: LS_PORT, ML_PORT, REDIS_URL, VOLUME (defaults for the options above).",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO_ROOT / ".run" / "demo",
        help="where the demo keeps its state [.run/demo]",
    )
    parser.add_argument(
        "--ls-port",
        type=int,
        default=int(env.get("LS_PORT", 8080)),
        help="Label Studio port [$LS_PORT or 8080]",
    )
    parser.add_argument(
        "--ml-port",
        type=int,
        default=int(env.get("ML_PORT", 9090)),
        help="ML backend port [$ML_PORT or 9090]",
    )
    parser.add_argument(
        "--redis-url",
        default=env.get("REDIS_URL"),
        help="Redis to use [$REDIS_URL or redis://127.0.0.1:6379/0; if none answers, a private one]",
    )
    parser.add_argument(
        "--volume",
        type=Path,
        default=env.get("VOLUME") or None,
        help="[$VOLUME] a folder of 2-D images or a (multi-page) TIFF to label instead of synthetic images",
    )
    parser.add_argument("--images", type=int, default=12, help="synthetic images, or max slices [12]")
    parser.add_argument("--size", type=int, default=512, help="synthetic image size in pixels [512]")
    parser.add_argument("--seed", type=int, default=0, help="synthetic image seed [0]")
    parser.add_argument(
        "--bind", default="127.0.0.1", help="Label Studio listen address; 0.0.0.0 for other machines"
    )
    parser.add_argument("--no-predict", action="store_true", help="do not pre-annotate the tasks")
    parser.add_argument(
        "--teach",
        type=int,
        default=4,
        help="synthetic images annotated with their ground truth, as an expert would, so the "
        "worker trains a first version before predictions are retrieved (0: serve the untrained "
        "model) [4]",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="set everything up, then stop and exit (non-zero if any step failed)",
    )
    return parser.parse_args(argv)


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def note(message: str) -> None:
    print(f"    {message}", flush=True)


# ------------------------------------------------------------------------------ images


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3:  # grey + alpha → grey; colour → grey
        a = a[..., 0] if a.shape[-1] == 2 else a[..., :3].mean(axis=-1)
    if a.dtype == np.uint8:
        return a
    lo, hi = np.percentile(a, (0.5, 99.5))
    scaled = (a.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def _evenly(n_total: int, n: int) -> list[int]:
    if n_total <= n:
        return list(range(n_total))
    return sorted({int(round(i)) for i in np.linspace(0, n_total - 1, n)})


def read_volume_slices(path: Path, n: int) -> list[tuple[str, np.ndarray]]:
    """Up to ``n`` evenly spaced 2-D sections of a folder of images or a (multi-page) TIFF."""
    import tifffile

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
        out = []
        for i in _evenly(len(files), n):
            f = files[i]
            arr = (
                tifffile.imread(f, key=0)
                if f.suffix.lower() in (".tif", ".tiff")
                else np.asarray(Image.open(f))
            )
            out.append((f.stem, _to_uint8(np.asarray(arr))))
        return out
    if path.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = series.shape
            plane_dims = 3 if len(shape) >= 3 and shape[-1] in (3, 4) else 2  # RGB(A) or grey
            planes = int(np.prod(shape[:-plane_dims])) if len(shape) > plane_dims else 1
            if planes == 1:
                return [(path.stem, _to_uint8(series.asarray()))]
            if len(tif.pages) >= planes:
                return [
                    (f"{path.stem}_z{i:04d}", _to_uint8(tif.pages[i].asarray())) for i in _evenly(planes, n)
                ]
            volume = series.asarray().reshape(planes, *shape[-plane_dims:])
            return [(f"{path.stem}_z{i:04d}", _to_uint8(volume[i])) for i in _evenly(planes, n)]
    return [(path.stem, _to_uint8(np.asarray(Image.open(path))))]


def prepare_images(args: argparse.Namespace, images_dir: Path) -> list[Path]:
    if args.volume is None:
        return write_demo_images(
            images_dir / "synthetic", n=args.images, size=args.size, seed=args.seed, masks=True
        )
    volume = args.volume.expanduser().resolve()
    if not volume.exists():
        raise SystemExit(f"VOLUME {volume} does not exist")
    out_dir = images_dir / volume.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, section in read_volume_slices(volume, args.images):
        path = out_dir / f"{name}.png"
        Image.fromarray(section).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------ Label Studio


def find_or_create_project(ls: LabelStudioServer, title: str) -> tuple[Any, bool]:
    client = ls.client()
    for project in client.projects.list(title=title):
        if project.title == title:
            client.projects.update(project.id, sampling=SAMPLING)
            return client.projects.get(project.id), False
    return client.projects.create(title=title, label_config=LABEL_CONFIG, sampling=SAMPLING), True


def connect_backend(ls: LabelStudioServer, project_id: int, backend_url: str) -> None:
    """One ML backend per demo project: drop ones left from runs on other ports."""
    client = ls.client()
    existing = list(client.ml.list(project=project_id))
    for ml in existing:
        if ml.url.rstrip("/") != backend_url:
            client.ml.delete(ml.id)
            note(f"removed stale ML backend {ml.url}")
    if not any(ml.url.rstrip("/") == backend_url for ml in existing):
        client.ml.create(project=project_id, url=backend_url, title="emloop", is_interactive=False)


def preannotate(backend: BackendServer, project_id: int) -> dict:
    """Every task pre-annotated by the worker in chunks (no /predict timeout), as
    `scripts/preannotate.py` does."""
    api = BackendAPI(backend.url)
    queued = api.preannotate(project_id, include_labeled=True)
    note(f"{queued['queued_tasks']} tasks queued for the worker ({queued['already']} already done)")
    return api.follow_preannotation(project_id, progress=False)


def use_newest_predictions(ls: LabelStudioServer, project_id: int, backend: BackendServer) -> str:
    """Point the project at the backend's newest version: uncertainty sampling only ranks the
    predictions whose model_version equals the project's (connecting sets it to the title)."""
    body = {"project": f"{project_id}.0", "schema": LABEL_CONFIG}
    version = requests.post(f"{backend.url}/setup", json=body, timeout=10).json()["model_version"]
    ls.client().projects.update(id=project_id, model_version=version)
    return version


def teach(ls: LabelStudioServer, project_id: int, masks_dir: Path, n: int) -> int:
    """Annotate `n` tasks with the generator's ground truth: Label Studio's webhooks start training."""
    client = ls.client()
    target = parse_brush_target(LABEL_CONFIG)
    done = 0
    for task in sorted(client.tasks.list(project=project_id, fields="all"), key=lambda t: t.id)[:n]:
        if task.total_annotations:
            continue
        # Label Studio stores uploads as "<hash>-<original name>".
        name = Path(str(task.data["image"])).name.split("-", 1)[-1]
        mask = np.asarray(Image.open(masks_dir / name))
        client.annotations.create(id=task.id, result=brush_results(mask.astype(np.uint8), target))
        done += 1
    return done


def wait_for_training(backend: BackendServer, project_id: int, timeout: float = 1800) -> dict:
    """Follow the backend's /status until the run ends, printing its progress."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        status = requests.get(f"{backend.url}/status/{project_id}", timeout=5).json()
        state = status.get("state", "queued")
        progress = status.get("progress") or {}
        line = f"{state} {progress.get('step', 0)}/{progress.get('steps', '?')}" if progress else state
        if line != last:
            note(line + (f" (loss {progress['loss']})" if progress.get("loss") is not None else ""))
            last = line
        if state in ("succeeded", "failed", "interrupted"):
            return status
        time.sleep(2)
    raise TimeoutError(f"training did not finish in {timeout:.0f} s")


# --------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    data_dir: Path = args.data_dir.resolve()
    logs = data_dir / "logs"
    failures: list[str] = []

    step("Redis")
    redis: RedisHandle = stack.enter_context(ensure_redis(args.redis_url))
    note(f"{redis.url} ({'started for this demo' if redis.started else 'already running, reused'})")

    ls_dir = data_dir / "label-studio"
    first = not (ls_dir / "label_studio.sqlite3").exists()
    step(f"Label Studio on port {args.ls_port}" + (" (first start runs migrations: ~1 min)" if first else ""))
    ls = LabelStudioServer(
        ls_dir,
        port=args.ls_port,
        bind=args.bind,
        document_root=data_dir,
        log_path=logs / "label-studio.log",
    )
    try:
        stack.enter_context(ls)
    except RuntimeError as exc:
        raise SystemExit(f"Label Studio failed to start: {exc}\n(set LS_PORT to use another port)") from None
    note(f"{ls.url} up in {ls.startup_seconds:.1f}s")

    env = {
        "MODEL_DIR": str(data_dir / "models"),
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "REDIS_URL": redis.url,
        # A demo should show the loop within minutes on a laptop CPU; your environment wins.
        "TRAIN_DEBOUNCE_SECONDS": os.environ.get("TRAIN_DEBOUNCE_SECONDS", "2"),
        "TRAIN_STEPS": os.environ.get("TRAIN_STEPS", "150"),
    }
    step(f"ML backend on port {args.ml_port}")
    backend = BackendServer(env, port=args.ml_port, log_path=logs / "ml-backend.log")
    try:
        stack.enter_context(backend)
    except (RuntimeError, TimeoutError) as exc:
        raise SystemExit(f"ML backend failed to start: {exc}\n(set ML_PORT to use another port)") from None
    note(f"{backend.url} healthy")
    children: list[ManagedProcess] = [ls, backend]

    step("RQ worker")
    worker = stack.enter_context(WorkerProcess(env, log_path=logs / "ml-worker.log"))
    try:
        worker.wait_ready(redis.url, timeout=60)
        note(f"worker pid {worker.pid} listening")
    except (RuntimeError, TimeoutError) as exc:
        failures.append(f"worker: {exc}")
        note(f"WARNING: worker not ready: {exc}")
    children.append(worker)

    title = PROJECT_TITLE if args.volume is None else f"{PROJECT_TITLE}: {Path(args.volume).stem}"
    step(f'Project "{title}"')
    project, created = find_or_create_project(ls, title)
    note(f"{'created' if created else 'reused'} project {project.id} ({SAMPLING.lower()})")
    if project.task_number:
        note(f"already has {project.task_number} tasks; not importing (delete {data_dir} to start over)")
    else:
        source = "synthetic sections" if args.volume is None else f"slices of {args.volume}"
        step(f"Importing {source}")
        paths = prepare_images(args, data_dir / "images")
        task_ids = ls.upload_files(project.id, paths)
        note(f"{len(task_ids)} tasks from {paths[0].parent}")

    step("Connecting the ML backend")
    try:
        connect_backend(ls, project.id, backend.url)
        note("connected")
    except Exception as exc:  # the SDK raises ApiError with Label Studio's explanation
        failures.append(f"connect: {exc}")
        note(f"WARNING: could not connect the backend: {exc}")
        args.no_predict = True

    status: dict = {}  # the first training run's, when the demo teaches
    if args.volume is None and args.teach > 0 and not args.no_predict:
        step(f"Teaching: {args.teach} expert annotations (the synthetic ground truth) → webhooks → worker")
        try:
            added = teach(ls, project.id, data_dir / "images" / "synthetic" / "masks", args.teach)
            note(f"{added} annotations submitted" if added else "already annotated; no new training")
            if added:
                status = wait_for_training(backend, project.id)
                result = status.get("last_result") or {}
                metrics = result.get("metrics") or {}
                after = (metrics.get("holdout_after") or {}).get("iou")
                if status.get("state") != "succeeded":
                    failures.append(f"training: {status.get('state')} {status.get('error', '')}")
                note(
                    f"{status.get('state')}: {result.get('version', '?')}"
                    + (f", held-out IoU {after:.3f}" if isinstance(after, float) else "")
                )
        except Exception as exc:
            failures.append(f"teaching: {exc}")
            note(f"WARNING: teaching failed: {exc} (see {logs})")

    if not args.no_predict:
        step("Pre-annotating every task (jobs on the worker)")
        try:
            done = preannotate(backend, project.id)
            total = len(list(ls.client().tasks.list(project=project.id)))
            predicted = done.get("predicted", 0) + done.get("skipped", 0) + done.get("already", 0)
            note(f"{predicted}/{total} tasks have predictions")
            if done.get("failed") or predicted < total:
                failures.append(f"predictions: {done.get('failed', 0)} failed, {predicted}/{total} done")
            ranked = ((status or {}).get("last_result") or {}).get("queue") or {}
            if ranked.get("priority_version"):
                note(
                    f"queue ranked by {ranked['priority_version']} ({ranked['ranked']} unlabelled tasks): the"
                    " worker re-ranks it after every training run; scores are ranks, lowest served first"
                )
            else:
                version = use_newest_predictions(ls, project.id, backend)
                note(f"project model version set to {version}: uncertainty sampling serves by its scores")
            ensure_priority_view(ls.api(), project.id)  # a tab that shows the prediction score
        except Exception as exc:
            failures.append(f"predictions: {exc}")
            note(f"WARNING: pre-annotation failed: {exc} (see {logs})")

    print(
        f"\nemloop demo is {'set up' if args.smoke else 'running'}:\n"
        f"  Label Studio  {ls.url}\n"
        f"  Login         {ls.username} / {ls.password}\n"
        f"  Project       {ls.url}/projects/{project.id}/data\n"
        f"  ML backend    {backend.url}  (models in {env['MODEL_DIR']})\n"
        f"  Redis         {redis.url}\n"
        f"  API token     {ls.token}\n"
        f"  Logs          {logs}\n",
        flush=True,
    )
    if failures:
        print("Problems:\n  " + "\n  ".join(failures), flush=True)
    if args.smoke:
        return 1 if failures else 0

    print("Press Ctrl-C to stop.", flush=True)
    while True:
        time.sleep(1)
        for child in children:
            if not child.alive:
                print(f"\n{child.name} exited unexpectedly (rc={child.returncode})\n{child.log_tail(30)}")
                return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    with contextlib.ExitStack() as stack:
        try:
            return run(args, stack)
        except KeyboardInterrupt:
            print("\nStopping...", flush=True)
            return 0
        finally:
            stack.close()
            print("Stopped everything this demo started.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
