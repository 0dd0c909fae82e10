"""Cut a 3-D volume into 2-D patches and create a Label Studio task per patch.

Patches follow sdk.tiling's grid (--axis, --patch-size, --stride, --slice-step or --slices; the
last row/column ends at the border); --subset random:N|strided:N takes a first pool from that
grid (the same arguments and --seed always give the same patches). Each patch is rendered as an
8-bit PNG with one intensity window per volume (--window, else the one this project's tasks of the
volume already use, else 0.5/99.5 percentiles of sampled slices) and reaches Label Studio either

  --mode upload       through the import API (files kept by Label Studio), or
  --mode local-files  written under --document-root (Label Studio's LOCAL_FILES_DOCUMENT_ROOT);
                      the project gets a local-files storage for that folder (reused if present;
                      never sync it: the tasks already exist).

Task data: the image reference under the label config's <Image value="$..."> field, the patch
provenance (volume_id, axis, slice_index, y, x, height, width), volume_shape, the intensity window
and patch_key. Idempotent: a patch whose provenance (volume id + axis, slice, offsets, size) is
already a task of the project is skipped, so re-running never duplicates tasks. Don't run two
pushes to one project at the same time.

Environment: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY (or --url, --api-key).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from tqdm import tqdm

from ml_backend.config import Settings
from sdk.atomic import atomic_write_bytes
from sdk.cli import prog_name, run_main
from sdk.label_config import BrushTarget, LabelConfigError
from sdk.labelstudio import (
    LabelStudioAPI,
    LabelStudioError,
)
from sdk.tiling import AXES, Patch, estimate_intensity_range, open_volume
from sdk.volume_tasks import (
    existing_patches,
    parse_subset,
    patch_key,
    render_png,
    select_patches,
    task_data,
)

PROG = prog_name("push_volume.py")
COLOURS = ("#ff0000", "#00c000", "#0060ff", "#ffa000", "#c000ff", "#00c0c0", "#ff60a0", "#808000")
INPUT_ERRORS = (ValueError, FileNotFoundError, IndexError, KeyError, LabelConfigError)


def default_label_config(labels: Sequence[str]) -> str:
    """One <Image value="$image"> and a <BrushLabels> with ``labels`` (class i + 1 = labels[i])."""
    items = "".join(
        f"<Label value={quoteattr(name)} background={quoteattr(COLOURS[i % len(COLOURS)])}/>"
        for i, name in enumerate(labels)
    )
    return (
        '<View><Image name="image" value="$image" zoom="true"/>'
        f'<BrushLabels name="tag" toName="image">{items}</BrushLabels></View>'
    )


def _size(values: list[int] | None, name: str) -> int | tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise ValueError(f"{name} takes one size or two (rows cols), got {values}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("volume", help="path[:/dataset] in any format sdk.tiling reads")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--project", type=int, help="existing project id")
    where.add_argument(
        "--create", metavar="TITLE", help="use the project with this title, creating it if needed"
    )
    p.add_argument(
        "--labels", nargs="+", default=["Foreground"], help="<Label>s of a created project [Foreground]"
    )
    p.add_argument("--label-config", type=Path, help="XML label config file for a created project")
    p.add_argument("--mode", choices=("upload", "local-files"), default="upload", help="[upload]")
    p.add_argument(
        "--document-root", type=Path, help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT (local-files)"
    )
    p.add_argument(
        "--subdir", help="folder under --document-root for the PNGs [emloop-volumes/<volume>-<hash>]"
    )
    p.add_argument("--axis", choices=AXES, default="z", help="slice across this axis [z]")
    p.add_argument(
        "--patch-size", type=int, nargs="+", default=[256], metavar="N", help="N or ROWS COLS [256]"
    )
    p.add_argument(
        "--stride", type=int, nargs="+", metavar="N", help="N or ROWS COLS [patch size: no overlap]"
    )
    p.add_argument("--slice-step", type=int, default=1, help="every k-th slice [1]")
    p.add_argument("--slices", type=int, nargs="+", metavar="I", help="these slice indices instead")
    p.add_argument("--subset", help="random:N or strided:N patches of the grid [all]")
    p.add_argument("--seed", type=int, default=0, help="seed of --subset random [0]")
    p.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"), help="intensity window for 0..255")
    p.add_argument("--batch", type=int, default=50, help="patches per import request [50]")
    p.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL", ""), help="[$LABEL_STUDIO_URL]")
    p.add_argument(
        "--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY", ""), help="[$LABEL_STUDIO_API_KEY]"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.mode == "local-files" and args.document_root is None:
        p.error("--mode local-files needs --document-root (Label Studio's LOCAL_FILES_DOCUMENT_ROOT)")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.slices is not None and args.slice_step != 1:
        p.error("give either --slices or --slice-step")
    return args


# -- Label Studio side ---------------------------------------------------------------------------------
def get_project(api: LabelStudioAPI, args: argparse.Namespace) -> Any:
    client = api.client()
    if args.project is not None:
        return client.projects.get(id=args.project)
    for project in client.projects.list(page_size=100):
        if project.title == args.create:
            return project
    config = args.label_config.read_text() if args.label_config else default_label_config(args.labels)
    Settings.from_env().brush_target(
        config
    )  # refuse a config the backend could not use, before creating anything
    return client.projects.create(title=args.create, label_config=config)


def project_tasks(api: LabelStudioAPI, project_id: int) -> list[dict[str, Any]]:
    """Every task's data (no annotations: they are not needed to know what exists)."""
    pager = api.client().tasks.list(project=project_id, fields="task_only", page_size=500)
    return [dict(task.data or {}) for task in pager]


