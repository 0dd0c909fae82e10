"""Benchmark whole-volume tiling and segmentation: throughput and peak memory against volume size.

For each size (default 0.5 and 2 GiB of uint8, 1024 x 1024 slices) a synthetic EM-like volume is
written slice by slice to an *uncompressed* Zarr array (chunks 1 x 512 x 512), so its size on disk
is the stated size. Two measurements run on it, each in a fresh child process whose peak resident
memory (VmHWM: the most RAM the process ever held, setup included) is reported:

- tile: every 256 x 256 patch of every z-slice (the grid push_volume uses) is read, mapped to 8 bits
  with the volume's window and PNG-encoded: all of push_volume except talking to Label Studio.
- segment: scripts/segment_volume.py's code path (``prepare_output`` creates the full-size Zarr
  output, ``run_block`` segments blocks of 8 slices, one 1024 x 1024 tile per slice) with the
  default network (``UNetConfig()``, untrained: speed does not depend on the weights; BatchNorm
  folded, as the script runs it). On a shared 2-core CPU that is 1.5-4 s per slice, so only
  --segment-slices slices (default 64, in blocks spread evenly over the whole volume; 0 = every
  slice) are segmented; the throughput is for those.

    .venv/bin/python -m benchmarks.bench_volume [--sizes-gb 0.5 2] [--segment-slices 64] [--json PATH]

Peak memory must not grow with the volume: both phases hold one slice/patch/block at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "volume.json"
PLANE = 1024
PATCH = 256
CHUNK_SLICES = 8
LIMIT_MB = 1024


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Resident memory of this process now."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Most resident memory this process held since it started (or since ``reset_peak``).

    VmHWM rather than ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec,
    so a child would report the benchmark driver's own peak.
    """
    return _status_mb("VmHWM")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


# -- data ----------------------------------------------------------------------------------------------
def make_volume(path: Path, n_slices: int, plane: int = PLANE) -> None:
    """uint8 (n, plane, plane) uncompressed Zarr written slice by slice: 8 synthetic sections,
    shifted per slice."""
    import zarr

    from sdk.synthetic import synthetic_em

    bases = [synthetic_em(plane, plane, seed=s)[0] for s in range(8)]
    layout = {"shape": (n_slices, plane, plane), "chunks": (1, 512, 512), "dtype": "uint8", "fill_value": 0}
    if hasattr(zarr, "create_array"):  # zarr 3
        arr = zarr.create_array(store=str(path), compressors=None, overwrite=True, **layout)
    else:
        arr = zarr.open_array(store=str(path), mode="w", compressor=None, **layout)
    for z in range(n_slices):
        arr[z] = np.roll(bases[z % 8], (7 * z, 13 * z), axis=(0, 1))


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- child processes --------------------------------------------------------------------------------------
def child_tile(volume_path: str) -> dict:
    from sdk.tiling import estimate_intensity_range, open_volume
    from sdk.volume_tasks import render_png, select_patches

    with open_volume(volume_path) as volume:
        window = tuple(estimate_intensity_range(volume))
        patches = select_patches(volume.shape, "z", PATCH, volume_id=volume.id)
        baseline, setup_peak = rss_mb(), peak_rss_mb()
        reset_peak()
        t0 = time.perf_counter()
        png_bytes = sum(len(render_png(volume, p, window)) for p in patches)
        seconds = time.perf_counter() - t0
        loop_peak = peak_rss_mb()
    voxels = len(patches) * PATCH * PATCH
    return {
        "patches": len(patches),
        "png_mb": round(png_bytes / 2**20, 1),
        "voxels": voxels,
        "seconds": round(seconds, 2),
        "voxels_per_s": voxels / seconds,
        "baseline_rss_mb": round(baseline, 1),
        "loop_peak_rss_mb": round(loop_peak, 1),
        "peak_rss_mb": round(max(setup_peak, loop_peak), 1),
    }


