#!/usr/bin/env bash
# The papers' protocol (`simulate.py --full`: pool 2000, 20 + 20 a round, 25 rounds, 3 seeds) on a
# lent GPU machine, in one call, with a deadline inside: the rows finished by then come back.
#
# A lent machine starts bare, holds its own python3 with CUDA PyTorch, and reaches nothing, so
# VNC travels with the checkout (git-ignored, named in the call's `carry`) and every file to keep
# goes to $OUT (at most 8 files). Once, here:
#
#   mkdir -p .gpu-data/vnc && cp -r ../shared/data/vnc/stack1 .gpu-data/vnc/
#
# then one device `run` with carry [".gpu-data"] and timeout_s 600:
#
#   bash benchmarks/gpu_protocol.sh .gpu-data/vnc 520
#
# Usage: gpu_protocol.sh VNC_DIR [DEADLINE_SECONDS [SIMULATE_OPTIONS...]]
#   DEADLINE_SECONDS  stop the run after this long (default 520), keep its finished rows
#   SIMULATE_OPTIONS  passed on to simulate.py after --full (e.g. --seeds 3 --strategies ...)
# Environment: OUT (required: where results go), PYTHON (default python3), JOBS (processes
# sharing the GPU, default: the machine's cores minus one), ALLOW_CPU=1 (run without CUDA: tests).
# Writes to $OUT: results.jsonl, config.json, runs.jsonl (its time and machine, also when the
# deadline stopped it), report.md, results.csv, learning_curve.png. Exit status: simulate.py's,
# or 124 when the deadline stopped it (the rows are then partial and a later call starts over:
# nothing else survives).
set -uo pipefail

data=${1:?usage: gpu_protocol.sh VNC_DIR [DEADLINE_SECONDS [SIMULATE_OPTIONS...]]}
deadline=${2:-520}
shift $(($# < 2 ? $# : 2))
out=${OUT:?set OUT to the folder that receives the results}
python=${PYTHON:-python3}
jobs=${JOBS:-$(($(nproc) > 1 ? $(nproc) - 1 : 1))}
work=$(mktemp -d)
mkdir -p "$out"

"$python" - <<'EOF' || exit 2
import os, sys
import torch
if not torch.cuda.is_available() and os.environ.get("ALLOW_CPU") != "1":
    sys.exit("no CUDA device: this script is for a GPU machine (ALLOW_CPU=1 runs it anyway)")
EOF

keep() {  # what exists so far goes to $OUT (the device tool brings back only that)
    for f in results.jsonl config.json runs.jsonl; do
        [ -f "$work/sim/$f" ] && cp -f "$work/sim/$f" "$out/"
    done
    return 0
}

setsid "$python" scripts/simulate.py --full --data "$data" --out "$work/sim" --jobs "$jobs" --quiet "$@" &
pid=$!
end=$((SECONDS + deadline))
while kill -0 "$pid" 2>/dev/null && ((SECONDS < end)); do
    sleep 2
    keep
done
stopped=0
if kill -0 "$pid" 2>/dev/null; then
    echo "deadline of ${deadline}s reached: stopping the run, keeping its finished rows" >&2
    # the group, and the process itself in case setsid has not made the group yet; background
    # jobs of a script ignore SIGINT
    kill -TERM -- "-$pid" "$pid" 2>/dev/null
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" "$pid" 2>/dev/null
    stopped=1
fi
wait "$pid"
rc=$?
keep
if [ -s "$work/sim/results.jsonl" ]; then
    "$python" scripts/simulate.py --report --out "$work/sim" --readme "$out/report.md" >&2 &&
        cp -f "$work/sim/results.csv" "$work/sim/learning_curve.png" "$out/"
fi
rm -rf "$work"
((stopped)) && exit 124
exit "$rc"
