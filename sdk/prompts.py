"""Smart-tool prompts: the annotator's clicks and boxes, as pixels, and what they ask for.

Label Studio sends the regions an annotator draws with a smart tool (`smart="true"` on
`KeyPointLabels` / `RectangleLabels`, auto-annotation on) to the backend's `/predict` as
``context["result"]``: keypoints (``is_positive`` false for a negative click, alt-click in
the UI) and rectangles, in percent of the image. This module turns them into pixel
prompts and holds the pure array maths of click-to-mask: the click maps the promptable
network reads, the window it looks at, the rule that makes negative clicks remove, and
clicks simulated from masks to train it (DeepGrow-style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sdk.label_config import BrushTarget

CLICK_SIGMA = 5.0  # pixels (at the network's scale): the width of a click's bump in its map
PROMPT_TYPES = ("keypointlabels", "rectanglelabels")


class PromptError(ValueError):
    """The smart-tool input cannot be turned into a prompt (told to the annotator)."""


@dataclass(frozen=True)
class Click:
    y: float
    x: float
    positive: bool = True


@dataclass(frozen=True)
class Prompt:
    """What the annotator asked for: one object of `label`, pointed at by clicks and/or a box.

    `box` is ``(y0, x0, y1, x1)`` in pixels, end exclusive.
    """

    label: str
    clicks: tuple[Click, ...]
    box: tuple[float, float, float, float] | None = None

    @property
    def positives(self) -> list[Click]:
        """The clicks on the object; a box alone points at its centre."""
        found = [c for c in self.clicks if c.positive]
        if not found and self.box is not None:
            y0, x0, y1, x1 = self.box
            found = [Click((y0 + y1) / 2, (x0 + x1) / 2)]
        return found

    @property
    def negatives(self) -> list[Click]:
        return [c for c in self.clicks if not c.positive]


def prompt_regions(context: object) -> list[dict]:
    """The smart-tool regions (keypoints, rectangles) in Label Studio's `context`; cheap, so a
    request without any is told apart before its image is fetched."""
    results = context.get("result") if isinstance(context, dict) else None
    if not isinstance(results, list):
        return []
    return [r for r in results if isinstance(r, dict) and r.get("type") in PROMPT_TYPES]


def parse_prompt(context: object, target: BrushTarget, height: int, width: int) -> Prompt:
    """The prompt in Label Studio's `context` (callers tell a context without smart-tool regions
    apart first, with `prompt_regions`: it is no prompt, not a bad one).

    The object's label is the one on the annotator's keypoint or rectangle; it must be one of
    the brush labels (same name), except when the brush has a single label, which it then is.
    """
    clicks: list[Click] = []
    box = None
    names: list[str] = []
    for region in prompt_regions(context):
        value = region.get("value")
        if not isinstance(value, dict):
            raise PromptError(f"a {region.get('type')} region has no value")
        try:
            x = float(value["x"]) / 100 * width
            y = float(value["y"]) / 100 * height
        except (KeyError, TypeError, ValueError):
            raise PromptError(f"a {region['type']} region has no numeric x/y") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise PromptError(f"a {region['type']} region has no finite x/y")
        positive = region.get("is_positive", True) is not False
        if region["type"] == "keypointlabels":
            clicks.append(Click(min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0), positive))
        else:
            try:
                w = float(value["width"]) / 100 * width
                h = float(value["height"]) / 100 * height
            except (KeyError, TypeError, ValueError):
                raise PromptError("a rectangle has no numeric width/height") from None
            y0, y1 = sorted((y, y + h))
            x0, x1 = sorted((x, x + w))
            box = (max(y0, 0.0), max(x0, 0.0), min(y1, float(height)), min(x1, float(width)))
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                raise PromptError("the rectangle is empty inside the image")
        if positive:
            names += [str(n) for n in value.get(region["type"]) or []]
    if not clicks and box is None:
        raise PromptError("no keypoint or rectangle to segment from")
    if not any(c.positive for c in clicks) and box is None:
        raise PromptError("only negative clicks: click on the object first")
    return Prompt(_brush_label(names, target), tuple(clicks), box)


def _brush_label(names: list[str], target: BrushTarget) -> str:
    for name in names:
        if name in target.labels:
            return name
    if len(target.labels) == 1:
        return target.labels[0]
    if names:
        raise PromptError(f"{names[0]!r} is not a label of <BrushLabels name={target.from_name!r}>")
    raise PromptError("the click carries no label: choose one of the brush labels first")


def prompt_window(prompt: Prompt, shape: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)``: a window of about `size`² around the prompt, inside the image,
    large enough to hold every click and the box with a margin."""
    height, width = shape
    points = [(c.y, c.x) for c in prompt.clicks] + [(c.y, c.x) for c in prompt.positives]
    if prompt.box is not None:
        y0, x0, y1, x1 = prompt.box
        points += [(y0, x0), (y1, x1)]
    ys, xs = [p[0] for p in points], [p[1] for p in points]
    margin = size // 8

    def span(lo: float, hi: float, centre: float, limit: int) -> tuple[int, int]:
        extent = min(limit, max(size, int(math.ceil(hi - lo)) + 2 * margin))
        start = int(round(centre - extent / 2))
        start = min(max(start, 0), limit - extent)
        return start, start + extent

    cy = float(np.mean([c.y for c in prompt.positives]))
    cx = float(np.mean([c.x for c in prompt.positives]))
    if prompt.box is not None or len(points) > 2:
        cy, cx = (min(ys) + max(ys)) / 2, (min(xs) + max(xs)) / 2
    wy0, wy1 = span(min(ys), max(ys), cy, height)
    wx0, wx1 = span(min(xs), max(xs), cx, width)
    return wy0, wx0, wy1, wx1


