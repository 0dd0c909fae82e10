"""Whole-image prediction in overlapping tiles, so any image size fits in bounded memory.

The network sees each tile once (or T times with Monte-Carlo dropout); tiles are
blended with a window that fades over the overlap, so tile borders leave no seams.
Memory for the network is bounded by the tile size; the output is C x H x W float32.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ml_backend.config import TILE, TILE_OVERLAP
from ml_backend.learner.network import UNet


def to_grey(image: np.ndarray) -> np.ndarray:
    """A 2-D greyscale view: grey+alpha keeps its grey channel, RGB(A) becomes luminance."""
    if image.ndim == 3 and image.shape[2] == 2:
        return image[..., 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D greyscale, grey+alpha or RGB image, got shape {image.shape}")
    return image


def _subsample(image: np.ndarray, pixels: int = 65536) -> np.ndarray:
    step = max(1, int(np.sqrt(image.size / pixels)))
    return image[::step, ::step].astype(np.float32, copy=False).ravel()


def intensity_window(
    images: Iterable[np.ndarray], low: float = 1.0, high: float = 99.0
) -> tuple[float, float]:
    """Percentiles (`low`, `high`) of the images' pixels pooled (a subsample of each).

    The statistics of the data set rather than of one crop: a patch full of dark
    mitochondria is then stretched exactly like the same pixels inside a whole section.
    """
    sample = np.concatenate([_subsample(to_grey(np.asarray(im))) for im in images])
    if sample.size == 0:
        raise ValueError("no pixels to estimate an intensity window from")
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    return lo, hi if hi > lo else lo + 1.0


def normalize_image(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Map `window` (lo, hi) to [-1, 1] as float32, clipped to [-1.5, 1.5].

    `window` is a trained network's (`UNet.intensity_window`); without one, the image's
    own 1-99 % percentiles, so any bit depth or intensity range looks alike.
    """
    grey = to_grey(image)
    lo, hi = window if window is not None else intensity_window([grey])
    out = grey.astype(np.float32)
    out -= lo
    out *= 2.0 / max(hi - lo, 1e-12)
    out -= 1.0
    np.clip(out, -1.5, 1.5, out=out)
    return out


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile`; the last one ends at the border."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_window(height: int, width: int, overlap: int) -> np.ndarray:
    """Weights that ramp linearly from the tile edge over `overlap` pixels (never zero)."""

    def ramp(n: int) -> np.ndarray:
        if overlap <= 0:
            return np.ones(n, np.float32)
        pos = np.arange(n, dtype=np.float32)
        edge = np.minimum(pos + 1, n - pos) / (overlap + 1)
        return np.clip(edge, 0.0, 1.0)

    return np.outer(ramp(height), ramp(width)).astype(np.float32)


# Measured marginal memory of `predict_image` + brush masks (2048² and 4096², 2 and 5 classes,
# CPU): 8-10 bytes per pixel and class (the probabilities and their blend), beside a fixed
# few hundred MB for one tile's activations. 12 leaves room.
PREDICTION_BYTES_PER_PIXEL_CLASS = 12


class PredictionTooLarge(ValueError):
    """An image whose prediction would take more memory than allowed (MAX_PREDICT_MB)."""


def check_prediction_size(shape: tuple[int, ...], n_classes: int, max_bytes: int) -> None:
    """Refuse before the forward pass: memory grows with pixels × classes."""
    height, width = shape[:2]
    needed = height * width * n_classes * PREDICTION_BYTES_PER_PIXEL_CLASS
    if needed > max_bytes:
        raise PredictionTooLarge(
            f"a {height}x{width} image with {n_classes} classes needs about {needed >> 20} MB to predict,"
            f" more than MAX_PREDICT_MB ({max_bytes >> 20}); cut it into patches (scripts/push_volume.py)"
        )


@dataclass
class ImagePrediction:
    probs: np.ndarray  # (C, H, W) float32 softmax probabilities
    embedding: np.ndarray | None = None  # (D,) bottleneck features, area-weighted over tiles
    forward_seconds: float = 0.0  # time inside the network, for the latency breakdown in /metrics


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


def _tiles(
    pixels: np.ndarray, th: int, tw: int, overlap: int, device: torch.device, multiple: int
) -> Iterator[tuple[int, int, torch.Tensor, int, int]]:
    """(y, x, padded channels-last batch of one tile, tile height, tile width) over the image."""
    height, width = pixels.shape
    for y in tile_starts(height, th, overlap):
        for x in tile_starts(width, tw, overlap):
            crop = torch.from_numpy(np.ascontiguousarray(pixels[y : y + th, x : x + tw]))[None, None]
            if device.type == "cuda":  # page-locked: the copy overlaps the work already queued
                crop = crop.pin_memory()
            batch, h, w = pad_to_multiple(crop.to(device, non_blocking=True), multiple)
            yield y, x, batch.contiguous(memory_format=torch.channels_last), h, w


@torch.inference_mode()
def embed_image(net: UNet, image: np.ndarray, *, tile: int = TILE, overlap: int = TILE_OVERLAP) -> np.ndarray:
    """Bottleneck embedding (D,) of an image of any size, area-weighted over tiles, without the
    decoder; equal to `predict_image(..., with_embedding=True).embedding`."""
    device = next(net.parameters()).device
    pixels = normalize_image(image, net.intensity_window)
    th, tw = min(tile, pixels.shape[0]), min(tile, pixels.shape[1])
    total, area = None, 0
    for _, _, batch, h, w in _tiles(pixels, th, tw, overlap, device, net.config.size_multiple):
        emb = net.embed(batch)[0].float().cpu().numpy()
        total = emb * (h * w) + (0 if total is None else total)
        area += h * w
    return (total / float(area)).astype(np.float32)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Inference precision: bfloat16 on CUDA (float16 where bfloat16 is not native), float32
    elsewhere. On VNC sections the masks agree with float32 on >= 99.9 % of the pixels
    (tests/test_inference_precision.py); on CPU float32 stays, as reduced precision is not
    faster there for this network."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if bfloat16_supported(device) else torch.float16


def bfloat16_supported(device: torch.device) -> bool:
    """Whether autocast to bfloat16 runs natively here (otherwise it is emulated, and slower).

    On CPU that takes AVX-512 BF16 or AMX instructions. oneDNN's own check accepts any AVX-512
    CPU and then emulates bfloat16: a training step took 1.9x as long as in float32 on an Ice Lake
    Xeon (`benchmarks/bench_throughput.py`, README "Throughput and the GPU path").
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = (
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return any(bool(check()) for check in checks if check is not None)


def default_tile_batch(device: torch.device) -> int:
    """Tiles per forward pass: a GPU is kept busy by several at once, a CPU gains nothing."""
    return 8 if device.type == "cuda" else 1


def _batches(tiles: Iterator[tuple[int, int, torch.Tensor, int, int]], size: int) -> Iterator[list]:
    while group := list(itertools.islice(tiles, size)):
        yield group


@torch.inference_mode()
def predict_image(
    net: UNet,
    image: np.ndarray,
    *,
    tile: int = TILE,
    overlap: int = TILE_OVERLAP,
    device: torch.device | None = None,
    mc_dropout: bool = False,
    with_embedding: bool = False,
    precision: torch.dtype | None | str = "auto",
    tile_batch: int | None = None,
) -> ImagePrediction:
    """Softmax probabilities for one image of any size (and optionally its embedding).

    `precision`: "auto" (`autocast_dtype`), None for float32, or an autocast dtype;
    `tile_batch`: tiles per forward pass (all tiles of an image have one shape), by default
    `default_tile_batch`.
    """
    device = device or next(net.parameters()).device
    dtype = autocast_dtype(device) if precision == "auto" else precision
    tile_batch = max(1, tile_batch or default_tile_batch(device))
    pixels = normalize_image(image, net.intensity_window)
    height, width = pixels.shape
    th, tw = min(tile, height), min(tile, width)
    ys, xs = tile_starts(height, th, overlap), tile_starts(width, tw, overlap)
    single = len(ys) == len(xs) == 1  # the common case: no blending needed
    acc = None if single else np.zeros((net.config.n_classes, height, width), np.float32)
    weight_sum = None if single else np.zeros((height, width), np.float32)
    window = None if single else blend_window(th, tw, overlap)
    embedding_sum, area_sum, forward_seconds = None, 0, 0.0
    net.set_mc_dropout(mc_dropout)
    tiles = _tiles(pixels, th, tw, overlap, device, net.config.size_multiple)
    try:
        for group in _batches(tiles, tile_batch):
            batch = group[0][2] if len(group) == 1 else torch.cat([t[2] for t in group])
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                if with_embedding:
                    logits, embs = net(batch, return_embedding=True)
                else:
                    logits, embs = net(batch), None
            if logits.is_cuda:
                torch.cuda.synchronize()
            forward_seconds += time.perf_counter() - started
            for i, (y, x, _, h, w) in enumerate(group):
                if embs is not None:
                    emb = embs[i].float().cpu().numpy()
                    embedding_sum = emb * (h * w) + (0 if embedding_sum is None else embedding_sum)
                    area_sum += h * w
                probs = torch.softmax(logits[i, :, :h, :w].float(), dim=0).cpu().numpy()
                if single:
                    acc = probs
                else:
                    acc[:, y : y + h, x : x + w] += probs * window
                    weight_sum[y : y + h, x : x + w] += window
    finally:
        net.set_mc_dropout(False)
    if not single:
        acc /= weight_sum
    embedding = None
    if embedding_sum is not None:
        embedding = (embedding_sum / float(area_sum)).astype(np.float32)
    return ImagePrediction(probs=acc, embedding=embedding, forward_seconds=forward_seconds)


def mask_agreement(
    net: UNet,
    images: Iterable[np.ndarray],
    dtype: torch.dtype,
    *,
    tile: int = TILE,
    overlap: int = TILE_OVERLAP,
) -> float:
    """Fraction of pixels whose class under `dtype` autocast (tiles batched as on a GPU) is the
    class float32 gives one tile at a time: what reduced precision changes in the masks a user sees.

    Raises RuntimeError where this device's autocast does not run `dtype`.
    """
    agree = total = 0
    for image in images:
        reference = predict_image(net, image, tile=tile, overlap=overlap, precision=None, tile_batch=1)
        reduced = predict_image(net, image, tile=tile, overlap=overlap, precision=dtype, tile_batch=8)
        agree += int((reduced.probs.argmax(0) == reference.probs.argmax(0)).sum())
        total += reference.probs[0].size
    return agree / total if total else 1.0
