"""Training and evaluation, shared by the RQ worker and the active-learning simulation.

One recipe (README, "The model", gives the measurements behind each choice): images are
normalised with the intensity window of the data the network first trained on (stored in
the network, so serving and scoring see the same intensities); each step draws a batch of
random crops, turned by any angle, scaled, flipped and jittered in contrast and
brightness; AdamW follows a linear warm-up and a cosine decay over a fixed number of
steps, under bfloat16 autocast where the hardware supports it; the loss is cross-entropy
+ soft Dice (Dice keeps small organelles from being drowned by background). At the end
BatchNorm statistics are re-estimated and, with validation images, the result is
compared with the starting weights, which win if they score better. Pixels labelled
`IGNORE` (unknown) never count.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ml_backend.config import TILE, TILE_OVERLAP
from ml_backend.learner.inference import bfloat16_supported, intensity_window, normalize_image, predict_image
from ml_backend.learner.network import UNet
from sdk.label_config import UNLABELLED
from sdk.prefetch import prefetch

IGNORE = UNLABELLED  # pixels that never count: unknown in a scribble label map, or padding
Progress = Callable[[int, int, float], None]  # (step, steps, loss)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    patch_size: int = 128
    batch_size: int = 16
    learning_rate: float = 2e-3  # peak, after `warmup_steps`
    weight_decay: float = 0.3  # AdamW's; 0.3 beat 1e-2, 0.1 and 1.0 (benchmarks/README.md)
    warmup_steps: int = 50
    rotate: bool = True  # any angle (on top of the exact 90-degree turns and flips)
    scale: float = 1.25  # zoom drawn log-uniformly in [1/scale, scale]; 1 = off
    contrast: float = 1.25  # contrast factor drawn log-uniformly in [1/contrast, contrast]; 1 = off
    brightness: float = 0.15  # shift in normalised units (the window spans 2); 0 = off
    mixed_precision: bool = True  # bfloat16 autocast where the device supports it
    val_crops: int = 32  # validation crops, spread over every validation image
    bn_patches: int = 512  # training crops that re-estimate BatchNorm statistics (64 proved too few)
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
    """`count` random crops (N,1,s,s) float32 and labels (N,s,s) int64, turned by multiples
    of 90 degrees and flipped.

    An image is drawn in proportion to its area, so every labelled pixel is equally likely
    whatever mix of whole sections and small patches the tasks are. Images smaller than
    `size` are padded with the IGNORE label, so any image size works.
    """
    xs = np.empty((count, 1, size, size), np.float32)
    ys = np.empty((count, size, size), np.int64)
    areas = np.array([im.shape[0] * im.shape[1] for im in images], np.float64)
    picks = rng.choice(len(images), size=count, p=areas / areas.sum())
    for i, k in enumerate(picks):
        img, lab = _random_crop(images[k], masks[k], size, rng)
        turns = int(rng.integers(4))
        img, lab = np.rot90(img, turns), np.rot90(lab, turns)
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        xs[i, 0], ys[i] = img, lab
    return xs, ys


def augment_batch(
    x: torch.Tensor, y: torch.Tensor, config: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate by any angle, zoom, and jitter contrast and brightness, per sample.

    EM varies between microscopes, sections and stainings in orientation, pixel size and
    contrast. Pixels that come from outside the crop are labelled IGNORE (reflected image).
    """
    n = len(x)
    if config.rotate or config.scale > 1:
        angle = rng.uniform(0, 2 * np.pi, n) if config.rotate else np.zeros(n)
        zoom = np.exp(rng.uniform(-1, 1, n) * np.log(max(config.scale, 1.0)))
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        theta = np.zeros((n, 2, 3), np.float32)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        grid = F.affine_grid(torch.from_numpy(theta).to(x.device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        inside = F.grid_sample(torch.ones_like(x), grid, mode="nearest", align_corners=False)[:, 0] > 0.5
        # Labels through the float sampler are exact: nearest picks one value, below 2**24.
        labels = F.grid_sample(y[:, None].to(x.dtype), grid, mode="nearest", align_corners=False)[:, 0]
        y = torch.where(inside, labels.round().long(), torch.full_like(y, IGNORE))
    if config.contrast > 1 or config.brightness > 0:
        gain = np.exp(rng.uniform(-1, 1, (n, 1, 1, 1)) * np.log(max(config.contrast, 1.0)))
        shift = rng.uniform(-1, 1, (n, 1, 1, 1)) * config.brightness
        x = x * torch.from_numpy(gain.astype(np.float32)).to(x.device)
        x = x + torch.from_numpy(shift.astype(np.float32)).to(x.device)
    return x, y


def training_batches(
    pixels: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    config: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The `config.steps` augmented batches of a run, drawn in order from `rng` alone (so a
    thread may draw them ahead of the training loop without changing them)."""
    pin = device.type == "cuda"  # page-locked host memory: the copy to the GPU runs asynchronously
    for _ in range(config.steps):
        xs, ys = sample_patches(pixels, masks, config.patch_size, config.batch_size, rng)
        x, y = torch.from_numpy(xs), torch.from_numpy(ys)
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        yield augment_batch(x.to(device, non_blocking=pin), y.to(device, non_blocking=pin), config, rng)


def validation_patches(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` crops taken from the images in turn (at least one each), at fixed positions.

    Every validation image counts and the set is the same for every model compared, so
    the choice between the trained and the starting weights follows the models, not the
    luck of which crops were drawn.
    """
    rng = np.random.default_rng(12345)
    count = max(count, len(images))
    xs = np.empty((count, 1, size, size), np.float32)
    ys = np.empty((count, size, size), np.int64)
    for i in range(count):
        xs[i, 0], ys[i] = _random_crop(images[i % len(images)], masks[i % len(images)], size, rng)
    return xs, ys


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 − soft Dice over foreground classes), ignoring IGNORE pixels.

    A batch with no labelled pixel at all (possible with scribbles) gives 0, not NaN.
    """
    valid = (target != IGNORE).unsqueeze(1)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum") / valid.sum().clamp(min=1)
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


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to the peak, then a cosine decay to zero at `config.steps`.

    Ending at zero lets the last weights settle, so a run needs no checkpoint picking on
    a noisy validation set (measured: README, "The model"). The warm-up takes at most a
    quarter of the run, so a short run still reaches the peak.
    """
    warmup = min(config.warmup_steps, config.steps // 4)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    span = max(1, config.steps - warmup)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def train_steps(
    net: UNet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    autocast: bool,
    progress: Progress | None = None,
) -> float:
    """AdamW over `batches` (one step each) on the recipe's schedule and loss; the last loss."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    device = next(net.parameters()).device
    net.train()
    loss_value = math.nan
    for step, (x, y) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = net(x.contiguous(memory_format=torch.channels_last))
        loss = segmentation_loss(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        if progress:
            progress(step + 1, config.steps, loss_value)
    return loss_value


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
    prefetch_batches: bool | None = None,
) -> dict:
    """Train `net` in place from its current weights for `config.steps` steps; returns a summary.

    A network never trained takes the intensity window of `images`, and keeps it for
    every later run. With validation images and `keep_start`, the starting weights are
    kept when they score better (`validation_score`), so new labels cannot make a trained
    model worse on the held-out images; pass False for a fresh network, whose random
    guesses can outscore a real model on IoU-0 validation crops. `prefetch_batches` (default: on
    CUDA) prepares the next batch in a thread while the device trains on this one; the batches,
    and so the trained weights, are the same either way.
    """
    if not images:
        raise ValueError("no labelled images to train on")
    device = device or next(net.parameters()).device
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    if net.intensity_window is None:
        net.set_intensity_window(intensity_window(images))
    window = net.intensity_window
    pixels = [normalize_image(im, window) for im in images]
    masks = list(masks)
    net.to(device).to(memory_format=torch.channels_last)
    # Fixed patches for the BatchNorm statistics, drawn apart from the training stream.
    bn_x, _ = sample_patches(
        pixels, masks, config.patch_size, config.bn_patches, np.random.default_rng(config.seed + 1)
    )
    val_batch = None
    if len(val_images):
        val_pixels = [normalize_image(im, window) for im in val_images]
        vx, vy = validation_patches(val_pixels, list(val_masks), config.patch_size, config.val_crops)
        val_batch = (torch.from_numpy(vx).to(device), torch.from_numpy(vy).to(device))

    def score() -> tuple[float, float]:
        if val_batch is None:
            return (math.nan, math.nan)
        return validation_score(net, *val_batch, chunk=2 * config.batch_size)

    # The starting weights are scored and, if they win, returned exactly as they came (their own
    # BatchNorm statistics): re-estimating them on the new labels alone moved VNC test IoU by 0.03.
    start = (score(), copy.deepcopy(net.state_dict())) if val_batch is not None and keep_start else None
    autocast = config.mixed_precision and bfloat16_supported(device)
    batches = training_batches(pixels, masks, config, rng, device)
    if prefetch_batches is None:
        prefetch_batches = device.type == "cuda"
    if prefetch_batches:
        batches = prefetch(batches)
    loss_value = train_steps(net, batches, config, autocast, progress)
    recalibrate_batchnorm(net, bn_x, device)
    trained = score()
    kept_start = start is not None and _improves(start[0], trained)
    if kept_start:
        net.load_state_dict(start[1])
    net.eval()
    return {
        "steps": config.steps,
        "final_loss": loss_value,
        "val_iou": (start[0] if kept_start else trained)[0] if val_batch is not None else None,
        "val_iou_start": start[0][0] if start else None,
        "val_iou_trained": trained[0] if val_batch is not None else None,
        "kept_start": kept_start,
        "bfloat16": autocast,
    }


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
    tile: int = TILE,
    overlap: int = TILE_OVERLAP,
) -> dict:
    """Deterministic IoU/Dice of whole-image predictions against label maps."""
    n_classes = net.config.n_classes
    counts = np.zeros((n_classes, 3), np.int64)
    net.eval()
    for image, mask in zip(images, masks, strict=True):
        probs = predict_image(net, image, tile=tile, overlap=overlap).probs
        counts += confusion_counts(probs.argmax(axis=0), mask, n_classes)
    return scores_from_counts(counts)
