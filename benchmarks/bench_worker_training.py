"""Held-out IoU after training through the real worker path, before and after a code change.

Label Studio's webhooks -> the backend's /webhook -> Redis/RQ -> a real `python -m ml_backend.worker`
-> a new checkpoint, for two versions of emloop side by side in one run, each with its own defaults:

- before: the commit before the training-recipe change (--before-ref), checked out into a temporary
  `git worktree` (removed at the end), its backend and worker run from there with the same venv;
- after: the current working tree. Its ml_backend/ and sdk/ are copied when the run starts, so edits
  made while the benchmark runs (it takes an hour or more on a CPU) cannot reach its processes.

Protocol, on VNC stack 1 (mitochondria; --data, default ../shared/data/vnc beside the repository):
the top halves (rows 0-511) of the sections are 512 x 1024 PNG tasks of a Label Studio project with
one BrushLabels label. Round r annotates, through Label Studio's API, the sections i with
i % rounds == r - 1 (every other section for two rounds) with their ground truth, so Label Studio
calls the backend's webhook and the worker trains version r from version r - 1 (version 0 is the
untrained network). Each new version is evaluated on the bottom halves (rows 512-1023, never shown
to Label Studio) with the current code's `ml_backend.learner.training.evaluate`; the worker's own held-out
metrics come from the manifest.

Each code version gets its own Label Studio (a fresh copy of the migrated template, so the task ids,
and with them the worker's hash-based held-out split, are the same for both), backend, worker, RQ
queue and MODEL_DIR. Rounds run in turn, before then after, never at the same time (the other stack
waits idle), so a run cut short (--deadline, --timeout, Ctrl-C) still compares both versions on the
rounds it finished; the results file is rewritten after every round, with "complete": false until
the end. Only the full protocol (20 sections, 2 rounds, both versions, no --set) writes the default
results file; other runs print their table and write only to an explicit --json.

    .venv/bin/python -m benchmarks.bench_worker_training          # the full measurement (`make bench`)
    .venv/bin/python -m benchmarks.bench_worker_training --sections 4 --rounds 1 \\
        --set before:TRAIN_MAX_STEPS=10 --set after:TRAIN_STEPS=10 --json /tmp/smoke.json   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from devtools.label_studio import DEFAULT_LS_BIN, LabelStudioServer, label_studio_version, seed_from_template
from devtools.local_stack import BackendServer, WorkerProcess, ensure_redis
from devtools.processes import install_sigterm_handler
from ml_backend.learner.checkpoints import CheckpointStore, Version
from ml_backend.learner.inference import bfloat16_supported
from ml_backend.learner.training import evaluate
from sdk.atomic import atomic_write_bytes
from sdk.cli import run_main
from sdk.label_config import parse_brush_target
from sdk.predictions import brush_results
from tests.helpers import BRUSH_CONFIG

ROOT = Path(__file__).resolve().parents[1]

PROG = "bench_worker_training.py"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "vnc"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "worker_training.json"
BEFORE_REF = "8327572"
SIDES = ("before", "after")
FULL = {"sections": 20, "rounds": 2}
HALF = 512  # rows 0-511 are the tasks, rows 512-1023 the test set
CODE_PACKAGES = ("ml_backend", "sdk")  # what the backend and the worker import
WORKER_KEYS = ("holdout_before", "holdout_after", "n_train", "n_holdout", "steps", "seconds", "device")
TARGET = parse_brush_target(BRUSH_CONFIG)
STARTED = time.monotonic()

# Run by the worker's own interpreter, environment and working directory: which code it imports,
# with which defaults and how many torch threads.
PROBE = """
import dataclasses, json, torch
import ml_backend, sdk
from ml_backend.config import Settings
from ml_backend.learner.network import UNetConfig
from ml_backend.learner.training import TrainConfig
settings = dataclasses.asdict(Settings.from_env())
print(json.dumps({
    "ml_backend": ml_backend.__file__, "sdk": sdk.__file__, "torch_threads": torch.get_num_threads(),
    "settings": {k: v for k, v in settings.items() if k.startswith("train_") or k == "queue_name"},
    "network": dataclasses.asdict(UNetConfig()), "train_config": dataclasses.asdict(TrainConfig()),
}, default=str))
"""


class SetupError(Exception):
    """Something the benchmark needs is missing (data, Label Studio, the old commit): exit 2."""


def say(who: str, message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.0f} s] {who}: {message}", file=sys.stderr, flush=True)


# -- data -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sections:
    names: list[str]
    top_images: list[np.ndarray]
    top_masks: list[np.ndarray]  # 0/1 labels
    bottom_images: list[np.ndarray]
    bottom_masks: list[np.ndarray]


def load_sections(vnc: Path, count: int) -> Sections:
    """The first `count` sections of stack 1, split into task (top) and test (bottom) halves."""
    raws = sorted((vnc / "stack1" / "raw").glob("*.tif"))
    if len(raws) < count:
        raise SetupError(f"VNC data not found: {vnc}/stack1/raw has {len(raws)} sections, {count} needed")
    out = Sections([], [], [], [], [])
    for raw in raws[:count]:
        mask_path = vnc / "stack1" / "mitochondria" / f"{raw.stem}.png"
        if not mask_path.exists():
            raise SetupError(f"VNC data incomplete: {mask_path} is missing")
        image = np.asarray(Image.open(raw))
        mask = (np.asarray(Image.open(mask_path)) > 0).astype(np.uint8)  # modes "1" and "L" mixed
        out.names.append(raw.stem)
        out.top_images.append(image[:HALF])
        out.top_masks.append(mask[:HALF])
        out.bottom_images.append(image[HALF:])
        out.bottom_masks.append(mask[HALF:])
    return out


def round_plan(n_sections: int, rounds: int) -> list[list[int]]:
    """Sections annotated in each round: i % rounds == round - 1 (every other one for two rounds)."""
    return [[i for i in range(n_sections) if i % rounds == r] for r in range(rounds)]


# -- code versions ----------------------------------------------------------------------------------
def git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def resolve_commit(ref: str) -> str:
    try:
        return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except RuntimeError:
        raise SetupError(f"--before-ref {ref!r} is not a commit of {ROOT}") from None


@contextlib.contextmanager
def git_worktree(commit: str, path: Path) -> Iterator[Path]:
    """A detached checkout of `commit` at `path`, removed (and unregistered) on exit."""
    git("worktree", "add", "--detach", "--quiet", str(path), commit)
    try:
        yield path
    finally:
        try:
            git("worktree", "remove", "--force", str(path))
        except RuntimeError:
            shutil.rmtree(path, ignore_errors=True)
            git("worktree", "prune")


def snapshot_code(dest: Path) -> Path:
    """Copy the working tree's packages, so the run uses the code as it was when it started."""
    for package in CODE_PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def code_digest(root: Path) -> str:
    """SHA-256 over the packages' Python files: names the exact code a version ran."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# -- one code version's stack -----------------------------------------------------------------------
@dataclasses.dataclass
class Stack:
    """Label Studio, backend and worker running one version of the code, and its project."""

    name: str
    root: Path
    overrides: dict[str, str]
    ls: LabelStudioServer | None = None
    backend: BackendServer | None = None
    worker: WorkerProcess | None = None
    project: int = 0
    task_of_section: dict[int, int] = dataclasses.field(default_factory=dict)
    store: CheckpointStore | None = None


def start_stack(
    stack: Stack,
    exits: contextlib.ExitStack,
    *,
    work: Path,
    images: list[Path],
    redis_url: str,
    threads: int,
    debounce: float,
) -> dict:
    """Start the three processes, create the project, import the tasks; returns what was run."""
    t0 = time.monotonic()
    ls_dir = work / "label-studio"
    seed_from_template(ls_dir)
    stack.ls = exits.enter_context(LabelStudioServer(ls_dir, log_path=work / "label-studio.log"))
    client = stack.ls.client()
    project = client.projects.create(title=f"bench worker training: {stack.name}", label_config=BRUSH_CONFIG)
    stack.project = project.id
    stack.ls.upload_files(project.id, images)
    section = {path.name: i for i, path in enumerate(images)}
    for task in client.tasks.list(project=project.id, fields="all"):
        # Label Studio stores uploads as "<hash>-<original name>".
        stack.task_of_section[section[Path(str(task.data["img"])).name.split("-", 1)[-1]]] = task.id
    model_dir = work / "models"
    stack.store = CheckpointStore.for_project(model_dir, str(project.id), TARGET)
    env = {
        "MODEL_DIR": str(model_dir),
        "REDIS_URL": redis_url,
        "RQ_QUEUE": f"emloop-bench-{stack.name}-{uuid.uuid4().hex[:8]}",
        "LABEL_STUDIO_URL": stack.ls.url,
        "LABEL_STUDIO_API_KEY": stack.ls.token,
        "TRAIN_DEBOUNCE_SECONDS": str(debounce),
        "OMP_NUM_THREADS": str(threads),
        **stack.overrides,
    }
    logs = {"backend": work / "backend.log", "worker": work / "worker.log"}
    stack.backend = exits.enter_context(BackendServer(env, log_path=logs["backend"], repo_root=stack.root))
    stack.worker = exits.enter_context(WorkerProcess(env, log_path=logs["worker"], repo_root=stack.root))
    stack.worker.wait_ready(redis_url)
    probe = subprocess.run(
        [stack.worker.argv[0], "-c", PROBE],
        env=stack.worker.env,
        cwd=stack.worker.cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    code = json.loads(probe.stdout)
    if not Path(code["ml_backend"]).resolve().is_relative_to(stack.root.resolve()):
        raise RuntimeError(
            f"{stack.name}: the worker imports {code['ml_backend']}, not the code in {stack.root}"
        )
    # Connected once the tasks exist, so Label Studio asks for no predictions on import.
    client.ml.create(project=project.id, url=stack.backend.url, title="emloop", is_interactive=False)
    return {
        "code_dir": str(stack.root),
        "code_sha256": code_digest(stack.root),
        "rq_queue": env["RQ_QUEUE"],
        "env_overrides": stack.overrides,
        "project": project.id,
        "task_ids": [stack.task_of_section[i] for i in range(len(images))],
        "startup_seconds": round(time.monotonic() - t0, 1),
        **code,
    }


def annotate(stack: Stack, sections: list[int], data: Sections) -> float:
    """Submit the ground truth of `sections` as an annotator would; returns the seconds it took."""
    assert stack.ls is not None
    client = stack.ls.client()
    t0 = time.monotonic()
    for i in sections:
        result = brush_results(data.top_masks[i], TARGET)
        client.annotations.create(id=stack.task_of_section[i], result=result, was_cancelled=False)
    return time.monotonic() - t0


def worker_failed(stack: Stack, message: str) -> RuntimeError:
    """A one-line error; the worker's log tail goes to stderr first."""
    assert stack.worker is not None
    print(stack.worker.log_tail(30), file=sys.stderr)
    return RuntimeError(f"{stack.name}: {message} (worker log: {stack.worker.log_path})")


