"""Throughput on this machine's device (CUDA when present): /predict's network time, whole-volume
segmentation Zarr to Zarr, and training patches per second, side by side in one process.

- predict: `predict_image` on the served network (default U-Net, BatchNorm folded, channels-last)
  for a 1024² and a 2048² image (4 tiles of 1024²), in two modes run alternately: `fp32, 1 tile`
  (the path before issue 15, and what a CPU still runs) and `default` (`autocast_dtype` and
  `default_tile_batch`: bfloat16 and 8 tiles a pass on CUDA), plus, with --baseline REF,
  `predict_image` as it was at that commit. Median of --repeat, the modes alternating.
- volume: a synthetic uint8 Zarr of --volume-slices × --plane² (uncompressed, 1 × 512² chunks)
  segmented by `scripts/segment_volume.py`'s code (`prepare_output`, `run_block`: the next slice is
  read while the network works), labels written to Zarr; Mvox/s end to end, I/O included. The
  device is busy for the network's forward time of the same slices predicted from memory, so
  busy = that time / the end-to-end time.
- train: `fine_tune` (the worker's recipe and defaults: 128² crops, batch 16) on 500 synthetic
  annotated 256² patches for --train-steps steps, in modes taking turns twice: `default`, `batch 32`,
  on CUDA `no prefetch` (batches drawn in the loop, not ahead in a thread) and, on a CPU whose
  oneDNN would emulate bfloat16, `bfloat16 emulated (before)` (autocast as it was chosen there
  until 2026-12-01); patches/s over the steps after the first (median), and the time the worker's
  default 1000-step run takes at that rate plus the run's fixed costs.
- agreement: the default network trained --agreement-steps steps on four VNC sections' top halves
  (synthetic EM without VNC), then the fraction of the bottom halves' pixels whose class under
  bfloat16 and float16 autocast (8 tiles a pass) is float32's (`mask_agreement`), beside the
  float32 IoU that shows the masks are real segmentations.

    .venv/bin/python -m benchmarks.bench_throughput [--volume-slices 32] [--train-steps 40] [--json PATH]
    # a GPU machine (issue 15's targets): --volume-slices 4096 --train-steps 1000 --repeat 50

--deadline-s stops between phases; whatever finished is written.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_volume import disk_bytes, make_volume
from ml_backend.learner.inference import (
    autocast_dtype,
    bfloat16_supported,
    default_tile_batch,
    mask_agreement,
    predict_image,
)
from ml_backend.learner.network import UNetConfig, build_unet, cpu_name, default_device, fuse_for_inference
from sdk.synthetic import synthetic_em

ROOT = Path(__file__).resolve().parents[1]

VNC_DIR = ROOT.parent / "shared" / "data" / "vnc"
VNC_SLICE = VNC_DIR / "stack1" / "raw" / "00.tif"
MODES = {"fp32, 1 tile": {"precision": None, "tile_batch": 1}, "default": {}}


def baseline_predict(ref: str) -> Callable[..., object]:
    """`predict_image` as it was at git `ref` (its `ml_backend/inference.py`, on today's network
    code), to time the code before a change side by side with it."""
    path = "ml_backend/inference.py"
    show = ["git", "show", f"{ref}:{path}"]
    source = subprocess.run(show, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"ml_backend.inference_at_{ref}")
    module.__package__ = "ml_backend.learner"  # its relative imports: the network beside it
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{ref}:{path}", "exec"), module.__dict__)  # noqa: S102
    return module.predict_image


def served_network(device: torch.device):
    net = build_unet(UNetConfig(), seed=0).eval()
    net.set_intensity_window((0.0, 255.0))
    return fuse_for_inference(net).to(device).to(memory_format=torch.channels_last)


def test_image(size: int) -> np.ndarray:
    if VNC_SLICE.exists():
        from PIL import Image

        base = np.asarray(Image.open(VNC_SLICE).convert("L"))
        return np.tile(base, (-(-size // base.shape[0]), -(-size // base.shape[1])))[:size, :size]
    return synthetic_em(size, size, seed=0)[0]


def bench_predict(net, device: torch.device, repeat: int, baseline: str | None) -> list[dict]:
    runs = {mode: functools.partial(predict_image, **kwargs) for mode, kwargs in MODES.items()}
    if baseline:
        runs[f"before ({baseline})"] = baseline_predict(baseline)
    rows = []
    for size in (1024, 2048):
        image = test_image(size)
        times: dict[str, list[float]] = {mode: [] for mode in runs}
        for run in runs.values():  # warm-up (cuDNN autotuning, allocator)
            run(net, image, tile=1024, overlap=64)
        for _ in range(repeat):
            for mode, run in runs.items():
                started = time.perf_counter()
                run(net, image, tile=1024, overlap=64)
                times[mode].append(time.perf_counter() - started)
        medians = {mode: statistics.median(t) for mode, t in times.items()}
        for mode, median in medians.items():
            rows.append(
                {"image": f"{size}²", "mode": mode, "median_ms": round(1000 * median, 2),
                 "ratio_to_fp32_1_tile": round(medians["fp32, 1 tile"] / median, 3)}
            )  # fmt: skip
            print(f"predict {size}² {mode}: {1000 * median:.1f} ms", file=sys.stderr)
    return rows


def bench_volume(net, device: torch.device, work: Path, slices: int, plane: int) -> dict:
    from ml_backend.learner.volume_segmentation import (
        SegmentationPlan,
        file_sha256,
        prepare_output,
        run_block,
    )

    volume, out, checkpoint = work / "raw.zarr", work / "labels.zarr", work / "v1.pt"
    make_volume(volume, slices, plane)
    raw = build_unet(UNetConfig(), seed=0)
    torch.save({"config": raw.config.to_dict(), "state_dict": raw.state_dict()}, checkpoint)
    plan = SegmentationPlan(
        volume=str(volume), shape=(slices, plane, plane), axis="z", output=str(out), format="zarr",
        kind="labels", checkpoint=str(checkpoint), checkpoint_sha256=file_sha256(checkpoint), n_classes=2,
        class_names=("background", "foreground"), window=(0.0, 255.0), chunk_slices=8,
    )  # fmt: skip
    plan = prepare_output(plan, overwrite=True)
    started = time.perf_counter()
    for start, stop in plan.blocks():
        run_block(plan, start, stop, net=net, device=device)
    seconds = time.perf_counter() - started
    # The network's own time on the same slices, from memory.
    import zarr

    arr = zarr.open_array(store=str(volume), mode="r")
    forward = 0.0
    for z in range(slices):
        pred = predict_image(net, np.asarray(arr[z]), tile=plan.tile, overlap=plan.overlap)
        forward += pred.forward_seconds
    voxels = slices * plane * plane
    row = {
        "shape": [slices, plane, plane],
        "disk_gb": round(disk_bytes(volume) / 1e9, 3),
        "seconds": round(seconds, 2),
        "mvox_per_s": round(voxels / seconds / 1e6, 2),
        "forward_seconds": round(forward, 2),
        "device_busy_fraction": round(forward / seconds, 3),
    }
    print(f"volume {row}", file=sys.stderr)
    shutil.rmtree(volume)
    shutil.rmtree(out, ignore_errors=True)
    return row


def stamp_step(stamps: dict[int, float], step: int, total: int, loss: float) -> None:
    stamps.setdefault(step, time.perf_counter())


def train_modes(device: torch.device) -> dict[str, dict]:
    """`fine_tune` keyword changes per mode; the default is the worker's recipe on this device."""
    modes: dict[str, dict] = {"default": {}, "batch 32": {"batch_size": 32}}
    if device.type == "cuda":
        modes["no prefetch"] = {"prefetch_batches": False}
    elif not bfloat16_supported(device) and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        modes["bfloat16 emulated (before)"] = {
            "force_bfloat16": True
        }  # oneDNN's claim, used until 2026-12-01
    return modes