def upload_pngs(api: LabelStudioAPI, project_id: int, pngs: dict[str, bytes]) -> dict[str, str]:
    """Upload files without creating tasks; returns {name: /data/upload/... URL}."""
    files = {f"file{i}": (name, data, "image/png") for i, (name, data) in enumerate(pngs.items())}
    resp = api.request(
        "POST", f"/api/projects/{project_id}/import", params={"commit_to_project": "false"}, files=files
    )
    ids = resp.json().get("file_upload_ids") or []
    listed = api.request(
        "GET", f"/api/projects/{project_id}/file-uploads", params={"ids": json.dumps(ids)}
    ).json()
    # Label Studio stores "upload/<project>/<8 hex>-<name>" and serves it under /data/.
    urls = {Path(u["file"]).name.split("-", 1)[-1]: "/data/" + u["file"] for u in listed}
    missing = sorted(set(pngs) - set(urls))
    if missing:
        raise LabelStudioError(f"Label Studio did not keep uploaded files {missing[:3]}")
    return urls


def ensure_local_storage(api: LabelStudioAPI, project_id: int, folder: Path) -> None:
    """A local-files storage covering ``folder``, which Label Studio requires to serve its files."""
    storages = api.client().import_storage.local
    for storage in storages.list(project=project_id):
        path = Path(storage.path or "/nonexistent")
        if folder == path or path in folder.parents:
            return
    storages.create(
        project=project_id,
        path=str(folder),
        title=f"emloop {folder.name}",
        use_blob_urls=True,
        regex_filter="^$",  # matches no file: a sync by mistake creates no duplicate tasks
    )


# -- the push ----------------------------------------------------------------------------------------------
def local_folder(args: argparse.Namespace, volume_id: str) -> tuple[Path, Path]:
    root = args.document_root.resolve()
    if args.subdir:
        sub = args.subdir
    else:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(volume_id.split(":/")[0]).name) or "volume"
        sub = f"emloop-volumes/{stem}-{hashlib.sha256(volume_id.encode()).hexdigest()[:8]}"
    folder = (root / sub).resolve()
    if root not in folder.parents:
        raise ValueError(f"--subdir {sub!r} must be a folder below --document-root {root}")
    return root, folder


def intensity_fields(
    args: argparse.Namespace, volume: Any, recorded: dict[str, Any] | None
) -> dict[str, Any]:
    if args.window:
        lo, hi = args.window
        return {"intensity_lo": lo, "intensity_hi": hi}
    if recorded is not None:
        return recorded
    return estimate_intensity_range(volume).to_dict()


def push(args: argparse.Namespace) -> str:
    subset = parse_subset(args.subset)
    with open_volume(args.volume) as volume:
        patches = select_patches(
            volume.shape,
            args.axis,
            _size(args.patch_size, "--patch-size"),
            _size(args.stride, "--stride"),
            args.slice_step,
            args.slices,
            volume_id=volume.id,
            subset=subset,
            seed=args.seed,
        )
        if args.mode == "local-files":
            root, folder = local_folder(args, volume.id)
        api = LabelStudioAPI.from_env(args.url, args.api_key)
        project = get_project(api, args)
        target: BrushTarget = Settings.from_env().brush_target(project.label_config)
        existing, windows = existing_patches(project_tasks(api, project.id))
        todo: list[Patch] = list(dict.fromkeys(p for p in patches if p not in existing))  # --slices 3 3
        intensity = intensity_fields(args, volume, windows.get(volume.id))
        window = (intensity["intensity_lo"], intensity["intensity_hi"])
        if todo and args.mode == "local-files":
            folder.mkdir(parents=True, exist_ok=True)
            ensure_local_storage(api, project.id, folder)
        created = 0
        with tqdm(total=len(todo), unit="patch", desc=f"push {args.mode}", disable=args.no_progress) as bar:
            for start in range(0, len(todo), args.batch):
                batch = todo[start : start + args.batch]
                pngs = {f"{patch_key(p)}.png": render_png(volume, p, window) for p in batch}
                if args.mode == "upload":
                    refs = upload_pngs(api, project.id, pngs)
                else:
                    refs = {}
                    for name, data in pngs.items():
                        atomic_write_bytes(folder / name, data)
                        refs[name] = "/data/local-files/?d=" + quote(
                            (folder / name).relative_to(root).as_posix()
                        )
                tasks = [
                    {
                        "data": task_data(
                            p, refs[f"{patch_key(p)}.png"], target.value_key, volume.shape, intensity
                        )
                    }
                    for p in batch
                ]
                created += len(api.import_tasks(project.id, tasks))
                bar.update(len(batch))
    return (
        f"project {project.id} ({project.title!r}): {len(patches)} patches selected, "
        f"{len(patches) - len(todo)} already there, {created} tasks created "
        f"(window {window[0]:g}..{window[1]:g})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(
        PROG,
        lambda: push(args),
        input_errors=INPUT_ERRORS,
        interrupted="interrupted; tasks created so far are kept, re-run to push the rest",
        url=args.url,
    )