def trained_tasks(version: Version) -> int:
    return int(version.metrics.get("n_train", 0)) + int(version.metrics.get("n_holdout", 0))


def wait_for_version(stack: Stack, known: int, expected_tasks: int, timeout: float) -> list[Version]:
    """The versions written since `known` existed, once one has trained on `expected_tasks` tasks.

    More than one means the burst of annotations was split over two runs (a pause in submitting
    longer than the debounce); the last is the one that saw every task.
    """
    assert stack.store is not None and stack.backend is not None and stack.worker is not None
    deadline = time.monotonic() + timeout
    last_line, last_said = "", 0.0
    while True:
        new = stack.store.versions()[known:]
        if new and trained_tasks(new[-1]) >= expected_tasks:
            return new
        if not stack.worker.alive:
            raise worker_failed(stack, f"the worker exited with status {stack.worker.returncode}")
        status = requests.get(f"{stack.backend.url}/status/{stack.project}", timeout=10).json()
        state = status.get("state", "queued")
        if state in ("failed", "interrupted"):
            raise worker_failed(stack, f"training {state}: {status.get('error', '')}")
        progress = status.get("progress") or {}
        total = progress.get("steps") or progress.get("max_steps")  # the old code calls it max_steps
        line = (
            f"{state} step {progress.get('step')}/{total} loss {progress.get('loss')}" if progress else state
        )
        if line != last_line and time.monotonic() - last_said >= 30:
            say(stack.name, line)
            last_line, last_said = line, time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{stack.name}: no version trained on {expected_tasks} tasks after {timeout:.0f} s "
                "(--timeout, --deadline)"
            )
        time.sleep(2)


