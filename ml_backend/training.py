"""Fine-tuning and evaluation, shared by the RQ worker and the active-learning simulation.

Training samples random patches (with flips and 90° rotations) from the labelled
images, minimises cross-entropy + soft Dice (Dice keeps small organelles from
being drowned by background), and stops early when the validation score (IoU) has not
improved for `patience` checks. Pixels labelled `IGNORE` (unknown) never count.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .inference import normalize_image, predict_image
from .network import UNet

IGNORE = 255
Progress = Callable[[int, int, float], None]  # (step, max_steps, loss)


@dataclass(frozen=True)
class TrainConfig:
    patch_size: int = 256
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    max_steps: int = 400
    min_steps: int = 50
    check_every: int = 25
    patience: int = 4
    val_crops: int = 32  # validation crops, spread over every validation image
    bn_patches: int = 64  # training patches that re-estimate BatchNorm statistics before evaluation
    seed: int = 0


def _random_crop(
    image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A size x size crop at a random position; smaller images are padded with IGNORE labels."""
    ph, pw = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw)), mode="constant")
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE)
    y = int(rng.integers(image.shape[0] - size + 1))
    x = int(rng.integers(image.shape[1] - size + 1))
    return image[y : y + size, x : x + size], mask[y : y + size, x : x + size]


