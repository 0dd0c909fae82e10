"""What a simulation run is: its configuration (everything that changes the numbers), the strategy
names it accepts, the labelled volume it reads, and each seed's pool of patches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml_backend.config import TILE
from ml_backend.learner.network import UNetConfig
from ml_backend.learner.training import TrainConfig
from sdk.labelled_volume import Data, load_labelled_volume
from sdk.strategies import (
    SCORE_STRATEGIES,
    get_strategy,
)
from sdk.tiling import parse_classes, patch_grid, read_patch

RESULTS = "results.jsonl"
FULL = "full"  # the strategy name of the full-supervision reference rows
CLUSTERS = "+clusters"  # strategy suffix: the batch Label Studio serves from a clustered ranking
Row = dict


def parse_strategy(name: str) -> tuple[str, bool]:
    """(base strategy, served by clusters) of a simulation strategy name."""
    base = get_strategy(name.removesuffix(CLUSTERS)).name
    if base != name and base not in SCORE_STRATEGIES:
        raise ValueError(
            f"{name!r}: {CLUSTERS} needs a ranking by score ({', '.join(SCORE_STRATEGIES)}); "
            "diversity strategies spread their picks themselves"
        )
    return base, base != name


@dataclass(frozen=True)
class SimConfig:
    """Everything that changes the numbers; stored with the results so a resume cannot mix runs."""

    pool_size: int = 2000
    initial: int = 20
    batch: int = 20
    rounds: int = 10
    patch: int = 128
    base_channels: int = 4
    depth: int = 5
    dropout: float = 0.1
    batch_size: int = 16
    initial_steps: int = 1500
    round_steps: int = 300
    full_steps: int = 4000
    full_batch_size: int = 32  # one model on the whole pool affords larger batches than a chain
    learning_rate: float = 2e-3  # peak for the initial model and full supervision (from scratch)
    round_learning_rate: float = 5e-4  # peak for a round's fine-tuning of the previous weights
    weight_decay: float = TrainConfig.weight_decay
    # False: every round keeps its trained weights, as in the papers. True keeps the previous ones
    # when they score better on the validation patches (the worker's safety net); with 48 patches
    # and 2 % foreground that locked a VNC chain at its poor initial model (0.30 val, 0.15 test).
    keep_start: bool = False
    val_patches: int = 48
    mc_samples: int = 8
    ceal_delta0: float = 0.05
    ceal_decay: float = 0.005
    ceal_max_pseudo: int = 10
    sections: int = 0  # 0: all sections
    crop: int = 0  # 0: whole sections; else the top-left crop x crop of each (tests)
    eval_tile: int = TILE

    def unet(self) -> UNetConfig:
        return UNetConfig(base_channels=self.base_channels, depth=self.depth, dropout=self.dropout)

    def train(
        self, steps: int, seed: int, learning_rate: float, batch_size: int | None = None
    ) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            patch_size=self.patch,
            batch_size=batch_size or self.batch_size,
            learning_rate=learning_rate,
            weight_decay=self.weight_decay,
            val_crops=self.val_patches,
            seed=seed,
        )

    def check(self) -> None:
        if min(self.pool_size, self.initial, self.batch, self.patch, self.val_patches) < 1 or self.rounds < 0:
            raise ValueError("pool, initial, batch, patch and val patches must be >= 1, rounds >= 0")
        if self.initial + self.batch * self.rounds > self.pool_size:
            raise ValueError(
                f"initial + batch * rounds = {self.initial + self.batch * self.rounds} exceeds the pool "
                f"of {self.pool_size} patches"
            )
        if self.patch % 2**self.depth:
            raise ValueError(f"patch {self.patch} must be a multiple of 2**depth = {2**self.depth}")


VNC_CLASSES = "mitochondria=1-255"  # VNC's masks: modes "1" (0/1) and "L" (0/255 and stray greys)


@dataclass(frozen=True)
class DataSource:
    """The labelled volume of a run, as paths: worker processes load it themselves."""

    raw: str
    labels: str
    classes: str | None = None  # a `parse_classes` spec; None: each non-zero label value is a class

    def load(self, config: SimConfig) -> Data:
        classes = None if self.classes is None else parse_classes(self.classes)
        return load_labelled_volume(
            self.raw, self.labels, classes, sections=config.sections, crop=config.crop, patch=config.patch
        )


def vnc_source(vnc_dir: Path) -> DataSource:
    """Stack 1 of the VNC data: raw TIFFs and mitochondria PNG masks."""
    stack = Path(vnc_dir) / "stack1"
    for sub in ("raw", "mitochondria"):
        if not (stack / sub).is_dir():
            raise FileNotFoundError(f"VNC data not found: {stack / sub} is not a folder")
    return DataSource(str(stack / "raw"), str(stack / "mitochondria"), VNC_CLASSES)


def load_vnc(vnc_dir: Path, config: SimConfig) -> Data:
    """Stack 1 of the VNC data (mitochondria against the rest), split along y."""
    return vnc_source(vnc_dir).load(config)


@dataclass
class Pool:
    """One seed's pool and validation patches (disjoint grid positions of the query half)."""

    images: np.ndarray  # (n, p, p), the raw dtype
    masks: np.ndarray  # (n, p, p) uint8 class ids
    positions: np.ndarray  # (n, 3) section, y, x of each patch's corner
    val_images: list[np.ndarray]
    val_masks: list[np.ndarray]


def make_pool(data: Data, config: SimConfig, seed: int) -> Pool:
    """Random positions on a half-overlapping grid; the validation patches are never queried."""
    grid = patch_grid(data.train_raw.shape, "z", config.patch, stride=max(1, config.patch // 2))
    need = config.pool_size + config.val_patches
    if need > len(grid):
        raise ValueError(f"pool + validation = {need} patches, but the query half holds only {len(grid)}")
    order = np.random.default_rng([seed, 7]).permutation(len(grid))[:need]
    patches = [grid[i] for i in order]
    images = np.stack([read_patch(data.train_raw, p) for p in patches])
    masks = np.stack([read_patch(data.train_mask, p) for p in patches])
    positions = np.array([(p.slice_index, p.y, p.x) for p in patches], dtype=np.int64)
    v = config.val_patches
    return Pool(images[v:], masks[v:], positions[v:], list(images[:v]), list(masks[:v]))


def near_fraction(positions: np.ndarray, patch: int) -> float:
    """Fraction of patches overlapping another one in the same or an adjacent section: the
    near-duplicates a batch should not spend labels on."""
    d = np.abs(positions[:, None, :] - positions[None, :, :])
    near = (d[..., 0] <= 1) & (d[..., 1] < patch) & (d[..., 2] < patch)
    np.fill_diagonal(near, False)
    return float(near.any(axis=1).mean()) if len(positions) else 0.0
