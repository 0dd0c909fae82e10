"""A simulation spread over processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ml_backend.experiments.simulation import Simulation, finished_rounds
from ml_backend.experiments.simulation_setup import FULL, RESULTS, DataSource, SimConfig, parse_strategy

# Chains are independent once their seed's initial model exists, so a run spreads them over
# processes (one torch thread each): on a 2-core machine two processes finish ~2x sooner than
# one process with two threads. Each process appends its own rows to results.jsonl (one small
# write per row, atomic with O_APPEND) and saves its own chains' state files.
COST = {"bald": 3.0, "hybrid": 1.6, "coreset": 1.5, "kmeans": 1.4, FULL: 2.0}  # rough, for ordering

_worker: Simulation | None = None


def _run_task(task: tuple[Path, SimConfig, DataSource, int, str, str, int]) -> None:
    """One seed's initial model or one chain, in a worker process (set up on its first task,
    so a setup error reaches the caller instead of a pool that respawns failing workers)."""
    global _worker
    out, config, source, threads, device, strategy, seed = task
    if _worker is None:
        torch.set_num_threads(threads)
        _worker = Simulation(out, config, source.load(config), device=torch.device(device))
    if strategy == "initial":
        _worker.initial(seed)
        return
    while not _worker.has_initial(seed):  # another process is training it (queued before any chain)
        time.sleep(1)
    _worker.chain(strategy, seed)


def run_parallel(
    out: Path,
    config: SimConfig,
    source: DataSource,
    strategies: Sequence[str],
    seeds: Sequence[int],
    *,
    jobs: int,
    threads: int = 1,
    device: str = "cpu",
    full: bool = True,
    on_poll: Callable[[], None] | None = None,
) -> None:
    """`Simulation.run` over `jobs` processes (on a GPU they share it): one queue of the seeds'
    initial models, then every chain, so a process that finishes an initial model goes on
    with a chain of a seed that is ready instead of idling until every seed's is."""
    import multiprocessing

    for strategy in strategies:
        parse_strategy(strategy)
    done = finished_rounds(Path(out) / RESULTS)
    rounds = {FULL: [0]}
    chains = [
        (s, seed)
        for seed in seeds
        for s in [*strategies, *([FULL] if full else [])]
        if any((s, seed, r) not in done for r in rounds.get(s, range(config.rounds + 1)))
    ]  # finished chains need neither their state files nor the initial model
    initial = sorted({("initial", seed) for _, seed in chains})
    chains.sort(key=lambda t: -COST.get(t[0], 1.0))  # longest first: the last process idles least
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    common = (Path(out), config, source, threads, device)
    tasks = [(*common, *t) for t in (*initial, *chains)]
    with context.Pool(jobs) as pool:  # leaving it terminates the others after an error
        results = pool.imap_unordered(_run_task, tasks, chunksize=1)  # taken in order
        pending = len(tasks)
        while pending:
            try:
                results.next(timeout=5)  # re-raises a worker's error
                pending -= 1
            except multiprocessing.TimeoutError:
                pass
            if on_poll:
                on_poll()