def bench_train(device: torch.device, steps: int, repeat: int = 2) -> list[dict]:
    import ml_backend.learner.training as training

    images, masks = [], []
    for seed in range(20):  # 500 patches of 256² cut from 20 synthetic 1280² sections
        image, mask = synthetic_em(1280, 1280, seed=seed)
        for y in range(0, 1280, 256):
            for x in range(0, 1280, 256):
                images.append(image[y : y + 256, x : x + 256])
                masks.append(mask[y : y + 256, x : x + 256])
    modes = train_modes(device)
    runs: dict[str, list[tuple[float, float, dict, training.TrainConfig]]] = {mode: [] for mode in modes}
    for _ in range(repeat):  # the modes take turns, so load changes reach them all
        for mode, change in modes.items():
            change = dict(change)
            force = change.pop("force_bfloat16", False)
            prefetch = change.pop("prefetch_batches", None)
            config = training.TrainConfig(steps=steps, **change)  # the worker's defaults otherwise
            net = build_unet(UNetConfig(), seed=0)
            stamps: dict[int, float] = {}
            native = training.bfloat16_supported
            if force:
                training.bfloat16_supported = lambda _device: True
            try:
                started = time.perf_counter()
                summary = training.fine_tune(
                    net, images, masks, config, device=device, keep_start=False, prefetch_batches=prefetch,
                    progress=functools.partial(stamp_step, stamps),
                )  # fmt: skip
                seconds = time.perf_counter() - started
            finally:
                training.bfloat16_supported = native
            # Steps after the first (which includes setup); the run's fixed costs (BatchNorm
            # re-estimation on 512 crops, moving data) are in `seconds`.
            rate = (steps - 1) * config.batch_size / (stamps[steps] - stamps[1])
            runs[mode].append((rate, seconds, summary, config))
    rows = []
    default_rate = statistics.median(r[0] for r in runs["default"])
    for mode, results in runs.items():
        rate = statistics.median(r[0] for r in results)
        seconds = statistics.median(r[1] for r in results)
        config, summary = results[0][3], results[0][2]
        fixed = seconds - steps * config.batch_size / rate
        row = {
            "mode": mode,
            "patches": len(images),
            "steps": steps,
            "batch": config.batch_size,
            "crop": config.patch_size,
            "runs": len(results),
            "seconds": round(seconds, 2),
            "patches_per_s": round(rate, 1),
            "ratio_to_default": round(rate / default_rate, 3),
            "seconds_for_1000_steps": round(1000 * config.batch_size / rate + fixed, 1),
            "bfloat16": summary["bfloat16"],
        }
        print(f"train {row}", file=sys.stderr)
        rows.append(row)
    return rows