def shift_prompt(prompt: Prompt, dy: float, dx: float, scale: float = 1.0) -> Prompt:
    """The prompt in a window's coordinates: moved by (-dy, -dx), then scaled."""
    clicks = tuple(Click((c.y - dy) * scale, (c.x - dx) * scale, c.positive) for c in prompt.clicks)
    box = None
    if prompt.box is not None:
        y0, x0, y1, x1 = prompt.box
        box = ((y0 - dy) * scale, (x0 - dx) * scale, (y1 - dy) * scale, (x1 - dx) * scale)
    return Prompt(prompt.label, clicks, box)


def click_maps(
    shape: tuple[int, int], clicks: tuple[Click, ...] | list[Click], sigma: float = CLICK_SIGMA
) -> np.ndarray:
    """(2, H, W) float32: a Gaussian bump per positive (plane 0) and negative (plane 1) click,
    the maximum where bumps overlap."""
    maps = np.zeros((2, *shape), np.float32)
    yy = np.arange(shape[0], dtype=np.float32)[:, None]
    xx = np.arange(shape[1], dtype=np.float32)[None, :]
    for click in clicks:
        bump = np.exp(-((yy - click.y) ** 2 + (xx - click.x) ** 2) / (2 * sigma**2))
        np.maximum(maps[0 if click.positive else 1], bump, out=maps[0 if click.positive else 1])
    return maps


def nearer_to_positive(shape: tuple[int, int], positives: list[Click], negatives: list[Click]) -> np.ndarray:
    """Pixels closer to a positive click than to any of `negatives`: what negative clicks leave
    of an object (all True without them)."""
    if not negatives:
        return np.ones(shape, bool)
    yy = np.arange(shape[0], dtype=np.float32)[:, None]
    xx = np.arange(shape[1], dtype=np.float32)[None, :]

    def nearest(points: list[Click]) -> np.ndarray:
        d = np.full(shape, np.inf, np.float32)
        for c in points:
            np.minimum(d, (yy - c.y) ** 2 + (xx - c.x) ** 2, out=d)
        return d

    return nearest(positives) < nearest(negatives)


