"""scripts/simulate.py end to end on a tiny VNC pool: results rows, resume, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VNC = REPO.parent / "shared" / "data" / "vnc"
pytestmark = pytest.mark.skipif(
    not (VNC / "stack1" / "raw").is_dir() or not (VNC / "stack1" / "mitochondria").is_dir(),
    reason=f"VNC data not found at {VNC}",
)

STRATEGIES = ("random", "bald", "coreset")  # bald needs MC dropout, coreset embeddings
SEEDS, ROUNDS = 2, 2
TINY = [
    "--strategies", ",".join(STRATEGIES), "--seeds", str(SEEDS), "--rounds", str(ROUNDS),
    "--pool", "12", "--initial", "4", "--batch", "2", "--patch", "64", "--sections", "2", "--crop", "256",
    "--base-channels", "4", "--depth", "2", "--initial-steps", "6", "--round-steps", "4",
    "--full-steps", "6", "--val-patches", "2", "--mc-samples", "2", "--quiet", "--jobs", "1",
]  # fmt: skip


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_simulation_runs_resumes_and_reports(simulate, tmp_path, one_torch_thread):
    out, readme = tmp_path / "sim", tmp_path / "README.md"
    assert simulate.main([*TINY, "--out", str(out)]) == 0

    results = rows(out)
    keys = {(r["strategy"], r["seed"], r["round"]) for r in results}
    expected = {(s, seed, r) for s in STRATEGIES for seed in range(SEEDS) for r in range(ROUNDS + 1)}
    assert keys == expected | {("full", seed, 0) for seed in range(SEEDS)}
    assert len(results) == len(keys)
    for r in results:
        if r["strategy"] != "full":
            assert r["labeled"] == 4 + 2 * r["round"]
        assert 0.0 <= r["iou"] <= 1.0
    # Paired comparison: every strategy of a seed starts from the same model.
    for seed in range(SEEDS):
        initial = {
            r["iou"] for r in results if r["seed"] == seed and r["round"] == 0 and r["strategy"] != "full"
        }
        assert len(initial) == 1
    # Chains keep their labelled set: no patch twice.
    for s in STRATEGIES:
        state = torch.load(out / "state" / "seed0" / f"{s}.pt", weights_only=False)
        assert state["round"] == ROUNDS and len(set(state["labeled"])) == 4 + 2 * ROUNDS

    before = (out / "results.jsonl").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "state").rglob("*.pt")}
    assert simulate.main([*TINY, "--out", str(out)]) == 0  # resume: nothing left to do
    assert (out / "results.jsonl").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in (out / "state").rglob("*.pt")} == mtimes

    # A lost round is recomputed from the saved chain state and rows are not duplicated.
    lines = before.splitlines()
    dropped = next(i for i, line in enumerate(lines) if json.loads(line)["round"] == ROUNDS)
    (out / "results.jsonl").write_text("\n".join(lines[:dropped] + lines[dropped + 1 :]) + "\n")
    assert simulate.main([*TINY, "--out", str(out)]) == 0
    assert sorted(rows(out), key=str) == sorted(results, key=str)

    # Another configuration in the same folder is refused with exit status 2.
    assert simulate.main([*TINY, "--out", str(out), "--batch", "3"]) == 2

    readme.write_text("# Benchmarks\n\nintro\n")
    assert simulate.main(["--report", "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert "| strategy | 4 | 6 | 8 |" in text and "Gain over random" in text and "| bald |" in text
    assert "Wall time:" in text and "1 process(es) x 1 torch thread(s)" in text
    assert (out / "learning_curve.png").stat().st_size > 0 and (out / "results.csv").exists()
    assert simulate.main(["--report", "--out", str(out), "--readme", str(readme)]) == 0
    assert readme.read_text().count("simulation:begin") == 1  # replaced, not appended again


def test_parallel_processes_give_the_serial_results(simulate, tmp_path, one_torch_thread):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert simulate.main([*TINY, "--out", str(serial)]) == 0
    assert simulate.main([*TINY, "--out", str(parallel), "--jobs", "2"]) == 0

    def numbers(out: Path) -> dict:
        return {
            (r["strategy"], r["seed"], r["round"]): (r["iou"], r["labeled"], r["steps"]) for r in rows(out)
        }

    assert numbers(parallel) == numbers(serial)  # every chain is seeded: processes change only the time
    run = json.loads((parallel / "runs.jsonl").read_text().splitlines()[-1])
    assert run["jobs"] == 2 and run["rounds"] == len(rows(parallel)) and run["wall_seconds"] > 0
    # Finished results without their state files (as committed): nothing is recomputed.
    shutil.rmtree(parallel / "state")
    before = (parallel / "results.jsonl").read_text()
    assert simulate.main([*TINY, "--out", str(parallel), "--jobs", "2"]) == 0
    assert (parallel / "results.jsonl").read_text() == before and not (parallel / "state").exists()


def test_cluster_served_batches_without_the_reference(simulate, tmp_path, one_torch_thread):
    out = tmp_path / "clusters"
    args = [
        *TINY,
        "--out",
        str(out),
        "--strategies",
        "entropy,entropy+clusters",
        "--seeds",
        "1",
        "--no-reference",
    ]
    assert simulate.main(args) == 0
    results = {(r["strategy"], r["round"]): r for r in rows(out)}
    assert {s for s, _ in results} == {"entropy", "entropy+clusters"}  # no full-supervision rows
    for r in (results["entropy", 1], results["entropy+clusters", 1]):
        assert r["pool_clusters"] == 2  # 8 unlabelled patches: round(sqrt(4)) clusters
        assert r["batch_distance"] >= 0 and 0 <= r["batch_near"] <= 1
    # Label Studio serves one task of each cluster before a second of any.
    assert results["entropy+clusters", 1]["batch_clusters"] == 2
    assert simulate.main([*args[:-1], "--strategies", "random+clusters"]) == 2


def test_near_fraction_counts_overlapping_patches_within_one_section():
    from ml_backend.experiments.simulation_setup import near_fraction

    positions = np.array([[0, 0, 0], [1, 32, 32], [3, 0, 0], [0, 128, 0]])
    assert near_fraction(positions, 64) == 0.5  # the first two overlap one section apart
    assert near_fraction(positions[:0], 64) == 0.0


def test_default_strategies_and_keep_start_option(simulate):
    cpu = ["random", "entropy", "least_confidence", "coreset"]
    assert simulate.default_strategies(1, every=False) == cpu
    assert simulate.default_strategies(3, every=False) == [*cpu[:3], "margin", "coreset"]
    every = simulate.default_strategies(1, every=True)
    assert "margin" not in every and {"bald", "kmeans", "ceal", "hybrid"} <= set(every)
    assert simulate.make_config(simulate.parse_args([])).keep_start is False
    assert simulate.make_config(simulate.parse_args(["--keep-start"])).keep_start is True


def test_the_reference_trains_with_its_own_batch_size(
    simulate, tmp_path, monkeypatch, capsys, one_torch_thread
):
    """--full-batch-size changes the full-supervision reference's batches only, and a folder of
    results made before the reference's batches and the weight decay were recorded (they ran
    with other values) is not resumed with the new ones."""
    import ml_backend.experiments.simulation as simulation

    seen: list[tuple[int, int]] = []  # (steps, batch size) of every training run

    def recording(net, images, masks, config, **kwargs):
        seen.append((config.steps, config.batch_size))
        return fine_tune(net, images, masks, config, **kwargs)

    fine_tune = simulation.fine_tune
    monkeypatch.setattr(simulation, "fine_tune", recording)
    quick = [*TINY, "--seeds", "1", "--strategies", "random", "--rounds", "1", "--batch-size", "2"]
    out = tmp_path / "sim"
    assert simulate.main([*quick, "--out", str(out), "--full-batch-size", "5"]) == 0
    assert sorted(seen) == [(4, 2), (6, 2), (6, 5)]  # a round, the initial model, the reference
    assert simulate.make_config(simulate.parse_args([])).full_batch_size == 32

    config = json.loads((out / "config.json").read_text())
    del config["full_batch_size"], config["weight_decay"]
    (out / "config.json").write_text(json.dumps(config))
    seen.clear()
    assert simulate.main([*quick, "--out", str(out), "--full-batch-size", "5"]) == 2
    assert "differs in full_batch_size, weight_decay" in capsys.readouterr().err
    assert seen == []


def test_a_stopped_run_keeps_its_rows_and_records_its_time(simulate, tmp_path, monkeypatch, one_torch_thread):
    """SIGTERM (gpu_protocol.sh's deadline) stops a run like Ctrl-C: exit 130, the finished rows
    kept and the run's time and machine in runs.jsonl; a re-run goes on from there."""
    import os
    import signal

    import ml_backend.experiments.simulation as simulation

    step = simulation.Simulation.step
    calls: list[int] = []

    def stopping(self, strategy, seed, round_):
        step(self, strategy, seed, round_)
        calls.append(round_)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(simulation.Simulation, "step", stopping)
    quick = [*TINY, "--seeds", "1", "--strategies", "random", "--rounds", "2"]
    out = tmp_path / "sim"
    before = signal.getsignal(signal.SIGTERM)
    assert simulate.main([*quick, "--out", str(out)]) == 130
    assert signal.getsignal(signal.SIGTERM) is before
    assert [r["round"] for r in rows(out)] == [0, 1]
    assert [json.loads(line)["rounds"] for line in (out / "runs.jsonl").read_text().splitlines()] == [2]

    monkeypatch.setattr(simulation.Simulation, "step", step)
    assert simulate.main([*quick, "--out", str(out)]) == 0  # round 2 and the reference
    assert [json.loads(line)["rounds"] for line in (out / "runs.jsonl").read_text().splitlines()] == [2, 2]


def test_gpu_protocol_script_keeps_its_rows_and_stops_at_its_deadline(tmp_path):
    """benchmarks/gpu_protocol.sh, the one call planned for a lent GPU machine, on the CPU with
    tiny sizes: every file the device tool brings back, and the deadline stops the run (124)."""
    import os
    import subprocess
    import sys

    script = REPO / "benchmarks" / "gpu_protocol.sh"
    tiny = TINY[: TINY.index("--quiet")]  # the script sets its own --jobs and progress
    tiny[tiny.index("--strategies") + 1] = "random"
    env = {**os.environ, "PYTHON": sys.executable, "ALLOW_CPU": "1", "JOBS": "2"}

    def run(out: Path, deadline: int, extra: list[str]) -> subprocess.CompletedProcess:
        cmd = ["bash", str(script), str(VNC), str(deadline), *tiny, *extra]
        return subprocess.run(cmd, cwd=REPO, env={**env, "OUT": str(out)}, capture_output=True, text=True)

    done = run(tmp_path / "done", 300, ["--seeds", "1", "--rounds", "1"])
    assert done.returncode == 0, done.stderr
    files = {p.name for p in (tmp_path / "done").iterdir()}
    kept = {"results.jsonl", "config.json", "runs.jsonl"}
    assert files == kept | {"report.md", "results.csv", "learning_curve.png"}
    assert len(rows(tmp_path / "done")) == 3  # random rounds 0 and 1, the reference
    assert json.loads((tmp_path / "done" / "runs.jsonl").read_text())["device"] == "cpu"
    assert json.loads((tmp_path / "done" / "config.json").read_text())["ceal_max_pseudo"] == 20  # --full's

    cut = run(tmp_path / "cut", 0, [])
    assert cut.returncode == 124 and "deadline of 0s reached" in cut.stderr
    assert not (tmp_path / "cut" / "runs.jsonl").exists()  # stopped before any round: no run to record

    refused = subprocess.run(
        ["bash", str(script), str(VNC)], cwd=REPO, env={**env, "OUT": str(tmp_path / "x"), "ALLOW_CPU": "0"},
        capture_output=True, text=True,
    )  # fmt: skip
    if not torch.cuda.is_available():
        assert refused.returncode == 2 and "no CUDA device" in refused.stderr