def bench_agreement(device: torch.device, steps: int) -> dict:
    """Masks under each reduced precision against float32, on VNC sections' unseen halves, from
    the default network trained `steps` steps on their other halves (synthetic EM without VNC)."""
    from ml_backend.experiments.simulation_setup import SimConfig, load_vnc
    from ml_backend.learner.training import TrainConfig, evaluate, fine_tune

    if VNC_DIR.exists():
        data = load_vnc(VNC_DIR, SimConfig(sections=4))
        train, train_masks = list(data.train_raw), list(data.train_mask)
        test, test_masks, source = list(data.test_images), list(data.test_masks), "VNC sections 0-3"
    else:
        pairs = [synthetic_em(512, 1024, seed=s) for s in range(8)]
        train, train_masks = [p[0] for p in pairs[:4]], [p[1] for p in pairs[:4]]
        test, test_masks, source = [p[0] for p in pairs[4:]], [p[1] for p in pairs[4:]], "synthetic EM"
    net = build_unet(UNetConfig(), seed=0)
    fine_tune(
        net, train, train_masks, TrainConfig(steps=steps, batch_size=8), device=device, keep_start=False
    )
    net = fuse_for_inference(net.eval()).to(device).to(memory_format=torch.channels_last)
    row: dict = {
        "images": f"{source}: {len(test)} unseen halves, {test[0].shape[0]}x{test[0].shape[1]}",
        "train_steps": steps,
        "float32_iou": round(evaluate(net, test, test_masks)["iou"], 4),
        "pixels_agreeing": {},
    }
    for dtype in (torch.bfloat16, torch.float16):
        try:
            row["pixels_agreeing"][str(dtype)] = round(mask_agreement(net, test, dtype), 6)
        except RuntimeError as exc:  # an autocast dtype this device does not run
            row["pixels_agreeing"][str(dtype)] = f"not run: {exc}"
    print(f"agreement {row}", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--repeat", type=int, default=7, help="predictions per image size and mode")
    p.add_argument("--volume-slices", type=int, default=32, help="slices of the synthetic Zarr volume")
    p.add_argument("--plane", type=int, default=1024, help="slice edge in pixels")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument(
        "--agreement-steps",
        type=int,
        default=150,
        help="training steps of the network whose "
        "bfloat16/float16 masks are compared with float32 (0 = skip)",
    )
    p.add_argument("--baseline", metavar="GIT_REF", help="also time predict_image as it was at this commit")
    p.add_argument("--deadline-s", type=float, default=0, help="stop between phases after this; 0 = none")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir, removed afterwards)")
    p.add_argument("--json", type=Path, help="[benchmarks/results/throughput-<device>.json]")
    args = p.parse_args(argv)
    device = default_device() if args.device == "auto" else torch.device(args.device)
    out = args.json or ROOT / "benchmarks" / "results" / f"throughput-{device.type}.json"
    began = time.monotonic()
    late = lambda: args.deadline_s and time.monotonic() - began > args.deadline_s  # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    result: dict = {
        "meta": {
            "device": str(device),
            "device_name": name,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "autocast": str(autocast_dtype(device)),
            "cpu_bfloat16_native": bfloat16_supported(torch.device("cpu")),
            "tile_batch": default_tile_batch(device),
            "network": UNetConfig().to_dict(),
        }  # fmt: skip
    }

    def save() -> None:
        result["meta"]["seconds"] = round(time.monotonic() - began, 1)
        result["meta"]["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    net = served_network(device)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="emloop-bench-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result["predict"] = bench_predict(net, device, args.repeat, args.baseline)
        save()
        if not late():
            result["volume"] = bench_volume(net, device, work, args.volume_slices, args.plane)
            save()
        if not late():
            result["train"] = bench_train(device, args.train_steps)
            save()
        if not late() and args.agreement_steps:
            result["agreement"] = bench_agreement(device, args.agreement_steps)
            save()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
