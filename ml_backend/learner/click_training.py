"""Training the click network: clicks simulated on labelled objects (DeepGrow-style).

Each example is a window around one labelled object (a connected piece of one class),
zoomed, turned and flipped, with clicks an annotator might give (`sdk.prompts.simulate_clicks`)
and, as the target, that object alone: other objects of the same class are background here.
The same loss, schedule and BatchNorm re-estimation as the segmentation recipe
(`training`). The shipped weights come from synthetic sections with a wide zoom range (any
microscope's pixel size); a project's own annotations fine-tune them at its own scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from ml_backend.learner.clicks import prompt_input, segment_prompt
from ml_backend.learner.inference import bfloat16_supported, to_grey
from ml_backend.learner.network import UNet
from ml_backend.learner.training import IGNORE, Progress, TrainConfig, recalibrate_batchnorm, train_steps
from sdk.prompts import Click, Prompt, simulate_clicks

MAX_DRAWS = 100  # crops tried before an object set is declared too small to click on


@dataclass(frozen=True)
class ClickTrainConfig:
    steps: int = 300
    batch_size: int = 8
    crop: int = 160  # network pixels
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    zoom: tuple[float, float] = (0.8, 1.25)  # object scale, drawn log-uniformly
    contrast: float = 1.4  # gain drawn log-uniformly in [1/contrast, contrast]
    brightness: float = 0.2
    noise: float = 0.15  # largest Gaussian noise sd, normalised units
    min_object: int = 24  # pixels: smaller pieces are not offered as objects
    bn_crops: int = 256
    seed: int = 0


class ObjectSet:
    """Labelled images split into objects: every connected piece of every class (4-connected)."""

    def __init__(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], min_object: int) -> None:
        self.images = [to_grey(np.asarray(im)).astype(np.float32) for im in images]
        self.pieces: list[np.ndarray] = []  # per image: int32 piece ids, -1 unknown, 0 background
        self.objects: list[tuple[int, int, float, float]] = []  # (image, piece, centre y, centre x)
        self.sizes: list[np.ndarray] = []  # per image: pixels per piece id
        for k, mask in enumerate(masks):
            mask = np.asarray(mask)
            pieces = np.zeros(mask.shape, np.int32)
            for value in np.unique(mask):
                if value in (0, IGNORE):
                    continue
                numbered, n = ndimage.label(mask == value)
                numbered[numbered > 0] += pieces.max()
                pieces = np.where(numbered > 0, numbered, pieces)
            sizes = np.bincount(pieces.ravel())
            self.sizes.append(sizes)
            centres = ndimage.center_of_mass(np.ones_like(pieces), pieces, range(1, len(sizes)))
            for piece, (cy, cx) in enumerate(centres, start=1):
                if sizes[piece] >= min_object:
                    self.objects.append((k, piece, float(cy), float(cx)))
            pieces[mask == IGNORE] = -1
            self.pieces.append(pieces)
        if not self.objects:
            raise ValueError(f"no labelled object of at least {min_object} pixels to train clicks on")
        # Drawn in proportion to √area: small organelles are many, but large ones must not be rare.
        area = np.array([self.sizes[k][piece] for k, piece, _, _ in self.objects], np.float64)
        self.weights = np.sqrt(area) / np.sqrt(area).sum()

    def example(self, config: ClickTrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One (3, c, c) input and (c, c) target: a random object, zoomed, turned and clicked."""
        for _ in range(MAX_DRAWS):
            k, piece, cy, cx = self.objects[int(rng.choice(len(self.objects), p=self.weights))]
            image, pieces, window = self._view(k, cy, cx, config, rng)
            target = pieces == piece
            if target.sum() >= 4:
                break
        else:
            raise ValueError(
                f"no object kept 4 pixels in {MAX_DRAWS} zoomed crops: objects are too small for "
                f"the zoom range {config.zoom} (raise min_object, now {config.min_object})"
            )
        others = (pieces > 0) & ~target
        clicks, wanted = simulate_clicks(target, others, rng)
        x = prompt_input(image, Prompt("", tuple(clicks)))
        gain = math.exp(rng.uniform(-1, 1) * math.log(config.contrast))
        x[0] = x[0] * gain + rng.uniform(-1, 1) * config.brightness
        x[0] += rng.normal(0, rng.uniform(0, config.noise), x[0].shape).astype(np.float32)
        y = np.where(wanted, 1, np.where(pieces < 0, IGNORE, 0)).astype(np.int64)
        y[~window] = IGNORE
        turns, flip = int(rng.integers(4)), rng.random() < 0.5
        x, y = np.rot90(x, turns, axes=(1, 2)), np.rot90(y, turns)
        if flip:
            x, y = x[:, :, ::-1], y[:, ::-1]
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    def _view(
        self, k: int, cy: float, cx: float, config: ClickTrainConfig, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image, piece ids and inside-the-image mask of a crop around (cy, cx), zoomed and turned."""
        image, pieces = self.images[k], self.pieces[k]
        lo, hi = (math.log(z) for z in config.zoom)
        zoom = math.exp(rng.uniform(lo, hi))
        side = config.crop / zoom  # image pixels the crop spans
        cy += rng.uniform(-0.25, 0.25) * side
        cx += rng.uniform(-0.25, 0.25) * side
        angle = rng.uniform(0, 2 * math.pi)
        h, w = image.shape
        # affine_grid maps the crop's [-1, 1]² onto the image's: turn, scale to `side`, centre.
        c, s_ = math.cos(angle), math.sin(angle)
        theta = torch.tensor(
            [[[side / w * c, -side / w * s_, 2 * cx / w - 1], [side / h * s_, side / h * c, 2 * cy / h - 1]]],
            dtype=torch.float32,
        )
        grid = F.affine_grid(theta, [1, 1, config.crop, config.crop], align_corners=False)
        sample = lambda a, mode, pad: F.grid_sample(  # noqa: E731
            torch.from_numpy(a)[None, None], grid, mode=mode, padding_mode=pad, align_corners=False
        )[0, 0].numpy()
        view = sample(image, "bilinear", "reflection")
        ids = sample(pieces.astype(np.float32), "nearest", "zeros").round().astype(np.int32)
        inside = sample(np.ones_like(image), "nearest", "zeros") > 0.5
        return view, ids, inside


def click_batches(objects: ObjectSet, config: ClickTrainConfig, count: int, rng: np.random.Generator):
    """`count` examples stacked: (N, 3, c, c) float32 and (N, c, c) int64."""
    pairs = [objects.example(config, rng) for _ in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def train_clicks(
    net: UNet,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    config: ClickTrainConfig = ClickTrainConfig(),
    *,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train the click network in place for `config.steps` steps on the objects in `masks`."""
    objects = ObjectSet(images, masks, config.min_object)
    device = device or next(net.parameters()).device
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    schedule = TrainConfig(
        steps=config.steps, learning_rate=config.learning_rate, weight_decay=config.weight_decay
    )
    net.to(device).to(memory_format=torch.channels_last)
    autocast = bfloat16_supported(device)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(config.steps):
            xs, ys = click_batches(objects, config, config.batch_size, rng)
            yield torch.from_numpy(xs).to(device), torch.from_numpy(ys).to(device)

    loss_value = train_steps(net, batches(), schedule, autocast, progress)
    bn_x, _ = click_batches(objects, config, config.bn_crops, np.random.default_rng(config.seed + 1))
    recalibrate_batchnorm(net, bn_x, device)
    net.eval()
    return {
        "steps": config.steps,
        "final_loss": loss_value,
        "objects": len(objects.objects),
        "bfloat16": autocast,
    }


def object_clicks(mask: np.ndarray, min_object: int) -> list[tuple[np.ndarray, Prompt]]:
    """Every object of a label map (connected piece of a class, at least `min_object` pixels) with
    one positive click where an annotator would put it: the point deepest inside."""
    found = []
    for value in np.unique(mask):
        if value in (0, IGNORE):
            continue
        pieces, n = ndimage.label(mask == value)
        for piece in range(1, n + 1):
            obj = pieces == piece
            if obj.sum() < min_object:
                continue
            depth = ndimage.distance_transform_edt(obj)
            y, x = np.unravel_index(int(depth.argmax()), depth.shape)
            found.append((obj, Prompt("", (Click(float(y), float(x)),))))
    return found


def clicked_object_iou(
    net: UNet, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], min_object: int = 200
) -> list[float]:
    """IoU of `segment_prompt` with each object of the label maps, one click deep inside each."""
    scores = []
    for image, mask in zip(images, masks, strict=True):
        for obj, prompt in object_clicks(np.asarray(mask), min_object):
            got = segment_prompt(net, image, prompt)
            scores.append(float((got & obj).sum() / max(1, (got | obj).sum())))
    return scores
