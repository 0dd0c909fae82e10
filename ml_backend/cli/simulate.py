"""Simulate active learning on a labelled EM volume, the ground truth acting as the oracle.

The papers' protocol (Roels & Saeys) with the project's own U-Net, strategies and
training code: the volume is split halfway along y; a pool of --pool 2-D patches comes
from the top half; each strategy starts from the same --initial random patches and the
same initial model (per seed), then every round selects --batch patches, adds them,
fine-tunes from the previous round's weights and measures IoU on the whole bottom half.
A model trained on the whole pool gives the full-supervision reference.

Data: VNC stack 1's mitochondria (--data, the default), or any labelled volume with
--raw RAW --labels LABELS, both of one shape, in any format sdk.tiling opens: a TIFF
stack, a folder of 2-D TIFF/PNG slices (greyscale+alpha PNGs too), file.h5:/dataset,
a Zarr store[:/array], .npy, MRC. Raw of any dtype (8/16-bit, float). --classes names
the classes and the label values that form them: name=values, comma-separated, values
joined by + (merged into one class), each a value v or a range a-b; values no class
claims are background. Without --classes, 0 is background and every other value is one
class named by its value (at most 32). The network has one output per class plus
background; IoU is the mean over the classes.

  simulate.py --raw em.h5:/raw --labels em.h5:/labels --out sim-em
  simulate.py --raw vnc/stack1/raw --labels vnc/stack1/labels --out sim-vnc4 \\
      --classes membranes=0-128,glia=159,mitochondria=191,synapses=223
  simulate.py --raw vnc/stack1/raw --labels vnc/stack1/labels --out sim-organelles \\
      --classes organelles=191+223

Training is the worker's recipe (ml_backend.learner.training, README "The model"): the initial
model trains --initial-steps from scratch; each round fine-tunes the previous weights for
--round-steps (warm-up, cosine decay to zero) and keeps the result, as the papers do
(--keep-start: keep the previous weights when they score better on --val-patches fixed
held-out patches, as the worker does); full supervision trains the initial model on the
whole pool for --full-steps.

Default (CPU) scaling, for five strategies (random, entropy, least confidence, margin
with several classes, core-set; --strategies all for every one) x 3 seeds in < 2 h on
2 cores: the papers'
pool (2000 patches of 128 x 128, initial 20, batch 20), 10 rounds (200 labelled = 10 %
of the pool at round 9), a U-Net of 4 channels at the top level and depth 5 (the
backend's default has 8: half the cost, the same IoU on VNC), batches of 16, 1500
steps for the initial model, 300 a round, 4000 for full supervision; chains run side by
side in --jobs processes of one torch thread each. See benchmarks/README.md for the
measured costs. --full keeps the sizes but runs the papers' 25 rounds with larger step
budgets: meant for a GPU.

Results are appended per (strategy, seed, round) to OUT/results.jsonl; OUT/config.json
records the options, the volumes and the classes. A re-run with the same ones skips
finished rounds and continues each chain from its saved weights and labelled set; other
ones are refused. --report turns OUT/results.jsonl into results.csv, learning_curve.png
and the tables in benchmarks/README.md.

Exit status: 0 done, 1 failure, 2 bad usage or missing data, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from ml_backend.experiments.simulation import Simulation, read_results
from ml_backend.experiments.simulation_report import markdown, plot, run_summary, write_csv
from ml_backend.experiments.simulation_runner import run_parallel
from ml_backend.experiments.simulation_setup import RESULTS, DataSource, SimConfig, vnc_source
from ml_backend.learner.network import cpu_name, default_device
from sdk.cli import prog_name, run_main
from sdk.strategies import STRATEGIES

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, for defaults inside it
PROG = prog_name("simulate.py")
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "vnc"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "simulation"
DEFAULT_README = REPO_ROOT / "benchmarks" / "README.md"
PAPER = {
    "pool_size": 2000,
    "initial": 20,
    "batch": 20,
    "rounds": 25,
    "initial_steps": 3000,
    "round_steps": 1000,
    "full_steps": 10000,
    "ceal_max_pseudo": 20,
}
OPTIONS = {  # CLI option -> SimConfig field
    "pool": "pool_size",
    "initial": "initial",
    "batch": "batch",
    "rounds": "rounds",
    "patch": "patch",
    "base_channels": "base_channels",
    "depth": "depth",
    "batch_size": "batch_size",
    "initial_steps": "initial_steps",
    "round_steps": "round_steps",
    "full_steps": "full_steps",
    "full_batch_size": "full_batch_size",
    "val_patches": "val_patches",
    "mc_samples": "mc_samples",
    "sections": "sections",
    "crop": "crop",
}
# The CPU default: random, two uncertainty rankings and one diversity selection fit < 2 h on
# 2 cores; BALD (8 Monte-Carlo passes), k-means, CEAL and hybrid take --strategies or --full.
CPU_STRATEGIES = ("random", "entropy", "least_confidence", "margin", "coreset")
BEGIN, END = "<!-- simulation:begin -->", "<!-- simulation:end -->"
RUNS = "runs.jsonl"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("data (VNC by default)")
    data.add_argument("--data", type=Path, help=f"VNC folder (default: {DEFAULT_DATA})")
    data.add_argument("--raw", help="raw volume: a path, file.h5:/dataset or a.zarr:/array (needs --labels)")
    data.add_argument("--labels", help="label volume of the same shape as --raw")
    data.add_argument(
        "--classes",
        metavar="SPEC",
        help="name=values,... e.g. membranes=0-128,glia=159 or organelles=191+223 (default: each "
        "non-zero label value is a class)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: %(default)s)")
    parser.add_argument(
        "--strategies",
        help=f"comma-separated, or 'all' (default: {', '.join(CPU_STRATEGIES)}; all with --full; margin "
        "only with several classes, as with one it ranks like least_confidence); a score strategy with "
        "the suffix +clusters (e.g. entropy+clusters) takes the batch Label Studio serves from its "
        "ranking split into clusters",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    parser.add_argument("--full", action="store_true", help="the papers' sizes (for a GPU)")
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the full-supervision reference (for comparisons between strategies)",
    )
    parser.add_argument(
        "--keep-start",
        action="store_true",
        help="a round keeps the previous weights when they score better on the validation patches "
        "(the worker's rule; default: every round keeps its trained weights, as in the papers)",
    )
    defaults = SimConfig()
    for option, name in OPTIONS.items():
        default = getattr(defaults, name)
        parser.add_argument(
            "--" + option.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {default} ({PAPER.get(name, default)} --full)",
        )
    parser.add_argument(
        "--jobs",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="processes running chains side by side, one per core (default: %(default)s, this "
        "machine's cores); on a GPU they share it",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default: 1)")
    parser.add_argument("--report", action="store_true", help="only write the report from OUT/results.jsonl")
    parser.add_argument("--readme", type=Path, default=DEFAULT_README, help="report target (%(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> SimConfig:
    values = dict(PAPER) if args.full else {}
    for option, name in OPTIONS.items():
        if getattr(args, option) is not None:
            values[name] = getattr(args, option)
    if args.keep_start:
        values["keep_start"] = True
    return SimConfig(**values)


def data_source(args: argparse.Namespace) -> DataSource:
    """--raw/--labels/--classes, or VNC's stack 1 (--data)."""
    if args.raw is None and args.labels is None:
        if args.classes is not None:
            raise ValueError("--classes needs --raw and --labels (VNC's classes are fixed)")
        return vnc_source(args.data or DEFAULT_DATA)
    if args.raw is None or args.labels is None:
        raise ValueError("--raw and --labels go together")
    if args.data is not None:
        raise ValueError("--data is VNC's folder: give either --data or --raw/--labels")
    return DataSource(args.raw, args.labels, args.classes)


