"""Train the click-to-mask network's default weights on synthetic EM sections.

The weights that ship in the package (`ml_backend/learner/weights/clicks-synthetic.pt`) come
from this command with its defaults: synthetic sections only (`sdk.synthetic`, no data with a
licence that forbids it), every seed fixed. A record of the run (settings, machine, time, the
clicked-object IoU on held-out synthetic sections) is written beside the weights as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ml_backend.learner.checkpoints import checkpoint_bytes
from ml_backend.learner.click_checkpoints import DEFAULT_CLICK_WEIGHTS
from ml_backend.learner.click_training import ClickTrainConfig, clicked_object_iou, train_clicks
from ml_backend.learner.clicks import CLICK_NETWORK
from ml_backend.learner.network import build_unet, cpu_name, default_device
from sdk.atomic import atomic_write_bytes
from sdk.synthetic import synthetic_em

EVAL_SEEDS = 500  # the held-out sections' first seed (training sections start at 0)
PRETRAINING_ZOOM = (0.6, 4.0)  # synthetic organelles span 14-100 px across: 8-400 px after zoom


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="emloop-train-clicks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_CLICK_WEIGHTS, help="weights file to write")
    p.add_argument("--steps", type=int, default=3000, help="training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--images", type=int, default=48, help="synthetic training sections")
    p.add_argument("--size", type=int, default=512, help="side of each synthetic section, pixels")
    p.add_argument("--eval-images", type=int, default=6, help="held-out synthetic sections for the IoU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def synthetic_sections(count: int, size: int, first_seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Sections with mitochondria and vesicle clusters (two object shapes)."""
    pairs = [synthetic_em(size, size, seed=first_seed + i, n_classes=2) for i in range(count)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    images, masks = synthetic_sections(args.images, args.size, 1000 * args.seed)
    eval_images, eval_masks = synthetic_sections(args.eval_images, args.size, 1000 * args.seed + EVAL_SEEDS)
    config = ClickTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=2e-3,
        zoom=PRETRAINING_ZOOM,
        seed=args.seed,
    )
    net = build_unet(CLICK_NETWORK, seed=args.seed)
    device = default_device()
    with tqdm(total=args.steps, unit="step", desc="train clicks", disable=args.no_progress) as bar:

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

        summary = train_clicks(net, images, masks, config, device=device, progress=progress)
    net.cpu()
    scores = clicked_object_iou(net, eval_images, eval_masks, min_object=config.min_object)
    record = {
        "trained_on": f"{args.images} synthetic sections of {args.size}² (sdk.synthetic, n_classes=2)",
        "config": {k: v for k, v in vars(config).items()},
        "summary": summary,
        "synthetic_clicked_object_iou": {"mean": float(np.mean(scores)), "objects": len(scores)},
        "seconds": round(time.time() - started, 1),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} torch threads, {device}",
        "torch": str(torch.__version__),  # a TorchVersion would not load with weights_only=True
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, checkpoint_bytes(net, record, compact=True))
    atomic_write_bytes(args.out.with_suffix(".json"), (json.dumps(record, indent=1) + "\n").encode())
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); clicked-object IoU on held-out "
        f"synthetic sections {record['synthetic_clicked_object_iou']['mean']:.3f} ({len(scores)} objects)"
    )
    return 0
