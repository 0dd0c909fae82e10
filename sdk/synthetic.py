"""Synthetic EM-like sections with exact masks, for the demo and for tests.

Deliberately generic (not fitted to any real dataset): grey textured cytoplasm, dark wavy
cell membranes, elongated mitochondria with cristae stripes and a double membrane, and
optionally clusters of round vesicles as a second class. Pure numpy + PIL, deterministic
per seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

MITO = 1
VESICLE = 2


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-ish noise smooth at ``scale`` pixels (bicubic upsampling of a coarse grid)."""
    gh, gw = max(2, int(np.ceil(h / scale)) + 2), max(2, int(np.ceil(w / scale)) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(coarse).resize((int(gw * scale), int(gh * scale)), Image.BICUBIC)
    field = np.asarray(img, dtype=np.float32)[:h, :w]
    return (field - field.mean()) / (field.std() + 1e-6)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (PIL cannot blur float images; scipy is not a dependency)."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    out = a.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        out = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return out


def _membranes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Membrane darkness in [0, 1]: thin ridges along boundaries of a warped Voronoi tiling."""
    n_cells = max(3, int(h * w / 160**2))
    seeds = rng.uniform((0, 0), (h, w), size=(n_cells, 2)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = 0.04 * (h + w) / 2
    yy = yy + warp * _smooth_noise(rng, h, w, 60)
    xx = xx + warp * _smooth_noise(rng, h, w, 60)
    d1 = np.full((h, w), np.inf, np.float32)
    d2 = np.full((h, w), np.inf, np.float32)
    for sy, sx in seeds:
        d = np.sqrt((yy - sy) ** 2 + (xx - sx) ** 2)
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    gap = (d2 - d1) / 2  # ~distance to the nearest boundary
    width = 1.6 + 0.6 * _smooth_noise(rng, h, w, 40).clip(-1, 1)
    return np.exp(-((gap / width) ** 2))


def _ellipse_coords(
    shape: tuple[int, int], cy: float, cx: float, a: float, b: float, theta: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Bounding box plus, inside it, coordinates along the major (u) and minor (v) axes,
    normalised so the ellipse boundary is u² + v² = 1."""
    h, w = shape
    r = int(np.ceil(a)) + 3
    y0, y1, x0, x1 = (
        max(0, int(cy) - r),
        min(h, int(cy) + r + 1),
        max(0, int(cx) - r),
        min(w, int(cx) + r + 1),
    )
    y1, x1 = max(y0, y1), max(x0, x1)  # centre may lie off the image
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    return (slice(y0, y1), slice(x0, x1)), (dx * c + dy * s) / a, (-dx * s + dy * c) / b


def synthetic_em(height: int, width: int, seed: int = 0, n_classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image, mask)``, both uint8 HxW; mask is 1 inside mitochondria and, when
    ``n_classes >= 2``, 2 inside vesicles."""
    if n_classes not in (1, 2):
        raise ValueError("n_classes must be 1 or 2")
    rng = np.random.default_rng(seed)
    h, w = int(height), int(width)

    # Cytoplasm: mid grey with coarse and fine texture.
    img = 158 + 10 * _smooth_noise(rng, h, w, 48) + 7 * _smooth_noise(rng, h, w, 6)
    membrane = _membranes(rng, h, w)
    img = img * (1 - 0.55 * membrane)
    mask = np.zeros((h, w), np.uint8)
    blocked = membrane > 0.2  # organelles sit inside cells, not across membranes

    # Mitochondria: aim for ~6-10 % foreground whatever the image size.
    target = rng.uniform(0.06, 0.10) * h * w
    covered, attempts = 0.0, 0
    while covered < target and attempts < 400:
        attempts += 1
        b = rng.uniform(7, 14)
        a = b * rng.uniform(1.6, 3.5)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        box, u, v = _ellipse_coords((h, w), cy, cx, a, b, rng.uniform(0, np.pi))
        r = np.sqrt(u**2 + v**2)
        inside = r <= 1.0
        halo = r <= 1.25  # keep a little cytoplasm between neighbours
        if not inside.any() or (halo & (blocked[box] | (mask[box] > 0))).any():
            continue
        period = rng.uniform(5, 8)  # cristae: lamellae across the long axis
        phase = rng.uniform(0, 2 * np.pi)
        wobble = 0.6 * np.sin(v * rng.uniform(1.5, 3.0) + phase)
        cristae = 0.5 + 0.5 * np.cos(2 * np.pi * (u * a) / period + wobble)
        inner = 122 - 48 * cristae
        gy, gx = np.gradient(r)
        depth = (1 - r) / (np.hypot(gy, gx) + 1e-6)  # ~pixels inside the boundary
        outer_ring = (depth >= 0) & (depth < 1.3)
        inner_ring = (depth >= 2.2) & (depth < 3.4)
        tone = np.where(outer_ring | inner_ring, 50.0, np.where(depth < 2.2, 135.0, inner))
        region = img[box]
        region[inside] = tone[inside]
        mask[box][inside] = MITO
        covered += float(inside.sum())

    if n_classes >= 2:
        for _ in range(max(2, int(h * w / 120**2))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            for _ in range(int(rng.integers(6, 16))):
                rad = rng.uniform(4, 8)
                vy, vx = cy + rng.normal(0, 14), cx + rng.normal(0, 14)
                box, u, v = _ellipse_coords((h, w), vy, vx, rad, rad, 0.0)
                r = np.sqrt(u**2 + v**2)
                inside = r <= 1.0
                if not inside.any() or ((r <= 1.3) & (blocked[box] | (mask[box] > 0))).any():
                    continue
                ring = (1 - r) * rad < 1.4
                tone = np.where(ring, 70.0, 185.0)
                img[box][inside] = tone[inside]
                mask[box][inside] = VESICLE

    # Acquisition: slight blur (PSF), global contrast jitter, shot + read noise.
    img = _blur(img, 0.9)
    img = (img - 128) * rng.uniform(0.9, 1.1) + 128 + rng.uniform(-8, 8)
    gain = 0.35  # grey levels per detected electron: shot noise sigma ~7 at mid grey
    img = rng.poisson(np.clip(img, 0, None) / gain).astype(np.float32) * gain
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def write_demo_images(
    out_dir: str | Path,
    n: int = 12,
    size: int | tuple[int, int] = 512,
    seed: int = 0,
    *,
    n_classes: int = 1,
    masks: bool = False,
) -> list[Path]:
    """Write ``n`` synthetic sections as PNGs (masks, 0/label values, under ``masks/``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = (size, size) if isinstance(size, int) else size
    paths = []
    for i in range(n):
        image, mask = synthetic_em(h, w, seed=seed + i, n_classes=n_classes)
        path = out / f"synthetic_{seed + i:04d}.png"
        Image.fromarray(image).save(path)
        if masks:
            (out / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask).save(out / "masks" / path.name)
        paths.append(path)
    return paths