def default_strategies(n_classes: int, every: bool) -> list[str]:
    """The CPU set, or every strategy; margin only with several classes (with one,
    1 - (p1 - p2) = 2 (1 - p1) ranks like least confidence)."""
    return [s for s in (STRATEGIES if every else CPU_STRATEGIES) if n_classes > 1 or s != "margin"]


def simulate(args: argparse.Namespace) -> str:
    source = data_source(args)
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.seeds < 1 or args.jobs < 1:
        raise ValueError("--seeds and --jobs must be >= 1")
    seeds = list(range(args.seeds))
    config = make_config(args)
    data = source.load(config)
    if args.strategies is None or args.strategies == "all":
        strategies = default_strategies(len(data.classes), every=args.full or args.strategies == "all")
    else:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    device = default_device()
    jobs = args.jobs
    sim = Simulation(args.out, config, data, device=device)
    full = not args.no_reference
    done, total = sim.work(strategies, seeds, full)
    started = time.time()
    try:
        with tqdm(total=total, initial=done, desc="simulation", unit="round", disable=args.quiet) as bar:

            def on_step(strategy: str = "", seed: int = 0, round_: int = 0) -> None:
                if jobs > 1:  # rows come from the worker processes
                    sim.reload()
                else:
                    bar.set_postfix_str(f"{strategy} seed {seed} round {round_}")
                bar.update(sim.work(strategies, seeds, full)[0] - bar.n)

            if jobs > 1:
                run_parallel(
                    args.out,
                    config,
                    source,
                    strategies,
                    seeds,
                    jobs=jobs,
                    threads=args.threads,
                    device=device.type,
                    full=full,
                    on_poll=on_step,
                )
                on_step()
            else:
                sim.run(strategies, seeds, full=full, on_step=on_step)
    finally:  # an interrupted run too: its finished rows are kept, so its time and machine are
        sim.reload()
        record_run(args.out, started, sim.work(strategies, seeds, full)[0] - done, jobs, args.threads, device)
    return f"{total - done} of {total} rounds run; results in {args.out / RESULTS}"


