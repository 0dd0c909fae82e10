"""Segment a whole volume slice by slice, in chunk jobs that run in-process or on RQ workers.

Blocks: the slicing axis is cut into blocks of ``chunk_slices`` slices, the output's chunk depth
along that axis, so every output chunk belongs to exactly one block and concurrent jobs never
write the same chunk (TIFF output: disjoint bytes of one uncompressed file).

Resume: once a block's data is written, its marker ``<out>.progress/done/<start>-<stop>.json`` is
created atomically; a block with a marker is never computed again. ``<out>.progress/plan.json``
records the settings the output was started with, and a run with other settings is refused, so a
resumed output never mixes two checkpoints or intensity windows.

Memory per job, whatever the number of slices: one input slice, ``predict_image``'s C x H x W
float32 probabilities of one slice, and the block's uint8 output (chunk_slices x C x H x W; two
blocks when `run_blocks` writes one while segmenting the next). Input and output are opened per
block and closed after it, so no memory map outlives a block.

Each slice is mapped to 8 bits with the volume's intensity window (``to_uint8``) before the
network sees it, exactly as ``scripts/push_volume.py`` renders the patches that annotators label
and the network is trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ml_backend.config import TILE, TILE_OVERLAP
from ml_backend.learner.checkpoints import load_checkpoint
from ml_backend.learner.inference import predict_image
from ml_backend.learner.network import UNet, default_device, fuse_for_inference
from sdk.atomic import atomic_write_bytes
from sdk.prefetch import prefetch
from sdk.tiling import open_volume, plane_shape, to_uint8
from sdk.tiling.grid import axis_index
from sdk.tiling.output import Format, output_format  # noqa: F401 - re-exported for the script

Kind = Literal["labels", "probs"]
PROGRESS_SUFFIX = ".progress"
JOB_PREFIX = "emloop-seg"


class PlanMismatch(ValueError):
    """The output exists but was started with other settings."""


@dataclass(frozen=True)
class SegmentationPlan:
    """Everything a chunk job needs; JSON-able so RQ workers on other machines can run it."""

    volume: str  # open_volume spec (Volume.id)
    shape: tuple[int, int, int]
    axis: str
    output: str
    format: Format
    kind: Kind
    checkpoint: str
    checkpoint_sha256: str
    n_classes: int
    class_names: tuple[str, ...]
    window: tuple[float, float]
    tile: int = TILE
    overlap: int = TILE_OVERLAP
    chunk_slices: int = 8
    chunk_size: int = 1024  # in-plane chunk edge of Zarr output
    tiff_offset: int | None = None  # where a TIFF output's pixels start; known once it exists

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentationPlan:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("shape", "class_names", "window"):
            values[key] = tuple(values[key])
        return cls(**values)

    def fingerprint(self) -> str:
        """Hash of the settings that decide the output's values and layout."""
        settings = {k: v for k, v in self.to_dict().items() if k != "tiff_offset"}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    @property
    def n_slices(self) -> int:
        return self.shape[axis_index(self.axis)]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape if self.kind == "labels" else (self.n_classes, *self.shape)

    @property
    def out_chunks(self) -> tuple[int, ...]:
        a = axis_index(self.axis)
        chunks = tuple(
            self.chunk_slices if i == a else min(n, self.chunk_size) for i, n in enumerate(self.shape)
        )
        return chunks if self.kind == "labels" else (1, *chunks)

    @property
    def progress_dir(self) -> Path:
        return Path(self.output + PROGRESS_SUFFIX)

    def blocks(self) -> list[tuple[int, int]]:
        return block_ranges(self.n_slices, self.chunk_slices)

    def job_id(self, start: int) -> str:
        return f"{JOB_PREFIX}-{self.fingerprint()[:16]}-{start:07d}"


# -- pure helpers ---------------------------------------------------------------------------------
def block_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of ``size`` slices (the last may be shorter) covering 0..n."""
    if size < 1:
        raise ValueError(f"chunk_slices must be >= 1, got {size}")
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def quantize_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] to uint8 (p * 255, rounded); 1/255 resolution is ample for display/QC."""
    return np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)


def probs_to_labels(probs: np.ndarray) -> np.ndarray:
    """Most probable class per pixel (C, H, W) -> (H, W) uint8."""
    return probs.argmax(axis=0).astype(np.uint8)


def plane_index(axis: str, i: int) -> tuple[int | slice, ...]:
    a = axis_index(axis)
    return tuple(i if k == a else slice(None) for k in range(3))


def block_region(plan: SegmentationPlan, start: int, stop: int) -> tuple[slice, ...]:
    a = axis_index(plan.axis)
    region = tuple(slice(start, stop) if k == a else slice(None) for k in range(3))
    return region if plan.kind == "labels" else (slice(None), *region)