def sample_patches(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    size: int,
    count: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` random augmented patches (N,1,s,s) float32 and labels (N,s,s) int64.

    Images smaller than `size` are padded with the IGNORE label, so any image size works.
    """
    xs = np.empty((count, 1, size, size), np.float32)
    ys = np.empty((count, size, size), np.int64)
    for i in range(count):
        k = int(rng.integers(len(images)))
        img, lab = _random_crop(images[k], masks[k], size, rng)
        turns = int(rng.integers(4))
        img, lab = np.rot90(img, turns), np.rot90(lab, turns)
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        xs[i, 0], ys[i] = img, lab
    return xs, ys


def validation_patches(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` crops taken from the images in turn (at least one each), at fixed positions.

    Every validation image counts and the set is the same at every check and every run,
    so early stopping follows the model, not the luck of which crops were drawn.
    """
    rng = np.random.default_rng(12345)
    count = max(count, len(images))
    xs = np.empty((count, 1, size, size), np.float32)
    ys = np.empty((count, size, size), np.int64)
    for i in range(count):
        xs[i, 0], ys[i] = _random_crop(images[i % len(images)], masks[i % len(images)], size, rng)
    return xs, ys


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 − soft Dice over foreground classes), ignoring IGNORE pixels."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    valid = (target != IGNORE).unsqueeze(1)
    probs = torch.softmax(logits, dim=1) * valid
    onehot = F.one_hot(target.clamp(max=logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2)
    onehot = onehot * valid
    inter = (probs * onehot).sum(dim=(0, 2, 3))[1:]
    denom = (probs + onehot).sum(dim=(0, 2, 3))[1:]
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1.0 - dice.mean())


def recalibrate_batchnorm(net: nn.Module, xs: np.ndarray, device: torch.device, chunk: int = 16) -> None:
    """Re-estimate every BatchNorm's running statistics as plain averages over `xs` (N,1,s,s).

    The running averages left by training follow the last few small batches; on sparse
    organelles they swing from batch to batch and so did the IoU of the saved model (measured
    on VNC: 0.17-0.48 between snapshots 50 steps apart, 0.37-0.47 once recalibrated). Only
    BatchNorm runs in training mode here, so dropout does not distort the statistics.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not len(xs):
        return
    was_training, momenta = net.training, [m.momentum for m in norms]
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    with torch.no_grad():
        for i in range(0, len(xs), chunk):
            net(torch.from_numpy(xs[i : i + chunk]).to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    net.train(was_training)


def validation_score(net: UNet, x: torch.Tensor, y: torch.Tensor, chunk: int) -> tuple[float, float]:
    """(foreground IoU pooled over the crops, −loss): compared in that order, higher is better.

    IoU is the number the user sees, and on sparse organelles the loss can fall while the
    thresholded masks get worse. The loss breaks ties, which carries training through the
    first steps from scratch (IoU 0 while everything is background) and decides alone when
    the validation crops hold no foreground (IoU counted as 0).
    """
    n_classes = net.config.n_classes
    counts, loss = np.zeros((n_classes, 3), np.int64), 0.0
    net.eval()
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            logits, target = net(x[i : i + chunk]), y[i : i + chunk]
            counts += confusion_counts(logits.argmax(dim=1).cpu().numpy(), target.cpu().numpy(), n_classes)
            loss += float(segmentation_loss(logits, target)) * len(target)
    net.train()
    iou = scores_from_counts(counts)["iou"] if counts[1:, 2].any() else 0.0
    return iou, -loss / len(x)


def _improves(score: tuple[float, float], best: tuple[float, float], tol: float = 1e-4) -> bool:
    return score[0] > best[0] + tol or (score[0] >= best[0] - tol and score[1] > best[1] + tol)


def fine_tune(
    net: UNet,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    config: TrainConfig = TrainConfig(),
    *,
    val_images: Sequence[np.ndarray] = (),
    val_masks: Sequence[np.ndarray] = (),
    device: torch.device | None = None,
    progress: Progress | None = None,
    keep_start: bool = True,
) -> dict:
    """Train `net` in place from its current weights; returns a summary.

    With validation images, keeps the weights of the best `validation_score` (the
    starting weights included when `keep_start`, so new labels that do not help cannot
    make a trained model worse; `best_step` 0 then; pass False for a fresh network, whose
    random guesses can outscore its first all-background steps) and stops after `patience`
    checks without improvement (convergence, not a fixed budget); without them, runs
    `max_steps`.
    """
    if not images:
        raise ValueError("no labelled images to train on")
    device = device or next(net.parameters()).device
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    pixels = [normalize_image(im) for im in images]
    val_pixels = [normalize_image(im) for im in val_images]
    val_batch = None
    if val_pixels:
        vx, vy = validation_patches(val_pixels, list(val_masks), config.patch_size, config.val_crops)
        val_batch = (torch.from_numpy(vx).to(device), torch.from_numpy(vy).to(device))
    net.to(device)
    # Fixed patches for the BatchNorm statistics, drawn apart from the training stream.
    bn_x, _ = sample_patches(
        pixels, list(masks), config.patch_size, config.bn_patches, np.random.default_rng(config.seed + 1)
    )

    def score() -> tuple[float, float]:
        assert val_batch is not None
        recalibrate_batchnorm(net, bn_x, device)
        return validation_score(net, *val_batch, chunk=2 * config.batch_size)

    best: tuple[tuple[float, float], dict, int] = ((-math.inf, -math.inf), {}, 0)
    if val_batch is not None and keep_start:  # fine-tuning never returns worse than it started
        best = (score(), copy.deepcopy(net.state_dict()), 0)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    checks_without_gain, step, loss_value = 0, 0, math.nan
    for step in range(1, config.max_steps + 1):
        xs, ys = sample_patches(pixels, list(masks), config.patch_size, config.batch_size, rng)
        x, y = torch.from_numpy(xs).to(device), torch.from_numpy(ys).to(device)
        loss = segmentation_loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        if progress:
            progress(step, config.max_steps, loss_value)
        if val_batch is not None and (step % config.check_every == 0 or step == config.max_steps):
            current = score()
            if _improves(current, best[0]):
                best, checks_without_gain = (current, copy.deepcopy(net.state_dict()), step), 0
            else:
                checks_without_gain += 1
            if step >= config.min_steps and checks_without_gain >= config.patience:
                break
    if val_batch is not None:
        net.load_state_dict(best[1])
    else:
        recalibrate_batchnorm(net, bn_x, device)
    net.eval()
    return {"steps": step, "final_loss": loss_value, "best_val_iou": best[0][0], "best_step": best[2]}


def confusion_counts(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, 3) intersections, predicted and true pixel counts per class, ignoring IGNORE."""
    valid = truth != IGNORE
    p, t = pred[valid].astype(np.int64), truth[valid].astype(np.int64)
    inter = np.bincount(t[p == t], minlength=n_classes)[:n_classes]
    return np.stack(
        [
            inter,
            np.bincount(p, minlength=n_classes)[:n_classes],
            np.bincount(t, minlength=n_classes)[:n_classes],
        ],
        axis=1,
    )


def scores_from_counts(counts: np.ndarray) -> dict:
    """Mean IoU (Jaccard) and Dice over foreground classes, pooled over all pixels seen."""
    inter, pred, true = counts[1:, 0], counts[1:, 1], counts[1:, 2]
    union = pred + true - inter
    present = union > 0
    if not present.any():
        return {"iou": 1.0, "dice": 1.0}
    iou = inter[present] / union[present]
    dice = 2 * inter[present] / (pred + true)[present]
    return {"iou": float(iou.mean()), "dice": float(dice.mean())}


def evaluate(
    net: UNet,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    tile: int = 1024,
    overlap: int = 64,
) -> dict:
    """Deterministic IoU/Dice of whole-image predictions against label maps."""
    n_classes = net.config.n_classes
    counts = np.zeros((n_classes, 3), np.int64)
    net.eval()
    for image, mask in zip(images, masks, strict=True):
        probs = predict_image(net, image, tile=tile, overlap=overlap).probs
        counts += confusion_counts(probs.argmax(axis=0), mask, n_classes)
    return scores_from_counts(counts)
