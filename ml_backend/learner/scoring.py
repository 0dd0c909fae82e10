"""Score a pool of images with the backend's model, for active-learning selection.

:func:`score_pool` runs the network over images (several at a time when they fit one
tile, tiled exactly like the backend's predictions otherwise) and returns what
:func:`sdk.strategies.select` takes, reduced as it goes so that a large pool never
holds its N x C x H x W probabilities:

==================================  =========================  ============================
strategy                            network passes per image    kept per image
==================================  =========================  ============================
random, kmeans, coreset             encoder only                embedding (D,)
entropy, least_confidence, margin   1 deterministic             score + embedding
bald                                T with MC dropout           score + embedding
ceal, hybrid                        as their ``uncertainty``    score + embedding
==================================  =========================  ============================

Scores are :func:`sdk.strategies.image_score` of each image (BALD accumulated over the
T samples without storing them). ``keep_probs`` / ``keep_mc_probs`` materialise the pool
arrays instead (equal image sizes only), ``keep_maps`` keeps the pixel-wise uncertainty
maps and ``keep_labels`` the argmax masks, for the few images that need them.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ml_backend.config import TILE, TILE_OVERLAP
from ml_backend.learner.inference import embed_image, normalize_image, pad_to_multiple, predict_image
from ml_backend.learner.network import UNet, default_device
from sdk.atomic import atomic_write_bytes
from sdk.predictions import label_map
from sdk.strategies import get_strategy, reduce_pixels, select
from sdk.strategies.uncertainty import PIXEL_MAPS, pixel_bald, pixel_entropy

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int | None], None]  # (stage, images done, total or None)


def score_kind(strategy: str | None, uncertainty: str = "entropy") -> str | None:
    """The pixel-wise uncertainty a strategy ranks by; None when it uses no predictions."""
    return None if strategy is None else get_strategy(strategy).uncertainty(uncertainty)


@dataclass
class PoolScores:
    """One pool's model outputs, index-aligned with the images scored."""

    embeddings: np.ndarray  # (N, D) float32, bottleneck features averaged over space
    scores: np.ndarray | None = None  # (N,) float64 image_score of `score_kind`, higher = more informative
    score_kind: str | None = None
    probs: np.ndarray | None = None  # (N, C, H, W), only with keep_probs
    mc_probs: np.ndarray | None = None  # (T, N, C, H, W), only with keep_mc_probs
    uncertainty_maps: list[np.ndarray] | None = None  # (H_i, W_i) float32 maps of `map_kind`
    map_kind: str | None = None
    label_maps: list[np.ndarray] | None = None  # (H_i, W_i) argmax of the deterministic prediction
    shapes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def select(
        self,
        strategy: str,
        k: int,
        *,
        labeled_embeddings: np.ndarray | None = None,
        seed: int | None = None,
        **options: object,
    ) -> np.ndarray:
        """:func:`sdk.strategies.select` on these outputs: k indices, most informative first."""
        spec = get_strategy(strategy)
        inputs: dict[str, object] = {}
        if spec.needs_embeddings:
            inputs["embeddings"] = self.embeddings
        if spec.ranks_by_uncertainty:
            kind = spec.uncertainty(str(options.get("uncertainty", "entropy")))
            if self.scores is None or self.score_kind != kind:
                have = self.score_kind or "none"
                raise ValueError(f"{strategy} needs {kind} scores; these outputs have {have}")
            inputs["scores"] = self.scores
        if not inputs:
            inputs["n"] = len(self)
        return select(strategy, k, labeled_embeddings=labeled_embeddings, seed=seed, **inputs, **options)

    def save(self, path: Path, **extra: np.ndarray) -> None:
        """An .npz with the arrays (per-image maps as ``map_<i>`` / ``labels_<i>``), written atomically."""
        arrays: dict[str, np.ndarray] = {"embeddings": self.embeddings, **extra}
        for name in ("scores", "probs", "mc_probs"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        for prefix, items in (("map", self.uncertainty_maps), ("labels", self.label_maps)):
            for i, item in enumerate(items or []):
                arrays[f"{prefix}_{i}"] = item
        kinds = {"score_kind": self.score_kind or "", "map_kind": self.map_kind or ""}
        arrays |= {name: np.array(value) for name, value in kinds.items()}
        arrays["shapes"] = np.array(self.shapes, dtype=np.int64).reshape(-1, 2)
        buffer = _npz_bytes(arrays)
        atomic_write_bytes(Path(path), buffer)

    @classmethod
    def load(cls, path: Path) -> tuple[PoolScores, dict[str, np.ndarray]]:
        """The saved outputs and the extra arrays saved with them."""
        with np.load(path) as npz:
            data = {name: npz[name] for name in npz.files}
        n = data["embeddings"].shape[0]
        maps = [data.pop(f"map_{i}") for i in range(n) if f"map_{i}" in data] or None
        labels = [data.pop(f"labels_{i}") for i in range(n) if f"labels_{i}" in data] or None
        result = cls(
            embeddings=data.pop("embeddings"),
            scores=data.pop("scores", None),
            score_kind=str(data.pop("score_kind")) or None,
            probs=data.pop("probs", None),
            mc_probs=data.pop("mc_probs", None),
            uncertainty_maps=maps,
            map_kind=str(data.pop("map_kind")) or None,
            label_maps=labels,
            shapes=[(int(h), int(w)) for h, w in data.pop("shapes")],
        )
        return result, data


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


# -- the network passes -----------------------------------------------------------------------
@dataclass
class _Outputs:
    """What the passes produced for one image."""

    embedding: np.ndarray
    probs: np.ndarray | None = None  # deterministic (C, H, W)
    mc_sum: np.ndarray | None = None  # sum over T of the MC probabilities (C, H, W)
    mc_entropy_sum: np.ndarray | None = None  # sum over T of their pixel entropy (H, W)
    mc: list[np.ndarray] = field(default_factory=list)  # the T samples, only when kept


class _Passes:
    """Forward passes over a group: one batch when every image fits one tile, else one tiled image."""

    def __init__(self, net: UNet, device: torch.device, tile: int, overlap: int) -> None:
        self.net, self.device, self.tile, self.overlap = net, device, tile, overlap

    def fits_one_tile(self, image: np.ndarray) -> bool:
        return image.shape[0] <= self.tile and image.shape[1] <= self.tile

    def batch(self, group: list[np.ndarray]) -> tuple[torch.Tensor, int, int]:
        pixels = np.stack([normalize_image(im, self.net.intensity_window) for im in group])[:, None]
        x, h, w = pad_to_multiple(torch.from_numpy(pixels).to(self.device), self.net.config.size_multiple)
        return x.contiguous(memory_format=torch.channels_last), h, w

    def forward(self, x: torch.Tensor, h: int, w: int, mc: bool) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (B, C, h, w) and embeddings (B, D) of one pass, computed as predict_image does."""
        self.net.set_mc_dropout(mc)
        try:
            logits, emb = self.net(x, return_embedding=True)
        finally:
            self.net.set_mc_dropout(False)
        probs = torch.softmax(logits[:, :, :h, :w].float(), dim=1)
        return probs.cpu().numpy(), emb.float().cpu().numpy()

    def tiled(self, image: np.ndarray, mc: bool) -> tuple[np.ndarray, np.ndarray]:
        out = predict_image(
            self.net,
            image,
            tile=self.tile,
            overlap=self.overlap,
            device=self.device,
            mc_dropout=mc,
            with_embedding=True,
        )
        return out.probs[None], out.embedding[None]

    def embed(self, group: list[np.ndarray]) -> np.ndarray:
        """Embeddings only (no decoder): the same numbers predict_image's embedding gives."""
        if len(group) > 1 or self.fits_one_tile(group[0]):
            x, _, _ = self.batch(group)
            return self.net.embed(x).float().cpu().numpy()
        return embed_image(self.net, group[0], tile=self.tile, overlap=self.overlap)[None]

    def run(self, group: list[np.ndarray], *, det: bool, mc_samples: int, keep_mc: bool) -> list[_Outputs]:
        if not det and mc_samples == 0:
            return [_Outputs(embedding=e) for e in self.embed(group)]
        batched = len(group) > 1 or self.fits_one_tile(group[0])
        x, h, w = self.batch(group) if batched else (None, 0, 0)

        def one_pass(mc: bool) -> tuple[np.ndarray, np.ndarray]:
            return self.forward(x, h, w, mc) if batched else self.tiled(group[0], mc)

        outs: list[_Outputs] | None = None
        if det:
            probs, emb = one_pass(False)
            outs = [_Outputs(embedding=e, probs=p) for p, e in zip(probs, emb, strict=True)]
        for _ in range(mc_samples):
            probs, emb = one_pass(True)
            if outs is None:  # the encoder has no dropout: an MC pass gives the same embedding
                outs = [_Outputs(embedding=e) for e in emb]
            entropy = pixel_entropy(probs)
            for out, p, h_map in zip(outs, probs, entropy, strict=True):
                out.mc_sum = p.copy() if out.mc_sum is None else out.mc_sum + p
                out.mc_entropy_sum = h_map if out.mc_entropy_sum is None else out.mc_entropy_sum + h_map
                if keep_mc:
                    out.mc.append(p)
        assert outs is not None
        return outs


def _groups(images: Iterable[np.ndarray], passes: _Passes, batch_size: int) -> Iterator[list[np.ndarray]]:
    """Consecutive images of one shape that fit one tile, up to batch_size; larger images alone."""
    group: list[np.ndarray] = []
    for image in images:
        image = np.asarray(image)
        if not passes.fits_one_tile(image):
            if group:
                yield group
                group = []
            yield [image]
            continue
        if group and (group[0].shape[:2] != image.shape[:2] or len(group) >= batch_size):
            yield group
            group = []
        group.append(image)
    if group:
        yield group


def _pixel_map(kind: str, out: _Outputs, mc_samples: int) -> np.ndarray:
    if kind == "bald":
        if out.mc:
            return pixel_bald(np.stack(out.mc))
        bald = pixel_entropy(out.mc_sum / mc_samples)
        bald -= out.mc_entropy_sum / mc_samples
        return np.maximum(bald, 0, out=bald)
    return PIXEL_MAPS[kind](out.probs)


def score_pool(
    net: UNet,
    images: Iterable[np.ndarray],
    strategy: str | None = None,
    *,
    uncertainty: str = "entropy",
    mc_samples: int = 8,
    reduction: str = "sum",
    region_size: int = 16,
    region_quantile: float = 1.0,
    keep_probs: bool = False,
    keep_mc_probs: bool = False,
    keep_maps: bool = False,
    keep_labels: bool = False,
    tile: int = TILE,
    overlap: int = TILE_OVERLAP,
    batch_size: int = 4,
    device: torch.device | None = None,
    seed: int = 0,
    total: int | None = None,
    progress: bool = True,
    desc: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> PoolScores:
    """Model outputs for ``strategy`` over a pool (see the module table for what is computed).

    ``images`` may be a lazy iterable (pass ``total`` for the progress bar). The network
    moves to ``device`` (CUDA when present). MC dropout draws from a generator seeded with
    ``seed``, so a run is reproducible for the same pool, batch size and device.
    Maps for strategies without pixel uncertainty (random, kmeans, coreset) are entropy.
    """
    from tqdm import tqdm

    kind = score_kind(strategy, uncertainty)
    map_kind = (kind or "entropy") if keep_maps else None
    needs_mc = keep_mc_probs or "bald" in (kind, map_kind)
    needs_det = keep_probs or keep_labels or (kind not in (None, "bald")) or (map_kind not in (None, "bald"))
    if needs_mc and mc_samples < 1:
        raise ValueError(f"{kind or map_kind} needs mc_samples >= 1, got {mc_samples}")
    if kind is not None or map_kind is not None:
        # Validate the reduction options before the first (possibly long) pass.
        reduce_pixels(
            np.zeros((1, 1, 1), np.float32),
            reduction,
            region_size=region_size,
            region_quantile=region_quantile,
        )
    device = device or default_device()
    net = net.to(device).to(memory_format=torch.channels_last).eval()
    passes = _Passes(net, device, tile, overlap)
    t = mc_samples if needs_mc else 0
    if total is None and hasattr(images, "__len__"):
        total = len(images)

    embeddings, scores, probs, mc_probs, maps, labels, shapes = [], [], [], [], [], [], []
    desc = desc or f"scoring ({strategy or 'embeddings'})"
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr)
    cuda = device.type == "cuda"
    rng = torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda" if cuda else None)
    with rng, torch.inference_mode(), bar:
        torch.manual_seed(seed)
        for group in _groups(images, passes, batch_size):
            outs = passes.run(group, det=needs_det, mc_samples=t, keep_mc=keep_mc_probs)
            for image, out in zip(group, outs, strict=True):
                shapes.append(tuple(int(s) for s in image.shape[:2]))
                embeddings.append(out.embedding)
                pmap = _pixel_map(kind, out, t) if kind else None
                if kind:
                    reduced = reduce_pixels(
                        pmap[None], reduction, region_size=region_size, region_quantile=region_quantile
                    )
                    scores.append(float(reduced[0]))
                if map_kind:
                    maps.append(pmap if map_kind == kind else _pixel_map(map_kind, out, t))
                if keep_labels:
                    labels.append(label_map(out.probs))
                if keep_probs or keep_mc_probs:
                    if shapes[0] != shapes[-1]:
                        raise ValueError(
                            f"keep_probs/keep_mc_probs need images of one size, got {shapes[0]} and "
                            f"{shapes[-1]}; per-image scores (the default) work for any sizes"
                        )
                    if keep_probs:
                        probs.append(out.probs)
                    if keep_mc_probs:
                        mc_probs.append(np.stack(out.mc))
            bar.update(len(group))
            if on_progress:
                on_progress(len(embeddings))

    dim = net.config.base_channels * 2**net.config.depth
    return PoolScores(
        embeddings=np.stack(embeddings).astype(np.float32) if embeddings else np.zeros((0, dim), np.float32),
        scores=np.asarray(scores, dtype=np.float64) if kind else None,
        score_kind=kind,
        probs=np.stack(probs) if keep_probs and probs else None,
        mc_probs=np.stack(mc_probs, axis=1) if keep_mc_probs and mc_probs else None,
        uncertainty_maps=maps if map_kind else None,
        map_kind=map_kind,
        label_maps=labels if keep_labels else None,
        shapes=shapes,
    )
