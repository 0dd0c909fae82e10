"""Loaded networks shared by all requests, following new checkpoint versions.

Each request takes a snapshot (version + network) and finishes on it, even if a
newer version is loaded meanwhile: the old network object stays alive until the
last request holding it returns. At most `max_projects` networks stay loaded; the least
recently used is reloaded from its store when asked for again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ml_backend.learner.checkpoints import CheckpointStore, Version
from ml_backend.learner.network import UNet, default_device, fuse_for_inference
from sdk.lru import LRU

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    version: Version
    net: UNet
    device: torch.device


class ModelRegistry:
    def __init__(self, device: torch.device | None = None, max_projects: int = 64) -> None:
        self.device = device or default_device()
        self._lock = threading.Lock()
        self._loaded: LRU[str, tuple[tuple[int, int, int], LoadedModel]] = LRU(max_projects)

    def current(self, store: CheckpointStore) -> LoadedModel:
        """The newest intact version of `store`, loading it if the manifest changed."""
        key = str(store.root)
        stamp = store.manifest_stamp()
        cached = self._loaded.get(key)
        if cached and cached[0] == stamp:
            return cached[1]
        with self._lock:
            cached = self._loaded.get(key)
            if cached and cached[0] == stamp:
                return cached[1]
            version, net = store.load_newest_intact()
            if cached and cached[1].version.name == version.name:
                loaded = cached[1]
            else:
                net = fuse_for_inference(net).to(self.device).to(memory_format=torch.channels_last)
                loaded = LoadedModel(version, net, self.device)
                log.info("serving %s from %s on %s", version.name, store.root, self.device)
            self._loaded.put(key, (stamp, loaded))
            return loaded

    def loaded_versions(self) -> dict[str, str]:
        """Served version per store, named relative to MODEL_DIR (`project-<id>/<signature>`)."""
        return {"/".join(Path(key).parts[-2:]): entry[1].version.name for key, entry in self._loaded.items()}