def run_round(
    stack: Stack, number: int, sections: list[int], annotated: int, data: Sections, timeout: float
) -> dict:
    """Annotate, wait for the worker's version, evaluate it on the bottom halves; returns the row."""
    assert stack.store is not None
    known = len(stack.store.versions())
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    submit = annotate(stack, sections, data)
    say(stack.name, f"round {number}: annotated {len(sections)} tasks in {submit:.1f} s; training")
    new = wait_for_version(stack, known, annotated, timeout)
    wall = time.monotonic() - t0
    version = new[-1]
    net = stack.store.load(version)
    t1 = time.monotonic()
    test = evaluate(net, data.bottom_images, data.bottom_masks)
    evaluated = time.monotonic() - t1
    metrics = version.metrics
    row = {
        "code": stack.name,
        "round": number,
        "sections": [data.names[i] for i in sections],
        "annotated_tasks": annotated,
        "version": version.name,
        "parent": version.parent,
        "versions_this_round": [v.name for v in new],
        "test_bottom_halves": test,
        "eval_seconds": round(evaluated, 1),
        "submit_seconds": round(submit, 1),
        "round_wall_seconds": round(wall, 1),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "network": net.config.to_dict(),
        "stored_intensity_window": net.intensity_window,
        "worker": {k: metrics.get(k) for k in WORKER_KEYS},
        "manifest_metrics": metrics,
    }
    say(
        stack.name,
        f"round {number}: {version.name} in {wall:.0f} s (training {metrics.get('seconds')} s, "
        f"{metrics.get('steps')} steps); IoU on the bottom halves {test['iou']:.3f} ({evaluated:.0f} s)",
    )
    return row


