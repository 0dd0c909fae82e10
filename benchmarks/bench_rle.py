"""Benchmark Label Studio brush RLE: SDK (pure Python) vs Rust package vs emloop (numpy).

Builds three deterministic masks, checks that all three implementations produce identical RLE
and masks, then times encode (mask -> RLE list) and decode (RLE list -> H x W alpha mask) as the
median of N repeats (fewer for calls over 100 ms), interleaving implementations. Each is timed
on the whole job, including the flatten/repeat-to-RGBA and alpha slicing that the SDK and Rust
APIs leave to the caller.

    .venv/bin/python -m benchmarks.bench_rle [--repeat N] [--slow-repeat M] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from label_studio_sdk.converter import brush as ls_brush

from sdk.brush import mask_to_rle, rle_to_mask

ROOT = Path(__file__).resolve().parents[1]

try:
    import label_studio_brush_rle_rs as rs_brush
except ImportError:  # the Rust package is an optional dev dependency
    rs_brush = None

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "rle.json"
SLOW_S = 0.1  # calls slower than this get --slow-repeat repeats instead of --repeat


def blob_mask(size: int, n_blobs: int, seed: int) -> np.ndarray:
    """0/255 mask of filled, axis-aligned ellipses at seeded random positions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    scale = size / 1024
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(8, 48, 2) * scale
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask.astype(np.uint8) * 255


def noise_mask(size: int, seed: int) -> np.ndarray:
    """0/255 mask with every pixel independently foreground with probability 1/2."""
    return (np.random.default_rng(seed).random((size, size)) < 0.5).astype(np.uint8) * 255


CASES: dict[str, Callable[[], np.ndarray]] = {
    "1024² 60 blobs": lambda: blob_mask(1024, 60, seed=1),
    "512² noise": lambda: noise_mask(512, seed=2),
    "2048² 240 blobs": lambda: blob_mask(2048, 240, seed=3),
}


def sdk_decode(rle: list[int], h: int, w: int) -> np.ndarray:
    return ls_brush.decode_rle(rle).reshape(h, w, 4)[:, :, 3]


def rs_encode(mask: np.ndarray) -> list[int]:
    return list(rs_brush.encode_rle(np.repeat(mask.ravel(), 4), 8, [3, 4, 8, 16]))


def rs_decode(rle: list[int], h: int, w: int) -> np.ndarray:
    return rs_brush.decode_rle(rle, False).reshape(h, w, 4)[:, :, 3]


def timed_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def run(repeat: int, slow_repeat: int) -> list[dict]:
    rows = []
    for name, make in CASES.items():
        mask = make()
        h, w = mask.shape
        reference = ls_brush.mask2rle(mask)
        impls = {"sdk": (ls_brush.mask2rle, sdk_decode)}
        if rs_brush is not None:
            impls["rust"] = (rs_encode, rs_decode)
        impls["emloop"] = (mask_to_rle, rle_to_mask)
        jobs: dict[str, tuple[Callable[[], object], int]] = {}
        for impl, (encode, decode) in impls.items():
            for op, job, expected in (
                ("encode", partial(encode, mask), reference),
                ("decode", partial(decode, reference, h, w), mask),
            ):
                t0 = time.perf_counter()
                out = job()  # untimed warm-up and correctness check
                slow = time.perf_counter() - t0 > SLOW_S
                if not np.array_equal(out, expected):
                    raise AssertionError(f"{impl} {op} disagrees with the SDK on {name}")
                jobs[f"{impl}_{op}_ms"] = (job, slow_repeat if slow else repeat)
        # Round-robin so that load from other processes hits every implementation alike.
        times: dict[str, list[float]] = {key: [] for key in jobs}
        for i in range(max(n for _, n in jobs.values())):
            for key, (job, n) in jobs.items():
                if i < n:
                    times[key].append(timed_ms(job))
        row: dict = {"case": name, "shape": [h, w], "rle_bytes": len(reference)}
        row.update({key: statistics.median(ts) for key, ts in times.items()})
        row["repeats"] = {key: len(ts) for key, ts in times.items()}
        row["decode_speedup_vs_sdk"] = row["sdk_decode_ms"] / row["emloop_decode_ms"]
        rows.append(row)
        print(f"  done: {name}", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    def ms(row: dict, key: str) -> str:
        return f"{row[key]:.1f}" if key in row else "n/a"

    lines = [
        "| case | SDK enc ms | Rust enc ms | emloop enc ms "
        "| SDK dec ms | Rust dec ms | emloop dec ms | emloop dec vs SDK |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r["case"]]
        cells += [ms(r, f"{impl}_encode_ms") for impl in ("sdk", "rust", "emloop")]
        cells += [ms(r, f"{impl}_decode_ms") for impl in ("sdk", "rust", "emloop")]
        cells.append(f"{r['decode_speedup_vs_sdk']:.0f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=15, help="timed repeats per call; the median is reported (default 15)"
    )
    parser.add_argument(
        "--slow-repeat",
        type=int,
        default=3,
        help=f"timed repeats for calls slower than {SLOW_S * 1e3:.0f} ms, e.g. the SDK (default 3)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help=f"where to write results (default {DEFAULT_JSON.relative_to(ROOT)})",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.slow_repeat < 1:
        parser.error("--repeat and --slow-repeat must be >= 1")
    rows = run(args.repeat, args.slow_repeat)
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "repeat": args.repeat,
        "slow_repeat": args.slow_repeat,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "rust_package": rs_brush is not None,
    }
    args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
