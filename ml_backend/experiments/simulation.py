"""The papers' active-learning simulation, with the ground truth as the oracle.

Protocol (Roels & Saeys): the labelled volume is split halfway along y; the top half
gives a pool of 2-D patches to query, the bottom half is the test set. Each chain
(strategy, seed) starts from the seed's initial labelled patches and initial model
(trained once per seed and copied, so strategies compare paired), then each round
selects ``batch`` patches with the strategy, adds them, fine-tunes from the previous
round's weights for a fixed number of steps and evaluates IoU on the whole test half. A
model trained on the whole pool gives the full-supervision reference.

A strategy named ``<score strategy>+clusters`` (e.g. ``entropy+clusters``) ranks the whole
unlabelled pool, clusters it (:func:`sdk.strategies.cluster_labels`) and takes the batch in
the order Label Studio serves such a ranking between two training runs
(:func:`sdk.priority.serving_order`): the closed loop's queue, annotated ``batch`` tasks deep.
Every row of a strategy that scores the pool records its batch's diversity: distinct clusters,
mean pairwise embedding distance, and the fraction of picks overlapping another pick within one
section.

Everything a chain needs to continue (weights, labelled patches, last result) is saved
after each round, and results are appended to ``results.jsonl``, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ml_backend.experiments.simulation_setup import (
    FULL,
    RESULTS,
    Pool,
    Row,
    SimConfig,
    make_pool,
    near_fraction,
    parse_strategy,
)
from ml_backend.learner.network import UNet, build_unet
from ml_backend.learner.scoring import score_pool
from ml_backend.learner.training import evaluate, fine_tune
from sdk.atomic import atomic_write_bytes
from sdk.labelled_volume import Data
from sdk.priority import serving_order
from sdk.strategies import (
    ceal_threshold,
    cluster_labels,
    get_strategy,
    select,
    select_ceal,
)


def batch_diversity(embeddings: np.ndarray, clusters: np.ndarray, picked: np.ndarray) -> dict:
    """Distinct clusters among the picks (of the pool's), and their mean pairwise embedding distance."""
    x = embeddings[picked].astype(np.float64)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=-1))
    pairs = len(picked) * (len(picked) - 1)
    return {
        "batch_clusters": len(set(clusters[picked].tolist())),
        "pool_clusters": int(clusters.max()) + 1,
        "batch_distance": round(float(d.sum() / pairs), 6) if pairs else 0.0,
    }


