"""/predict latency of the real backend process on one 1024x1024 EM tile (CPU).

Starts `python -m ml_backend` with the default network, sends the same task N times and
reads the backend's own `emloop_forward_seconds_total` counter around each request, so
the share of latency spent outside the network's forward pass (image decode, normalising,
softmax, argmax, scoring, RLE, JSON, HTTP) is measured side by side in one run.

    .venv/bin/python -m benchmarks.bench_predict [--repeat 15] [--image PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from devtools.local_stack import BackendServer
from sdk.synthetic import synthetic_em

ROOT = Path(__file__).resolve().parents[1]

VNC_SLICE = ROOT.parent / "shared" / "data" / "vnc" / "stack1" / "raw" / "00.tif"
CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="Mitochondria"/></BrushLabels></View>'
)


def metric_total(url: str, name: str = "emloop_forward_seconds_total") -> float:
    """A counter of the backend's /metrics (0 before it is first counted)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="timed requests after 2 warm-ups")
    parser.add_argument("--image", type=Path, help="a 2-D image (default: VNC slice 00, else synthetic)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "predict.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        image_path = args.image or (VNC_SLICE if VNC_SLICE.exists() else None)
        if image_path is None:
            image_path = Path(tmp) / "synthetic.png"
            Image.fromarray(synthetic_em(1024, 1024, seed=0)[0]).save(image_path)
        shape = np.asarray(Image.open(image_path)).shape
        body = {
            "project": "1.0",
            "label_config": CONFIG,
            "tasks": [{"id": 1, "data": {"image": str(image_path)}}],
        }
        env = {"MODEL_DIR": str(Path(tmp) / "models"), "LOCAL_FILES_ROOTS": str(image_path.parent)}
        with BackendServer(env) as backend:
            cold_started = time.perf_counter()
            requests.post(f"{backend.url}/predict", json=body, timeout=300).raise_for_status()
            cold = time.perf_counter() - cold_started
            requests.post(f"{backend.url}/predict", json=body, timeout=300).raise_for_status()
            latencies, forwards = [], []
            for _ in range(args.repeat):
                before = metric_total(backend.url)
                started = time.perf_counter()
                resp = requests.post(f"{backend.url}/predict", json=body, timeout=300)
                latencies.append(time.perf_counter() - started)
                resp.raise_for_status()
                forwards.append(metric_total(backend.url) - before)

    outside = [(lat - fwd) / lat for lat, fwd in zip(latencies, forwards, strict=True)]
    result = {
        "image": str(image_path.name if image_path != VNC_SLICE else "vnc/stack1/raw/00.tif"),
        "shape": list(shape),
        "repeat": args.repeat,
        "cold_first_request_s": round(cold, 3),
        "median_latency_s": round(statistics.median(latencies), 4),
        "p90_latency_s": round(float(np.percentile(latencies, 90)), 4),
        "median_forward_s": round(statistics.median(forwards), 4),
        "median_outside_forward_share": round(statistics.median(outside), 4),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("| image | median latency | p90 | median forward pass | outside forward (median) | first request |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| {result['image']} {shape[1]}x{shape[0]} | {result['median_latency_s'] * 1000:.0f} ms "
        f"| {result['p90_latency_s'] * 1000:.0f} ms | {result['median_forward_s'] * 1000:.0f} ms "
        f"| {result['median_outside_forward_share']:.1%} | {cold:.2f} s |"
    )


if __name__ == "__main__":
    main()
