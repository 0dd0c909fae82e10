"""Segment a whole volume with an emloop checkpoint, slice by slice, into Zarr (default) or TIFF.

Each slice across --axis is mapped to 8 bits with the volume's intensity window (as push_volume
renders patches) and predicted in overlapping, blended tiles (the backend's predict_image). The
output holds labels, uint8 (Z, Y, X): 0 = background, i = the i-th <Label> of the project's label
config; or, with --output probs, uint8 (C, Z, Y, X) class probabilities scaled by 255.

The slicing axis is cut into blocks of --chunk-slices slices, aligned to the output's chunks, so
writers never share a chunk. Blocks run in this process, or with --via-rq as jobs on RQ workers
(`python -m ml_backend.worker` on any machines that share the file system and Redis; CUDA is used
where a worker has it). A finished block leaves a marker in <out>.progress/: re-running the same
command after a crash or Ctrl-C computes only the missing blocks.

Post-processing (--stats/--instances): 3-D connected components per class, objects smaller than
--min-size voxels removed, a CSV of per-object statistics and an instance-id volume (uint32).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ml_backend.config import TILE, TILE_OVERLAP
from ml_backend.jobs.segmentation import enqueue_blocks, wait_for_jobs
from ml_backend.learner.checkpoints import (
    CheckpointError,
    ResolvedCheckpoint,
    checkpoint_from_file,
    newest_checkpoint,
)
from ml_backend.learner.network import default_device
from ml_backend.learner.volume_segmentation import (
    Progress,
    SegmentationPlan,
    cached_network,
    output_format,
    prepare_output,
    run_blocks,
)
from sdk.cli import prog_name, run_main
from sdk.label_config import LabelConfigError
from sdk.postprocess import connected_components, write_stats_csv
from sdk.tiling import AXES, estimate_intensity_range, open_volume, plane_shape

PROG = prog_name("segment_volume.py")
INPUT_ERRORS = (ValueError, FileNotFoundError, IndexError, KeyError, CheckpointError, LabelConfigError)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("volume", help="input volume: path[:/dataset] in any format sdk.tiling reads")
    p.add_argument("--out", required=True, type=Path, help="output: DIR.zarr (chunked) or FILE.tif[f]")
    model = p.add_argument_group("model (one of)")
    model.add_argument("--checkpoint", type=Path, help="a v<N>.pt checkpoint file")
    model.add_argument("--model-dir", type=Path, default=None, help="MODEL_DIR of the backend [$MODEL_DIR]")
    model.add_argument("--project", help="Label Studio project id: use its newest intact version")
    model.add_argument("--signature", help="label-config signature folder, when the project has several")
    p.add_argument("--axis", default="z", choices=AXES, help="slice across this axis [z]")
    p.add_argument("--output", default="labels", choices=("labels", "probs"), help="what to write [labels]")
    p.add_argument("--tile", type=int, default=TILE, help=f"network tile edge in pixels [{TILE}]")
    p.add_argument(
        "--overlap", type=int, default=TILE_OVERLAP, help=f"tile overlap, blended [{TILE_OVERLAP}]"
    )
    p.add_argument("--chunk-slices", type=int, default=8, help="slices per block = output chunk depth [8]")
    p.add_argument("--chunk-size", type=int, default=1024, help="in-plane Zarr chunk edge [1024]")
    p.add_argument(
        "--window", type=float, nargs=2, metavar=("LO", "HI"),
        help="intensity window mapped to 0..255 [estimated like push_volume: 0.5/99.5 percentiles]",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="discard an existing output and its progress")
    rq = p.add_argument_group("distributed (RQ)")
    rq.add_argument("--via-rq", action="store_true", help="run blocks as RQ jobs instead of in-process")
    rq.add_argument(
        "--workers-queue", metavar="QUEUE", help="RQ queue (implies --via-rq) [$RQ_QUEUE or emloop]"
    )
    rq.add_argument(
        "--redis-url", default=env.get("REDIS_URL", "redis://127.0.0.1:6379/0"), help="[$REDIS_URL or local]"
    )
    rq.add_argument("--job-timeout", type=int, default=3600, help="seconds one block may take [3600]")
    pp = p.add_argument_group("post-processing")
    pp.add_argument("--stats", type=Path, help="CSV of per-object statistics")
    pp.add_argument("--instances", type=Path, help="instance ids (uint32): DIR.zarr or FILE.tif")
    pp.add_argument("--min-size", type=int, default=1, help="drop objects with fewer voxels [1]")
    pp.add_argument("--connectivity", type=int, default=6, choices=(6, 18, 26), help="[6]")
    pp.add_argument("--classes", type=int, nargs="+", help="classes that form objects [all but 0]")
    pp.add_argument(
        "--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
        help="voxel size in nm for volumes in the CSV [from the file's metadata]",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (args.project is None):
        p.error("give either --checkpoint or --project (with --model-dir or $MODEL_DIR)")
    if args.workers_queue:
        args.via_rq = True
    args.queue = args.workers_queue or env.get("RQ_QUEUE", "emloop")
    args.model_dir = args.model_dir or Path(env.get("MODEL_DIR", "models"))
    for name in ("tile", "chunk_slices", "chunk_size", "min_size", "job_timeout"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.overlap < 0 or args.overlap >= args.tile:
        p.error("--overlap must be in 0..tile-1")
    return args


def resolve_checkpoint(args: argparse.Namespace) -> ResolvedCheckpoint:
    if args.checkpoint is not None:
        return checkpoint_from_file(args.checkpoint)
    return newest_checkpoint(args.model_dir, str(args.project), args.signature)


def make_plan(args: argparse.Namespace, volume: Any, ckpt: ResolvedCheckpoint) -> SegmentationPlan:
    plane_shape(volume.shape, args.axis)  # validates the axis against the shape
    if args.output == "labels" and ckpt.n_classes > 256:
        raise ValueError(f"{ckpt.n_classes} classes do not fit uint8 labels")
    window = tuple(args.window) if args.window else tuple(estimate_intensity_range(volume))
    return SegmentationPlan(
        volume=volume.id,
        shape=tuple(volume.shape),
        axis=args.axis,
        output=str(args.out.resolve()),
        format=output_format(args.out),
        kind=args.output,
        checkpoint=ckpt.path,
        checkpoint_sha256=ckpt.sha256,
        n_classes=ckpt.n_classes,
        class_names=("background", *ckpt.labels),
        window=(float(window[0]), float(window[1])),
        tile=args.tile,
        overlap=args.overlap,
        chunk_slices=args.chunk_slices,
        chunk_size=args.chunk_size,
    )


def segment_in_process(plan: SegmentationPlan, todo: list[tuple[int, int]], quiet: bool) -> None:
    device = default_device()
    net = cached_network(plan.checkpoint, plan.checkpoint_sha256, device)
    total = sum(stop - start for start, stop in todo)
    with tqdm(total=total, unit="slice", desc="segment", disable=quiet) as bar:
        run_blocks(plan, todo, net=net, device=device, on_slice=bar.update)


def segment_via_rq(plan: SegmentationPlan, todo: list[tuple[int, int]], args: argparse.Namespace) -> None:
    from redis import Redis
    from rq import Queue, Worker

    redis = Redis.from_url(args.redis_url)
    redis.ping()
    jobs = enqueue_blocks(plan, todo, redis, args.queue, job_timeout=args.job_timeout)
    queue = Queue(args.queue, connection=redis)

    def warn_idle() -> None:
        if not Worker.all(queue=queue):
            tqdm.write(
                f"{PROG}: no RQ worker listens on queue {args.queue!r}: start `RQ_QUEUE={args.queue} "
                "python -m ml_backend.worker` (Ctrl-C here leaves the jobs queued)",
                file=sys.stderr,
            )

    with tqdm(total=len(jobs), unit="block", desc=f"rq:{args.queue}", disable=args.no_progress) as bar:
        wait_for_jobs(plan, jobs, on_done=lambda n: bar.update(n - bar.n), on_idle=warn_idle)


def _read_labels(plan: SegmentationPlan):
    """read_block(z0, z1) over the finished output; probabilities become their argmax."""

    def read(z0: int, z1: int) -> np.ndarray:
        if plan.format == "zarr":
            import zarr

            arr = zarr.open_array(store=plan.output, mode="r")
            data = arr[z0:z1] if plan.kind == "labels" else arr[:, z0:z1]
        else:
            mm = np.memmap(plan.output, np.uint8, "r", offset=plan.tiff_offset, shape=plan.out_shape)
            data = np.array(mm[z0:z1] if plan.kind == "labels" else mm[:, z0:z1])
            del mm
        return data if plan.kind == "labels" else data.argmax(axis=0).astype(np.uint8)

    return read


def _instance_writer(path: Path, shape: tuple[int, int, int], block: int):
    """write(z0, z1, ids) into DIR.zarr or an uncompressed FILE.tif (mapped per block)."""
    fmt = output_format(path)
    if fmt == "zarr":
        import zarr

        chunks = (min(block, shape[0]), min(shape[1], 1024), min(shape[2], 1024))
        arr = zarr.open_array(
            store=str(path), mode="w", shape=shape, chunks=chunks, dtype="uint32", fill_value=0
        )

        def write_zarr(z0: int, z1: int, ids: np.ndarray) -> None:
            arr[z0:z1] = ids

        return write_zarr
    import tifffile

    mm = tifffile.memmap(
        path, shape=shape, dtype=np.uint32, photometric="minisblack", metadata={"axes": "ZYX"}
    )
    offset = int(mm.offset)
    del mm

    def write_tiff(z0: int, z1: int, ids: np.ndarray) -> None:
        out = np.memmap(path, np.uint32, "r+", offset=offset, shape=shape)
        out[z0:z1] = ids
        out.flush()
        del out

    return write_tiff


def postprocess(plan: SegmentationPlan, args: argparse.Namespace, voxel_size: Any) -> str:
    block = 16
    write = _instance_writer(args.instances, plan.shape, block) if args.instances else None
    result = connected_components(
        _read_labels(plan),
        plan.shape,
        classes=args.classes,
        connectivity=args.connectivity,
        min_size=args.min_size,
        block=block,
        write=write,
    )
    size = tuple(args.voxel_size) if args.voxel_size else None
    if size is None and voxel_size is not None:
        size = (voxel_size.z, voxel_size.y, voxel_size.x)
    if args.stats:
        write_stats_csv(args.stats, result.objects, size, plan.class_names)
    where = ", ".join(str(p) for p in (args.stats, args.instances) if p)
    return f"{len(result.objects)} objects ({result.removed} below {args.min_size} voxels removed) -> {where}"


def run(args: argparse.Namespace) -> None:
    out_format = output_format(args.out)
    if args.instances is not None:
        output_format(args.instances)  # fail before hours of segmentation, not after
    ckpt = resolve_checkpoint(args)
    with open_volume(args.volume) as volume:
        plan = make_plan(args, volume, ckpt)
        voxel_size = volume.voxel_size
    plan = prepare_output(plan, overwrite=args.overwrite)
    done = Progress(plan.progress_dir).done()
    blocks = plan.blocks()
    todo = [b for b in blocks if b not in done]
    print(
        f"{PROG}: {plan.volume} {plan.shape} across {plan.axis} with {ckpt.version} -> {plan.output} "
        f"({out_format}, {plan.kind}); {len(blocks)} blocks: {len(blocks) - len(todo)} already done, "
        f"{len(todo)} to compute{' on RQ' if args.via_rq and todo else ''}",
        file=sys.stderr,
    )
    if todo:
        if args.via_rq:
            segment_via_rq(plan, todo, args)
        else:
            segment_in_process(plan, todo, args.no_progress)
    missing = [b for b in blocks if b not in Progress(plan.progress_dir).done()]
    if missing:
        raise RuntimeError(f"{len(missing)} blocks have no marker after the run, e.g. slices {missing[0]}")
    print(f"{PROG}: computed {len(todo)} blocks; output complete: {plan.output}", file=sys.stderr)
    if args.stats or args.instances:
        print(f"{PROG}: {postprocess(plan, args, voxel_size)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(
        PROG,
        lambda: run(args),
        input_errors=INPUT_ERRORS,
        interrupted="interrupted; finished blocks are kept, run the same command to resume",
    )