def to_volume_order(block: np.ndarray, plan: SegmentationPlan) -> np.ndarray:
    """A block stacked slice-first ((C,) d, rows, cols) in the output's (C,) Z, Y, X order."""
    lead = 0 if plan.kind == "labels" else 1
    return np.moveaxis(block, lead, lead + axis_index(plan.axis))


# -- checkpoints ----------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_NETS: dict[tuple[str, str, str], UNet] = {}


def cached_network(path: str, sha256: str, device: torch.device) -> UNet:
    """The checkpoint's network ready for inference (BatchNorm folded into the convolutions, on
    ``device``), cached per process: a worker loads it once for all the blocks of a run, and the
    in-process path uses the very same network as the workers."""
    key = (path, sha256, str(device))
    if key not in _NETS:
        _NETS.clear()  # one run at a time per worker; don't pile up networks
        net, _ = load_checkpoint(path, sha256)
        _NETS[key] = fuse_for_inference(net).to(device)
    return _NETS[key]


# -- output and progress --------------------------------------------------------------------------
class Progress:
    """The ``<out>.progress`` folder: ``plan.json`` and one ``done/<start>-<stop>.json`` per block."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done_dir = root / "done"

    def marker(self, start: int, stop: int) -> Path:
        return self.done_dir / f"{start:07d}-{stop:07d}.json"

    def is_done(self, start: int, stop: int) -> bool:
        return self.marker(start, stop).exists()

    def done(self) -> set[tuple[int, int]]:
        if not self.done_dir.is_dir():
            return set()
        found = set()
        for p in self.done_dir.glob("*.json"):
            start, _, stop = p.stem.partition("-")
            if start.isdigit() and stop.isdigit():
                found.add((int(start), int(stop)))
        return found

    def mark(self, start: int, stop: int, info: dict[str, Any]) -> None:
        atomic_write_bytes(self.marker(start, stop), json.dumps(info).encode())

    def read_plan(self) -> SegmentationPlan | None:
        try:
            return SegmentationPlan.from_dict(json.loads((self.root / "plan.json").read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{self.root / 'plan.json'} is unreadable ({exc}); pass --overwrite") from None

    def write_plan(self, plan: SegmentationPlan) -> None:
        atomic_write_bytes(self.root / "plan.json", json.dumps(plan.to_dict(), indent=1).encode())


def _create_output(plan: SegmentationPlan) -> SegmentationPlan:
    attrs = {
        "emloop": {
            "kind": plan.kind,
            "axes": "zyx" if plan.kind == "labels" else "czyx",
            "class_names": list(plan.class_names),
            "volume": plan.volume,
            "slicing_axis": plan.axis,
            "checkpoint": plan.checkpoint,
            "checkpoint_sha256": plan.checkpoint_sha256,
            "intensity_window": list(plan.window),
            "probability_scale": None if plan.kind == "labels" else 255,
        }
    }
    if plan.format == "zarr":
        import zarr

        arr = zarr.open_array(
            store=plan.output, mode="w", shape=plan.out_shape, chunks=plan.out_chunks, dtype="uint8",
            fill_value=0,
        )  # fmt: skip
        arr.attrs.update(attrs)
        return plan
    import tifffile

    Path(plan.output).parent.mkdir(parents=True, exist_ok=True)
    axes = "ZYX" if plan.kind == "labels" else "CZYX"
    mm = tifffile.memmap(
        plan.output, shape=plan.out_shape, dtype=np.uint8, photometric="minisblack", metadata={"axes": axes}
    )
    offset = int(mm.offset)
    del mm
    return replace(plan, tiff_offset=offset)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def prepare_output(plan: SegmentationPlan, *, overwrite: bool = False) -> SegmentationPlan:
    """Create the output, or check that an existing one was started with the same settings.

    Returns the plan to hand to the jobs (for TIFF with the pixel offset filled in).
    """
    out, progress = Path(plan.output), Progress(plan.progress_dir)
    stored = None if overwrite else progress.read_plan()
    if stored is not None:
        if stored.fingerprint() != plan.fingerprint():
            differ = [k for k, v in plan.to_dict().items() if k != "tiff_offset" and stored.to_dict()[k] != v]
            raise PlanMismatch(
                f"{out} was started with other settings ({', '.join(differ)} differ); "
                "pass --overwrite to start over, or choose another --out"
            )
        if out.exists():
            return stored
        _remove(progress.root)  # the output is gone, and with it what the markers vouched for
    elif out.exists() or progress.root.exists():
        if not overwrite:
            raise PlanMismatch(f"{out} already exists and was not started by this tool; pass --overwrite")
        _remove(out)
        _remove(progress.root)
    plan = _create_output(plan)
    progress.write_plan(plan)  # last: a plan on disk means its output exists
    return plan


def _write_block(plan: SegmentationPlan, start: int, stop: int, data: np.ndarray) -> None:
    region = block_region(plan, start, stop)
    if plan.format == "zarr":
        import zarr

        zarr.open_array(store=plan.output, mode="r+")[region] = data
        return
    if plan.tiff_offset is None:
        raise ValueError("TIFF plan lacks the pixel offset; use prepare_output()")
    mm = np.memmap(plan.output, dtype=np.uint8, mode="r+", offset=plan.tiff_offset, shape=plan.out_shape)
    try:
        mm[region] = data
        mm.flush()
    finally:
        del mm


# -- the work ---------------------------------------------------------------------------------------
def segment_plane(
    net: UNet,
    plane: np.ndarray,
    window: Sequence[float],
    kind: Kind,
    *,
    tile: int,
    overlap: int,
    device: torch.device | None = None,
) -> np.ndarray:
    """One slice: (rows, cols) labels or (C, rows, cols) quantised probabilities, uint8."""
    image = to_uint8(plane, float(window[0]), float(window[1]))
    probs = predict_image(net, image, tile=tile, overlap=overlap, device=device).probs
    return probs_to_labels(probs) if kind == "labels" else quantize_probs(probs)


def _segment_block(
    plan: SegmentationPlan,
    start: int,
    stop: int,
    net: UNet,
    device: torch.device,
    on_slice: Callable[[], None] | None,
) -> np.ndarray:
    """Slices [start, stop) segmented, in the output's axis order."""
    rows, cols = plane_shape(plan.shape, plan.axis)
    depth = stop - start
    shape = (depth, rows, cols) if plan.kind == "labels" else (plan.n_classes, depth, rows, cols)
    block = np.empty(shape, np.uint8)
    with open_volume(plan.volume) as volume:
        if tuple(volume.shape) != tuple(plan.shape):
            raise ValueError(f"{plan.volume} now has shape {volume.shape}, planned for {plan.shape}")
        # The next slice is read and decompressed while the network works on this one.
        planes = prefetch(np.asarray(volume[plane_index(plan.axis, i)]) for i in range(start, stop))
        for k, plane in enumerate(planes):
            out = segment_plane(
                net, plane, plan.window, plan.kind, tile=plan.tile, overlap=plan.overlap, device=device
            )
            if plan.kind == "labels":
                block[k] = out
            else:
                block[:, k] = out
            if on_slice is not None:
                on_slice()
    return to_volume_order(block, plan)