def _pixel(mask: np.ndarray, click: Click) -> tuple[int, int]:
    return min(max(int(click.y), 0), mask.shape[0] - 1), min(max(int(click.x), 0), mask.shape[1] - 1)


def object_at_clicks(mask: np.ndarray, prompt: Prompt) -> np.ndarray:
    """The connected pieces of `mask` (bool) that hold a positive click, inside the box.

    A negative click on the mask splits it: the part nearer to it than to every positive click
    goes. Negative clicks elsewhere (another object, the background) only steer the network.
    When no piece holds a positive click, the one nearest the first click is kept if it is
    close to it (or inside the box).
    """
    positives = prompt.positives
    cuts = [c for c in prompt.negatives if mask[_pixel(mask, c)]]
    mask = mask & nearer_to_positive(mask.shape, positives, cuts)
    if prompt.box is not None:
        y0, x0, y1, x1 = (max(int(round(v)), 0) for v in prompt.box)
        inside = np.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        mask &= inside
    pieces, n = ndimage.label(mask)
    if n == 0:
        return mask
    hit = {int(pieces[_pixel(mask, c)]) for c in positives} - {0}
    if not hit:
        first = _pixel(mask, positives[0])
        distance, (iy, ix) = ndimage.distance_transform_edt(pieces == 0, return_indices=True)
        if prompt.box is None and distance[first] > 4 * CLICK_SIGMA:
            return np.zeros_like(mask)  # nothing near the click
        hit = {int(pieces[iy[first], ix[first]])}
    return np.isin(pieces, list(hit))


def simulate_clicks(
    target: np.ndarray,
    others: np.ndarray,
    rng: np.random.Generator,
    max_positive: int = 3,
    max_negative: int = 3,
) -> tuple[list[Click], np.ndarray]:
    """Clicks an annotator might give for the object `target` (bool), and the mask they ask for.

    The first positive click falls near the object's middle (weighted by the squared distance
    to its edge), further ones anywhere well inside; negative clicks land on `others` (other
    objects) or on the background around the object. One time in five a negative click
    splits the object itself, and the mask asked for is then what the correction rule leaves.
    """
    inside = ndimage.distance_transform_edt(target)
    weights = (inside**2).ravel()
    if weights.sum() == 0:
        raise ValueError("the target object is empty")
    width = target.shape[1]

    def pick(p: np.ndarray) -> Click:
        i = int(rng.choice(p.size, p=p / p.sum()))
        return Click(i // width + rng.uniform(-0.5, 0.5), i % width + rng.uniform(-0.5, 0.5))

    positives = [pick(weights)]
    deep = (inside > max(1.5, 0.3 * inside.max())).ravel().astype(np.float64)
    if not deep.any():  # an object at most 2 pixels thick (a membrane, a sliver): anywhere on it
        deep = (inside > 0).ravel().astype(np.float64)
    for _ in range(int(rng.integers(0, max_positive))):
        positives.append(pick(deep))
    near = ndimage.binary_dilation(target, iterations=int(rng.integers(4, 24))) & ~target
    negatives: list[Click] = []
    cuts: list[Click] = []
    wanted = target
    for _ in range(int(rng.integers(0, max_negative + 1))):
        kind = rng.uniform()
        if kind < 0.2:
            spot = pick(deep)
            cut = Click(spot.y, spot.x, False)
            kept = target & nearer_to_positive(target.shape, positives, [*cuts, cut])
            if kept.sum() < 0.2 * target.sum():
                continue  # would leave almost nothing: not a split an annotator makes
            cuts.append(cut)
            wanted = kept
            continue
        pool = others if kind < 0.6 and others.any() else near
        if pool.any():
            spot = pick(pool.ravel().astype(np.float64))
            negatives.append(Click(spot.y, spot.x, False))
    return positives + cuts + negatives, wanted