# -- report -----------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    return {
        "cpu": models[0] if models else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "bfloat16_native_cpu": bfloat16_supported(torch.device("cpu")),
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
        "label_studio": label_studio_version(),
    }


def _iou(scores: dict | None) -> str:
    return "–" if not scores else f"{scores['iou']:.3f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| code | round | tasks annotated | version | IoU bottom halves | Dice "
        "| worker held-out IoU before → after | train / held-out tasks | steps | training s | round wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r["worker"]
        lines.append(
            f"| {r['code']} | {r['round']} | {r['annotated_tasks']} | {r['version']} "
            f"| {r['test_bottom_halves']['iou']:.3f} | {r['test_bottom_halves']['dice']:.3f} "
            f"| {_iou(w['holdout_before'])} → {_iou(w['holdout_after'])} | {w['n_train']} / {w['n_holdout']} "
            f"| {w['steps']} | {w['seconds']} | {r['round_wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {side: {} for side in SIDES}
    for item in items:
        side, sep, assignment = item.partition(":")
        key, eq, value = assignment.partition("=")
        if not sep or not eq or side not in SIDES or not key:
            raise SetupError(f"--set {item!r}: expected SIDE:KEY=VALUE with SIDE one of {', '.join(SIDES)}")
        out[side][key] = value
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the VNC folder [%(default)s]")
    p.add_argument("--sections", type=int, default=FULL["sections"], help="first N sections of stack 1 [20]")
    p.add_argument("--rounds", type=int, default=FULL["rounds"], help="annotation rounds [2]")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="code versions [both]")
    p.add_argument("--before-ref", default=BEFORE_REF, help="the commit before the change [%(default)s]")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1,
        help="torch threads of the workers (OMP_NUM_THREADS) and of the evaluation [all cores: %(default)s]",
    )  # fmt: skip
    p.add_argument("--debounce", type=float, default=2.0, help="TRAIN_DEBOUNCE_SECONDS [%(default)s]")
    p.add_argument(
        "--set", action="append", default=[], metavar="SIDE:KEY=VALUE",
        help="environment override for one side's backend and worker, e.g. after:TRAIN_STEPS=20 "
        "(recorded; a run with overrides is not the full protocol)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds to wait for one training [4 h]")
    p.add_argument("--deadline", type=float, help="minutes for the whole run; stops waiting after that")
    p.add_argument("--workdir", type=Path, help="scratch folder, kept (default: a temp dir, removed)")
    p.add_argument(
        "--json", type=Path, help=f"results file [{DEFAULT_JSON.relative_to(ROOT)} for the full run]"
    )
    args = p.parse_args(argv)
    if args.sections < 1 or args.rounds < 1 or args.sections < args.rounds or args.threads < 1:
        p.error("need 1 <= --rounds <= --sections and --threads >= 1")
    return args