def _finish_block(
    plan: SegmentationPlan, start: int, stop: int, data: np.ndarray, began: float, device: torch.device
) -> dict[str, Any]:
    """Write the block, then mark it done: a block marked done is always fully written."""
    _write_block(plan, start, stop, data)
    info = {
        "start": start,
        "stop": stop,
        "seconds": round(time.time() - began, 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
        "finished_at": time.time(),
    }
    Progress(plan.progress_dir).mark(start, stop, info)
    return info


def run_block(
    plan: SegmentationPlan,
    start: int,
    stop: int,
    *,
    net: UNet | None = None,
    device: torch.device | None = None,
    on_slice: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Segment slices [start, stop), write them, then mark the block done; a done block is skipped."""
    return run_blocks(plan, [(start, stop)], net=net, device=device, on_slice=on_slice)[0]


def run_blocks(
    plan: SegmentationPlan,
    blocks: Sequence[tuple[int, int]],
    *,
    net: UNet | None = None,
    device: torch.device | None = None,
    on_slice: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """`run_block` for each block in turn, each block written in a thread while the next is segmented
    (at most two blocks in memory); a write's failure stops the run before the following block."""
    device = device or default_device()
    progress = Progress(plan.progress_dir)
    infos: list[dict[str, Any]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="write-behind") as writer:
        writing: Future | None = None
        for start, stop in blocks:
            if progress.is_done(start, stop):
                infos.append({"start": start, "stop": stop, "skipped": True})
                continue
            began = time.time()
            if net is None:
                net = cached_network(plan.checkpoint, plan.checkpoint_sha256, device)
            data = _segment_block(plan, start, stop, net, device, on_slice)
            if writing is not None:
                infos.append(writing.result())
            writing = writer.submit(_finish_block, plan, start, stop, data, began, device)
        if writing is not None:
            infos.append(writing.result())
    return sorted(infos, key=lambda info: info["start"])
