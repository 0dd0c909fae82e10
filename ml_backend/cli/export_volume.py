"""Write a project's brush annotations back into a 3-D label volume of the original shape.

Tasks made by push_volume carry their patch provenance; each annotated one is decoded (brush RLE)
into a label map and placed where its patch came from. Rules:

- Label values: 0 = background (annotated, not brushed), i = the i-th <Label> of the project's
  BrushLabels control (label config order); within one annotation a later region wins.
- Which annotation of a task: ground truth first, else the most recently updated; cancelled
  (skipped) annotations count as not annotated.
- Overlapping patches (--overlap newest, default): the patch whose annotation was updated last wins
  where they overlap; --overlap max: the larger class index wins.
- Voxels no annotated patch covers get --unknown (default 255), and so do the pixels nobody painted
  in scribble mode (a Background label in the config); --coverage writes 1 where a patch
  was placed, 0 elsewhere.
- Output: DIR.zarr (chunked one slice thick across the patch axis) or FILE.tif (uncompressed).

The volume shape comes from the tasks (volume_shape), else --shape or --volume. A project holding
patches of several volumes or axes needs --volume-id / --axis.

Environment: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY (or --url, --api-key).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ml_backend.config import Settings
from sdk.annotations import AnnotationError, choose_annotation, label_map
from sdk.cli import prog_name, run_main
from sdk.label_config import UNLABELLED, LabelConfigError
from sdk.labelstudio import LabelStudioAPI
from sdk.tiling import AXES, open_volume, stitch_patches
from sdk.tiling.grid import axis_index
from sdk.tiling.output import output_format
from sdk.volume_tasks import patch_from_task

PROG = prog_name("export_volume.py")
INPUT_ERRORS = (ValueError, FileNotFoundError, IndexError, KeyError, LabelConfigError)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--out", type=Path, required=True, help="labels: DIR.zarr or FILE.tif[f]")
    p.add_argument(
        "--coverage", type=Path, help="also write the coverage mask (uint8 0/1): DIR.zarr or FILE.tif"
    )
    p.add_argument("--unknown", type=int, default=255, help="value of voxels no annotation covers [255]")
    p.add_argument("--overlap", choices=("newest", "max"), default="newest", help="overlap rule [newest]")
    p.add_argument("--volume-id", help="which volume, if the project holds patches of several")
    p.add_argument("--axis", choices=AXES, help="which patch axis, if the volume was cut across several")
    p.add_argument(
        "--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="volume shape, if tasks lack it"
    )
    p.add_argument("--volume", help="read the shape from this volume, if tasks lack it")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL", ""), help="[$LABEL_STUDIO_URL]")
    p.add_argument(
        "--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY", ""), help="[$LABEL_STUDIO_API_KEY]"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


class MappedTiff:
    """Uncompressed TIFF written plane by plane; each write maps the file afresh, so no map (and no
    resident page of it) outlives the write."""

    def __init__(self, path: Path, shape: tuple[int, int, int]) -> None:
        import tifffile

        self.path, self.shape, self.dtype = path, shape, np.dtype(np.uint8)
        mm = tifffile.memmap(
            path, shape=shape, dtype=np.uint8, photometric="minisblack", metadata={"axes": "ZYX"}
        )
        self.offset = int(mm.offset)
        del mm

    def __setitem__(self, key: Any, value: Any) -> None:
        mm = np.memmap(self.path, self.dtype, "r+", offset=self.offset, shape=self.shape)
        mm[key] = value
        mm.flush()
        del mm


class Discard:
    """A coverage sink when no coverage output was asked for."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape, self.dtype = shape, np.dtype(bool)

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def open_output(
    path: Path, shape: tuple[int, int, int], axis: str, fill: int, attrs: dict, overwrite: bool
) -> Any:
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it")
    if output_format(path) == "tiff":
        return MappedTiff(path, shape)  # stitch_patches writes every plane, unknown ones included
    import zarr

    a = axis_index(axis)
    chunks = tuple(1 if i == a else min(n, 1024) for i, n in enumerate(shape))
    arr = zarr.open_array(
        store=str(path), mode="w", shape=shape, chunks=chunks, dtype="uint8", fill_value=fill
    )
    arr.attrs.update({"emloop": attrs})
    return arr


