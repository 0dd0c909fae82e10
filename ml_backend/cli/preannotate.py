"""Pre-annotate a whole Label Studio project on emloop's workers, without any timeout.

Asks the project's ML backend (POST /preannotate/<project>) to queue every unlabelled task that
has no prediction of the version it serves, in chunks of PREANNOTATE_CHUNK tasks, as RQ jobs
for `python -m ml_backend.worker` (a GPU worker predicts on the GPU); each job posts its
predictions through Label Studio's API. Then follows the progress (GET /status/<project>) with
a progress bar until every job has ended.

Safe to re-run: tasks that already have a prediction of that version are skipped, so a second
run adds nothing, and a run stopped half-way (Ctrl-C here does not stop the workers, a killed
worker loses its chunk) is resumed by running it again.

The backend is the one connected to the project in Label Studio (LABEL_STUDIO_URL and
LABEL_STUDIO_API_KEY), or --backend; BASIC_AUTH_USER / BASIC_AUTH_PASS are sent when set.

Exit status: 0 every task has a prediction, 1 some tasks or jobs failed (listed; re-run to
retry) or a server failed, 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from sdk.backend_api import BackendAPI
from sdk.cli import prog_name, run_main
from sdk.labelstudio import LabelStudioAPI

PROG = prog_name("preannotate")


class UsageError(Exception):
    """Bad arguments or environment: exit status 2."""


class Failed(Exception):
    """Some tasks or jobs failed: exit status 1."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Example: scripts/preannotate.py --project 3",
    )
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument(
        "--backend", help="the ML backend's URL (default: the one connected to the project in Label Studio)"
    )
    parser.add_argument("--all", action="store_true", help="labelled tasks too (default: unlabelled only)")
    parser.add_argument("--no-wait", action="store_true", help="queue the jobs and exit")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between progress checks (1)")
    parser.add_argument("--json", action="store_true", help="print the final status as JSON on stdout")
    return parser.parse_args(argv)


def connected_backend(project: int) -> str:
    api = LabelStudioAPI.from_env()
    backends = api.request("GET", "/api/ml", params={"project": project}).json()
    if not backends:
        raise UsageError(f"project {project} has no ML backend connected in Label Studio; pass --backend")
    return str(backends[0]["url"]).rstrip("/")


def run(args: argparse.Namespace) -> str:
    if args.poll <= 0:
        raise UsageError("--poll must be positive")
    backend = BackendAPI(args.backend or connected_backend(args.project))
    queued = backend.preannotate(args.project, include_labeled=args.all)
    message = (
        f"project {args.project}: {queued['queued_tasks']} task(s) queued in {queued['jobs']} job(s)"
        f" with {queued['version']}; {queued['already']} already had a prediction of it"
    )
    if queued["unusable"]:
        message += f"; {len(queued['unusable'])} task(s) have no image: {queued['unusable'][:10]}"
    print(f"{PROG}: {message}", file=sys.stderr)
    if args.no_wait or not queued["jobs"]:
        return "nothing to wait for" if not queued["jobs"] else "queued; follow it in /status"
    status = backend.follow_preannotation(args.project, poll=args.poll)
    if args.json:
        print(json.dumps(status, indent=1))
    failed_jobs = status.get("jobs", {}).get("failed", 0)
    if status.get("failed") or failed_jobs:
        shown = "; ".join(f"task {t}: {why}" for t, why in list(status.get("failures", {}).items())[:5])
        raise Failed(
            f"{status.get('failed', 0)} task(s) and {failed_jobs} job(s) failed"
            f" ({shown or 'see the worker log'}); re-run to retry them"
        )
    done = f"{status['predicted']} task(s) pre-annotated with {status['version']}"
    return f"{done}, {status['skipped']} already had a prediction"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    url = os.environ.get("LABEL_STUDIO_URL", "http://localhost:8080")
    return run_main(PROG, lambda: run(args), input_errors=(UsageError,), url=url)