def read_results(path: Path) -> list[Row]:
    """Rows of a results.jsonl (a torn last line from a crash is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def finished_rounds(path: Path) -> set[tuple[str, int, int]]:
    """(strategy, seed, round) of every row in a results.jsonl."""
    return {(r["strategy"], r["seed"], r["round"]) for r in read_results(path)}


def _atomic_save(obj: object, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class Simulation:
    """Runs and resumes the chains of one output folder."""

    def __init__(self, out: Path, config: SimConfig, data: Data, *, device: torch.device | None = None):
        config.check()
        self.out, self.config, self.data = Path(out), config, data
        self.unet = replace(config.unet(), n_classes=1 + len(data.classes))
        self.device = device or torch.device("cpu")
        self.results = self.out / RESULTS
        self._pools: dict[int, Pool] = {}
        self._check_config()
        self.reload()

    def reload(self) -> None:
        """Re-read which rounds are done (other processes append rows too)."""
        self.done = finished_rounds(self.results)

    def _check_config(self) -> None:
        path = self.out / "config.json"
        # Volumes relative to the results folder: a clone elsewhere with the same layout resumes.
        volumes = {k: os.path.relpath(self.data.source[k], self.out.resolve()) for k in ("raw", "labels")}
        current = {**asdict(self.config), **self.data.source, **volumes}
        if path.exists():
            stored = json.loads(path.read_text())
            diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
            if diff:
                raise ValueError(
                    f"{self.out} holds results of another configuration (differs in {', '.join(diff)}); "
                    "use another --out"
                )
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(current, indent=2) + "\n")

    # -- bookkeeping ------------------------------------------------------------------------
    def pool(self, seed: int) -> Pool:
        if seed not in self._pools:
            self._pools[seed] = make_pool(self.data, self.config, seed)
        return self._pools[seed]

    def _state_path(self, strategy: str, seed: int) -> Path:
        return self.out / "state" / f"seed{seed}" / f"{strategy}.pt"

    def _append(self, row: Row) -> None:
        key = (row["strategy"], row["seed"], row["round"])
        if key in self.done:
            return
        with self.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.done.add(key)

    def has_initial(self, seed: int) -> bool:
        return self._state_path("initial", seed).exists()

    def _load(self, strategy: str, seed: int) -> dict | None:
        path = self._state_path(strategy, seed)
        return torch.load(path, weights_only=False) if path.exists() else None

    def _net(self, state_dict: dict) -> UNet:
        net = build_unet(self.unet)
        net.load_state_dict(state_dict)
        return net.to(self.device)

    def _evaluate(self, net: UNet) -> dict:
        return evaluate(net, self.data.test_images, self.data.test_masks, tile=self.config.eval_tile)

    def _train(
        self,
        net: UNet,
        pool: Pool,
        images: Sequence,
        masks: Sequence,
        steps: int,
        seed: int,
        *,
        learning_rate: float,
        keep_start: bool,
        batch_size: int | None = None,
    ) -> dict:
        return fine_tune(
            net,
            list(images),
            list(masks),
            self.config.train(steps, seed, learning_rate, batch_size),
            val_images=pool.val_images,
            val_masks=pool.val_masks,
            device=self.device,
            keep_start=keep_start,
        )

    # -- the protocol -----------------------------------------------------------------------
    def initial(self, seed: int) -> dict:
        """The seed's initial labelled set and model (trained once, shared by every strategy)."""
        state = self._load("initial", seed)
        if state is None:
            started = time.perf_counter()
            pool = self.pool(seed)
            labeled = select("random", self.config.initial, n=len(pool.images), seed=seed).tolist()
            net = build_unet(self.unet, seed=seed).to(self.device)
            images, masks = pool.images[labeled], pool.masks[labeled]
            cfg = self.config
            info = self._train(
                net, pool, images, masks, cfg.initial_steps, seed * 1000, learning_rate=cfg.learning_rate,
                keep_start=False,
            )  # fmt: skip
            row = self._row("initial", seed, 0, len(labeled), self._evaluate(net), info, started)
            state = {"round": 0, "labeled": labeled, "state_dict": net.state_dict(), "row": row}
            _atomic_save(state, self._state_path("initial", seed))
        return state

    def full(self, seed: int) -> None:
        """The full-supervision reference: the initial model trained on the whole pool for
        `full_steps` of `full_batch_size` crops at the initial model's learning rate (what a fresh
        model gets, as the pool is far from the initial patches), its final weights kept."""
        if (FULL, seed, 0) in self.done:
            return
        started = time.perf_counter()
        pool = self.pool(seed)
        net = self._net(self.initial(seed)["state_dict"])
        cfg = self.config
        info = self._train(
            net, pool, pool.images, pool.masks, cfg.full_steps, seed * 1000 + 999,
            learning_rate=cfg.learning_rate, keep_start=False, batch_size=cfg.full_batch_size,
        )  # fmt: skip
        self._append(self._row(FULL, seed, 0, len(pool.images), self._evaluate(net), info, started))

    def step(self, strategy: str, seed: int, round_: int) -> None:
        """Bring chain (strategy, seed) to `round_` (0 = the initial model), if not there yet."""
        if (strategy, seed, round_) in self.done:
            return
        state = self._load(strategy, seed)
        if state is not None and state["round"] >= round_:  # saved, but the row was lost in a crash
            if state["round"] == round_:
                self._append({**state["row"], "strategy": strategy})
            return
        if round_ == 0 or state is None:
            initial = self.initial(seed)
            if round_ == 0:
                self._append({**initial["row"], "strategy": strategy})
                return
            state = initial
        if state["round"] != round_ - 1:
            raise ValueError(f"{strategy} seed {seed}: saved round {state['round']}, cannot run {round_}")
        started = time.perf_counter()
        pool, labeled = self.pool(seed), list(state["labeled"])
        net = self._net(state["state_dict"])
        query, pseudo, pseudo_labels, diversity = self._query(strategy, net, pool, labeled, seed, round_)
        labeled += query
        images = [*pool.images[labeled], *pool.images[pseudo]]
        masks = [*pool.masks[labeled], *pseudo_labels]
        cfg = self.config
        info = self._train(
            net, pool, images, masks, cfg.round_steps, seed * 1000 + round_,
            learning_rate=cfg.round_learning_rate, keep_start=cfg.keep_start,
        )  # fmt: skip
        row = self._row(strategy, seed, round_, len(labeled), self._evaluate(net), info, started)
        row["pseudo"] = len(pseudo)
        row |= diversity
        row["batch_near"] = round(near_fraction(pool.positions[query], cfg.patch), 6)
        state = {"round": round_, "labeled": labeled, "state_dict": net.state_dict(), "row": row}
        _atomic_save(state, self._state_path(strategy, seed))
        self._append(row)

    def _query(
        self, strategy: str, net: UNet, pool: Pool, labeled: list[int], seed: int, round_: int
    ) -> tuple[list[int], list[int], list[np.ndarray], dict]:
        """Pool indices for the oracle, CEAL's pseudo-labelled indices and labels, and the
        batch's diversity (:func:`batch_diversity`; empty for random, which scores nothing)."""
        cfg = self.config
        strategy, clustered = parse_strategy(strategy)
        taken = set(labeled)
        rest = np.array([i for i in range(len(pool.images)) if i not in taken], dtype=np.int64)
        k, select_seed = min(cfg.batch, len(rest)), seed * 1000 + round_
        spec = get_strategy(strategy)
        if not spec.needs_model_outputs:
            return rest[select("random", k, n=len(rest), seed=select_seed)].tolist(), [], [], {}
        common = {"mc_samples": cfg.mc_samples, "batch_size": 16, "device": self.device, "progress": False}
        scores = score_pool(
            net, pool.images[rest], strategy, keep_probs=strategy == "ceal", seed=seed, **common
        )
        clusters = cluster_labels(scores.embeddings, seed=select_seed)
        if strategy == "ceal":
            threshold = ceal_threshold(cfg.ceal_delta0, cfg.ceal_decay, round_ - 1)
            sel = select_ceal(
                k,
                threshold=threshold,
                probs=scores.probs,
                scores=scores.scores,
                max_pseudo=cfg.ceal_max_pseudo,
            )
            labels = [lab.astype(np.uint8) for lab in sel.pseudo_labels]
            diversity = batch_diversity(scores.embeddings, clusters, sel.query)
            return rest[sel.query].tolist(), rest[sel.pseudo].tolist(), labels, diversity
        labeled_emb = None
        if spec.uses_labeled_embeddings:
            labeled_emb = score_pool(net, pool.images[labeled], None, **common).embeddings
        ranked = len(rest) if clustered else k  # Label Studio serves from the whole ranked queue
        picked = scores.select(strategy, ranked, labeled_embeddings=labeled_emb, seed=select_seed)
        if clustered:
            picked = picked[serving_order(clusters[picked], k)]
        return rest[picked].tolist(), [], [], batch_diversity(scores.embeddings, clusters, picked)

    def _row(
        self, strategy: str, seed: int, round_: int, n_labeled: int, scores: dict, info: dict, started: float
    ) -> Row:
        return {
            "strategy": strategy,
            "seed": seed,
            "round": round_,
            "labeled": n_labeled,
            "iou": round(scores["iou"], 6),
            "dice": round(scores["dice"], 6),
            "steps": int(info["steps"]),
            "kept_start": bool(info["kept_start"]),
            "seconds": round(time.perf_counter() - started, 2),
        }

    def run(
        self,
        strategies: Iterable[str],
        seeds: Iterable[int],
        *,
        full: bool = True,
        on_step: Callable[[str, int, int], None] | None = None,
    ) -> None:
        """All chains round by round (every strategy and seed advance together), then (with
        `full`) the full-supervision references."""
        strategies, seeds = list(strategies), list(seeds)
        for strategy in strategies:
            parse_strategy(strategy)
        for round_ in range(self.config.rounds + 1):
            for seed in seeds:
                for strategy in strategies:
                    self.step(strategy, seed, round_)
                    if on_step:
                        on_step(strategy, seed, round_)
        for seed in seeds if full else ():
            self.full(seed)
            if on_step:
                on_step(FULL, seed, 0)

    def chain(self, strategy: str, seed: int) -> None:
        """Every round of one chain (FULL: the full-supervision reference of the seed)."""
        if strategy == FULL:
            self.full(seed)
            return
        for round_ in range(self.config.rounds + 1):
            self.step(strategy, seed, round_)

    def work(self, strategies: Sequence[str], seeds: Sequence[int], full: bool = True) -> tuple[int, int]:
        """(finished, total) steps of a run, for the progress bar."""
        keys = [(s, seed, r) for r in range(self.config.rounds + 1) for seed in seeds for s in strategies]
        keys += [(FULL, seed, 0) for seed in seeds if full]
        return sum(k in self.done for k in keys), len(keys)