def _time(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def collect(tasks: list[dict], args: argparse.Namespace) -> tuple[str, str, list[dict]]:
    """The volume id, axis and tasks to export; errors name the choices when there are several."""
    by_volume: dict[str, list[tuple[Any, dict]]] = defaultdict(list)
    for task in tasks:
        patch = patch_from_task(task.get("data"))
        if patch is not None:
            by_volume[patch.volume_id].append((patch, task))
    if not by_volume:
        raise ValueError(f"project {args.project} has no volume patch tasks (push them with push_volume.py)")
    if args.volume_id is None and len(by_volume) > 1:
        raise ValueError(
            f"project {args.project} holds several volumes, pick one with --volume-id: {sorted(by_volume)}"
        )
    volume_id = args.volume_id or next(iter(by_volume))
    if volume_id not in by_volume:
        raise ValueError(
            f"project {args.project} has no patches of {volume_id!r}; it has {sorted(by_volume)}"
        )
    axes = sorted({patch.axis for patch, _ in by_volume[volume_id]})
    if args.axis is None and len(axes) > 1:
        raise ValueError(f"{volume_id} was cut across several axes {axes}; pick one with --axis")
    axis = args.axis or axes[0]
    chosen = [task for patch, task in by_volume[volume_id] if patch.axis == axis]
    if not chosen:
        raise ValueError(f"project {args.project} has no {axis}-patches of {volume_id}; it has axes {axes}")
    return volume_id, axis, chosen


def volume_shape(tasks: list[dict], args: argparse.Namespace, volume_id: str) -> tuple[int, int, int]:
    if args.shape:
        return tuple(args.shape)  # type: ignore[return-value]
    if args.volume:
        with open_volume(args.volume) as volume:
            return volume.shape
    shapes = {tuple(t["data"]["volume_shape"]) for t in tasks if t["data"].get("volume_shape")}
    if len(shapes) > 1:
        raise ValueError(f"tasks of {volume_id} disagree on volume_shape {sorted(shapes)}; pass --shape")
    if shapes:
        return tuple(int(n) for n in shapes.pop())  # type: ignore[return-value]
    with open_volume(volume_id) as volume:  # the provenance id is an open_volume spec
        return volume.shape


def export(args: argparse.Namespace) -> str:
    for path in (args.out, args.coverage):
        if path is not None:
            output_format(path)
    if not 0 <= args.unknown <= 255:
        raise ValueError(f"--unknown must fit uint8 (0..255), got {args.unknown}")
    api = LabelStudioAPI.from_env(args.url, args.api_key)
    project = api.client().projects.get(id=args.project)
    target = Settings.from_env().brush_target(project.label_config)
    if args.unknown < target.n_classes:
        raise ValueError(f"--unknown {args.unknown} is a class index (classes 0..{target.n_classes - 1})")
    tasks = list(api.iter_tasks(args.project))
    volume_id, axis, chosen = collect(tasks, args)
    shape = volume_shape(chosen, args, volume_id)

    items, skipped = [], []
    for task in tqdm(chosen, unit="task", desc="decode", disable=args.no_progress):
        annotation = choose_annotation(task)
        if annotation is None:
            continue
        patch = patch_from_task(task["data"])
        try:
            labels = label_map(annotation, target, (patch.height, patch.width))
        except AnnotationError as exc:
            skipped.append(f"task {task['id']}: {exc}")
            continue
        labels[labels == UNLABELLED] = args.unknown  # scribble mode: painted by nobody, so unknown too
        order = (_time(annotation.get("updated_at")), int(annotation.get("id") or 0))
        items.append((patch, labels, order))
    for line in skipped:
        print(f"{PROG}: warning: skipped {line}", file=sys.stderr)

    attrs = {
        "project": args.project,
        "volume_id": volume_id,
        "axis": axis,
        "unknown": args.unknown,
        "classes": ["background", *target.labels],
        "overlap_rule": args.overlap,
    }
    out = open_output(args.out, shape, axis, args.unknown, attrs, args.overwrite)
    coverage = (
        Discard(shape)
        if args.coverage is None
        else open_output(args.coverage, shape, axis, 0, attrs, args.overwrite)
    )
    stitch_patches(
        shape,
        axis,
        items,
        unknown_value=args.unknown,
        rule="last" if args.overlap == "newest" else "max",
        order_key=lambda item: item[2],
        out=out,
        coverage_out=coverage,
        partial=target.scribbles,
    )
    return (
        f"project {args.project}: {len(items)} annotated patches of {len(chosen)} tasks placed into "
        f"{shape} {volume_id} ({len(skipped)} skipped) -> {args.out}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(PROG, lambda: export(args), input_errors=INPUT_ERRORS, url=args.url)