def child_segment(volume_path: str, out: str, checkpoint: str, slices: int) -> dict:
    from ml_backend.learner.network import default_device
    from ml_backend.learner.volume_segmentation import (
        SegmentationPlan,
        cached_network,
        file_sha256,
        prepare_output,
        run_block,
    )
    from sdk.tiling import estimate_intensity_range, open_volume

    with open_volume(volume_path) as volume:
        window = tuple(estimate_intensity_range(volume))
        shape, volume_id = volume.shape, volume.id
    plan = SegmentationPlan(
        volume=volume_id, shape=shape, axis="z", output=out, format="zarr", kind="labels",
        checkpoint=checkpoint, checkpoint_sha256=file_sha256(checkpoint), n_classes=2,
        class_names=("background", "foreground"), window=window, tile=1024, overlap=64,
        chunk_slices=CHUNK_SLICES,
    )  # fmt: skip
    plan = prepare_output(plan, overwrite=True)
    blocks = plan.blocks()
    if slices:
        take = max(1, min(len(blocks), slices // CHUNK_SLICES))
        blocks = [blocks[i] for i in (np.arange(take) * len(blocks)) // take]
    device = default_device()
    net = cached_network(checkpoint, plan.checkpoint_sha256, device)  # what the CLI and workers use
    baseline, setup_peak = rss_mb(), peak_rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    for start, stop in blocks:
        run_block(plan, start, stop, net=net, device=device)
    seconds = time.perf_counter() - t0
    loop_peak = peak_rss_mb()
    n = sum(stop - start for start, stop in blocks)
    voxels = n * shape[1] * shape[2]
    return {
        "slices": n,
        "blocks": [list(b) for b in blocks],
        "device": str(device),
        "voxels": voxels,
        "seconds": round(seconds, 2),
        "voxels_per_s": voxels / seconds,
        "s_per_slice": round(seconds / n, 3),
        "baseline_rss_mb": round(baseline, 1),
        "loop_peak_rss_mb": round(loop_peak, 1),
        "peak_rss_mb": round(max(setup_peak, loop_peak), 1),
    }


def in_child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_volume", "--child", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report ------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = [
        "| volume | on disk | phase | work | time | throughput | peak RSS | RSS before the loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        work = f"{r['patches']} patches" if r["phase"] == "tile" else f"{r['slices']} slices ({r['device']})"
        lines.append(
            f"| {'×'.join(map(str, r['shape']))} | {r['disk_gb']:.2f} GB | {r['phase']} | {work} "
            f"| {r['seconds']:.1f} s | {r['voxels_per_s'] / 1e6:.2f} Mvox/s | {r['peak_rss_mb']:.0f} MB "
            f"| {r['baseline_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        phase, *rest = argv[1:]
        result = (
            child_tile(*rest) if phase == "tile" else child_segment(rest[0], rest[1], rest[2], int(rest[3]))
        )
        print(json.dumps(result))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 2.0], help="volume sizes in GiB")
    p.add_argument("--segment-slices", type=int, default=64, help="slices to segment per volume; 0 = all")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir, removed afterwards)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"[{DEFAULT_JSON.relative_to(ROOT)}]")
    args = p.parse_args(argv)

    import torch

    from ml_backend.learner.network import UNetConfig, build_unet

    work = args.workdir or Path(tempfile.mkdtemp(prefix="emloop-bench-volume-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t_start = time.time()
    try:
        checkpoint = work / "v1.pt"
        net = build_unet(UNetConfig(), seed=0)
        torch.save({"config": net.config.to_dict(), "state_dict": net.state_dict()}, checkpoint)
        for size in args.sizes_gb:
            n = max(CHUNK_SLICES, round(size * 2**30 / PLANE**2))
            volume = work / f"volume-{n}.zarr"
            t0 = time.perf_counter()
            make_volume(volume, n)
            disk = disk_bytes(volume)
            print(
                f"wrote {volume.name}: {disk / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
            )
            common = {"shape": [n, PLANE, PLANE], "disk_gb": disk / 1e9}
            rows.append({**common, "phase": "tile", **in_child("tile", str(volume))})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr)
            out = str(work / f"labels-{n}.zarr")
            seg = in_child("segment", str(volume), out, str(checkpoint), str(args.segment_slices))
            rows.append({**common, "phase": "segment", **seg})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr)
            shutil.rmtree(volume)
            shutil.rmtree(out)
            shutil.rmtree(out + ".progress", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "network": UNetConfig().to_dict(),
        "tile": 1024,
        "overlap": 64,
        "patch": PATCH,
        "chunk_slices": CHUNK_SLICES,
        "segment_slices": args.segment_slices,
        "total_seconds": round(time.time() - t_start, 1),
        "peak_rss_limit_mb": LIMIT_MB,
        "all_under_limit": all(r["peak_rss_mb"] < LIMIT_MB for r in rows),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(table(rows))
    print(
        f"\npeak RSS < {LIMIT_MB} MB everywhere: {meta['all_under_limit']}; wrote {args.json}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
