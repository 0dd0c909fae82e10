"""Shared test data: label configs, synthetic images, a small trained checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image
from redis import Redis
from redis.exceptions import RedisError

from devtools.processes import REPO_ROOT
from ml_backend.learner.checkpoints import CheckpointStore, Version
from ml_backend.learner.network import UNet, UNetConfig, build_unet
from ml_backend.learner.training import TrainConfig, fine_tune
from sdk.label_config import parse_brush_target
from sdk.synthetic import synthetic_em

UNIT_REDIS_URL = "redis://127.0.0.1:6379/15"  # unit tests' database, apart from the stack's
# The database the stack tests (backends, workers, the demo) use on the machine's Redis, apart from
# the user's own data in database 0: it is emptied when the session ends.
STACK_REDIS_DB = int(os.environ.get("EMLOOP_TEST_REDIS_DB", "14"))
OWNED_MARK = "emloop:tests:owned"  # set in a database the tests use, which they may empty


def with_database(url: str, db: int) -> str:
    """`url` pointing at Redis database `db`."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def claim_database(url: str) -> Redis:
    """`url`'s database for the tests, to be emptied by `release_database` afterwards, so a test
    run leaves nothing behind (no training state, no RQ worker registrations). A database holding
    keys the tests did not write is refused (RuntimeError), never emptied."""
    conn = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    if conn.dbsize() and not conn.exists(OWNED_MARK):
        conn.close()
        raise RuntimeError(
            f"Redis database {url} holds keys emloop's tests did not write; point the tests at a free"
            " database with EMLOOP_TEST_REDIS_DB (stack tests) or empty it"
        )
    conn.set(OWNED_MARK, "1")
    return conn


def release_database(conn: Redis) -> None:
    with suppress(RedisError):
        if conn.exists(OWNED_MARK):
            conn.flushdb()
    conn.close()


BRUSH_CONFIG = (
    '<View><Image name="em" value="$img" zoom="true"/>'
    '<BrushLabels name="organelle" toName="em">'
    '<Label value="Mitochondria" background="#ff0000"/></BrushLabels></View>'
)

SMALL_NET = UNetConfig(n_classes=2, base_channels=8, depth=3)


MITO, VESICLE, MEMBRANE = 7, 300, 5  # label values that are not 1..N


def labelled_volume(sections: int = 4, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic uint8 raw and int32 labels: MITO, VESICLE, MEMBRANE (dark cytoplasm pixels) and 0."""
    pairs = [synthetic_em(size, size, seed=z, n_classes=2) for z in range(sections)]
    raw, masks = np.stack([image for image, _ in pairs]), np.stack([mask for _, mask in pairs])
    labels = np.select([masks == 1, masks == 2], [MITO, VESICLE], 0).astype(np.int32)
    labels[(labels == 0) & (raw < 80)] = MEMBRANE
    return raw, labels


def write_images(folder: Path, shapes: list[tuple[int, int]], seed: int = 0) -> list[tuple[Path, np.ndarray]]:
    """Synthetic EM PNGs of the given sizes; returns (path, ground-truth mask) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (h, w) in enumerate(shapes):
        image, mask = synthetic_em(h, w, seed=seed + i)
        path = folder / f"em_{seed + i:03d}.png"
        Image.fromarray(image).save(path)
        out.append((path, mask))
    return out


def train_small_net(steps: int = 40, seed: int = 0) -> UNet:
    """A small network trained on synthetic EM until it predicts non-trivial masks."""
    data = [synthetic_em(192, 192, seed=100 + s) for s in range(4)]
    net = build_unet(SMALL_NET, seed=seed)
    fine_tune(
        net,
        [d[0] for d in data],
        [d[1] for d in data],
        TrainConfig(steps=steps, patch_size=128, batch_size=4, seed=seed),
    )
    return net


def publish(net: UNet, model_dir: Path, project: int | str, label_config: str = BRUSH_CONFIG) -> Version:
    store = CheckpointStore.for_project(model_dir, str(project), parse_brush_target(label_config))
    return store.save(net, parent=None, metrics={"source": "test"})


def run_script(script: str, *args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`scripts/<script>` as a user runs it, with only `env`'s Label Studio and MODEL_DIR."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "MODEL_DIR"))}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / script), *args],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def run_prioritize(*args: str, env: dict) -> subprocess.CompletedProcess:
    return run_script("prioritize.py", *args, env=env)