def record_run(out: Path, started: float, rounds: int, jobs: int, threads: int, device: object) -> None:
    """Append this invocation's wall time and machine to OUT/runs.jsonl (the report sums them)."""
    import torch

    if not rounds:
        return
    row = {
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "rounds": rounds,
        "jobs": jobs,
        "threads": threads,
        "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu",
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with (out / RUNS).open("a") as f:
        f.write(json.dumps(row) + "\n")


# -- report -----------------------------------------------------------------------------------
def report(args: argparse.Namespace) -> str:
    rows = read_results(args.out / RESULTS)
    if not rows:
        raise FileNotFoundError(f"no results in {args.out / RESULTS}; run the simulation first")
    write_csv(rows, args.out / "results.csv")
    plot(rows, args.out / "learning_curve.png")
    config = json.loads((args.out / "config.json").read_text()) if (args.out / "config.json").exists() else {}
    settings = ", ".join(f"{k}={v}" for k, v in config.items())
    try:
        shown = args.out.resolve().relative_to(args.readme.resolve().parent)
    except ValueError:
        shown = args.out
    block = "\n".join(
        [
            BEGIN,
            f"Results of `{shown / RESULTS}` ({len(rows)} rows; {settings}). "
            f"Curve: `{shown / 'learning_curve.png'}`.",
            "",
            *run_summary(read_results(args.out / RUNS)),
            markdown(rows),
            END,
        ]
    )
    text = args.readme.read_text() if args.readme.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + "## Simulation results\n\n" + block + "\n"
    args.readme.write_text(text)
    return f"report of {len(rows)} rows written to {args.readme} and {args.out}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    action = report if args.report else simulate
    previous = signal.signal(signal.SIGTERM, _stop)  # a deadline (gpu_protocol.sh) stops it like Ctrl-C
    try:
        return run_main(PROG, lambda: action(args), input_errors=(ValueError, FileNotFoundError))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