def run(args: argparse.Namespace) -> str:
    import torch

    if not DEFAULT_LS_BIN.exists():
        raise SetupError(f"Label Studio is not installed at {DEFAULT_LS_BIN}: run `make ls-venv`")
    if not (args.data / "stack1" / "raw").is_dir():
        raise SetupError(f"VNC data not found at {args.data} (see ../shared/data/README.md; --data DIR)")
    overrides = parse_overrides(args.set)
    sides = [s for s in SIDES if s in args.sides]
    full = (
        args.sections == FULL["sections"] and args.rounds == FULL["rounds"] and len(sides) == len(SIDES)
        and not args.set
    )  # fmt: skip
    json_path: Path | None = args.json or (DEFAULT_JSON if full else None)
    before_commit = resolve_commit(args.before_ref) if "before" in sides else None
    inherited = sorted(k for k in os.environ if k.startswith("TRAIN_"))
    for key in inherited:  # each side runs with its code's defaults, whatever this shell exports
        del os.environ[key]
    torch.set_num_threads(args.threads)
    data = load_sections(args.data, args.sections)
    plan = round_plan(args.sections, args.rounds)
    deadline = time.monotonic() + args.deadline * 60 if args.deadline else None

    results: dict = {
        "meta": {
            "complete": False,
            "full_protocol": full,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": [PROG, *sys.argv[1:]],
            "machine": machine(),
            "data": str(args.data),
            "sections": data.names,
            "rounds": [[data.names[i] for i in r] for r in plan],
            "task_rows": [0, HALF],
            "test_rows": [HALF, 2 * HALF],
            "threads": args.threads,
            "train_debounce_seconds": args.debounce,
            "env_overrides": {s: overrides[s] for s in sides if overrides[s]},
            "inherited_train_env_ignored": inherited,
            "before_commit": before_commit,
            "after_head": git("rev-parse", "HEAD"),
            "after_uncommitted_files": git("status", "--porcelain").splitlines(),
            "evaluation": "ml_backend.learner.training.evaluate of the working tree, tile 1024, overlap 64",
        },
        "stacks": {},
        "rounds": [],
    }

    def save() -> None:
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(json_path, (json.dumps(results, indent=2) + "\n").encode())

    work = args.workdir or Path(tempfile.mkdtemp(prefix="emloop-bench-worker-"))
    keep = args.workdir is not None
    say("setup", f"{len(data.names)} sections, {args.rounds} round(s), scratch in {work}")
    try:
        with contextlib.ExitStack() as exits:
            image_dir = work / "images"
            image_dir.mkdir(parents=True, exist_ok=True)
            images = []
            for name, image in zip(data.names, data.top_images, strict=True):
                images.append(image_dir / f"{name}.png")
                Image.fromarray(image).save(images[-1])
            redis = exits.enter_context(ensure_redis(os.environ.get("REDIS_URL")))
            roots = {"after": snapshot_code(work / "after-src")}
            if before_commit:
                roots["before"] = exits.enter_context(git_worktree(before_commit, work / "before-src"))
            stacks = {s: Stack(s, roots[s], overrides[s]) for s in sides}
            for stack in stacks.values():
                say(stack.name, f"starting Label Studio, backend and worker from {stack.root}")
                results["stacks"][stack.name] = start_stack(
                    stack, exits, work=work / stack.name, images=images, redis_url=redis.url,
                    threads=args.threads, debounce=args.debounce,
                )  # fmt: skip
                info = results["stacks"][stack.name]
                say(stack.name, f"ready in {info['startup_seconds']} s; settings {info['settings']}")
            save()
            for number, sections in enumerate(plan, start=1):
                annotated = sum(len(r) for r in plan[:number])
                for stack in stacks.values():
                    remaining = (
                        args.timeout if deadline is None else min(args.timeout, deadline - time.monotonic())
                    )
                    if remaining <= 0:
                        raise TimeoutError(f"--deadline of {args.deadline:g} min reached")
                    results["rounds"].append(run_round(stack, number, sections, annotated, data, remaining))
                    save()
    except BaseException:
        keep = True  # the logs explain what went wrong
        results["meta"]["wall_seconds"] = round(time.monotonic() - STARTED, 1)
        save()
        if results["rounds"]:
            print(table(results["rounds"]))
        kept = f"partial results in {json_path}, " if json_path else ""
        say("stopped", f"{kept}logs in {work}")
        raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    results["meta"].update(
        complete=True,
        finished=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        wall_seconds=round(time.monotonic() - STARTED, 1),
        load_avg_1min_at_end=round(os.getloadavg()[0], 2),
    )
    save()
    m = results["meta"]["machine"]
    print(
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {args.threads} thread(s); "
        f"wall {results['meta']['wall_seconds'] / 60:.0f} min"
    )
    if results["meta"]["env_overrides"]:
        print(f"NOT the defaults: settings overridden {results['meta']['env_overrides']}")
    print(table(results["rounds"]))
    return f"wrote {json_path}" if json_path else "smoke configuration: no results file (pass --json PATH)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    return run_main(PROG, lambda: run(args), input_errors=(SetupError,))


if __name__ == "__main__":
    sys.exit(main())
