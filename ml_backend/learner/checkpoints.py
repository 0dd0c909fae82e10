"""Versioned checkpoints on disk, written atomically, verified on load.

Layout: ``MODEL_DIR/project-<id>/<label-signature>/`` holds ``v<N>.pt`` files and
``manifest.json`` (the versions with their metrics and SHA-256). A file is
written to a temporary name, fsynced and renamed before the manifest names it,
so a killed writer never leaves a half-written checkpoint that a reader could
pick; a file whose hash does not match the manifest is skipped on load. Each
file also embeds its version record, so a lost or corrupt manifest is rebuilt
from the intact files, and a new version never reuses an existing file name.
Version 0 is the untrained initial network: it is built from a fixed seed,
never written, and served until training produces version 1. With a mirror
(CHECKPOINT_STORE=redis, `checkpoint_mirror`), versions also travel through Redis
between machines that share no MODEL_DIR.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ml_backend.config import Settings
from ml_backend.learner.checkpoint_mirror import RedisMirror, mirror_for
from ml_backend.learner.network import UNet, UNetConfig, build_unet
from sdk.atomic import atomic_write_bytes
from sdk.label_config import BrushTarget

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or does not match its manifest entry."""


@dataclass(frozen=True)
class Version:
    number: int
    name: str
    file: str | None = None
    sha256: str | None = None
    created: float = 0.0
    parent: str | None = None
    metrics: dict = field(default_factory=dict)


def version_name(number: int, target: BrushTarget) -> str:
    """The `model_version` Label Studio shows; the label signature keeps lineages apart."""
    return f"emloop-v{number}-{target.signature[:6]}"


def trained_version_names(model_dir: Path, limit: int = 200) -> list[str]:
    """Every recorded version under `model_dir` (all projects), newest first, for Label Studio's
    model-version list, which names no project; unreadable manifests are left out."""
    found: list[tuple[float, str]] = []
    for path in Path(model_dir).glob(f"project-*/*/{MANIFEST}"):
        try:
            found += [
                (float(e.get("created", 0)), str(e["name"])) for e in json.loads(path.read_text())["versions"]
            ]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s is unreadable: its versions are not listed", path)
    return list(dict.fromkeys(name for _, name in sorted(found, reverse=True)))[:limit]


def load_checkpoint(path: str | os.PathLike[str], sha256: str | None = None) -> tuple[UNet, str]:
    """The network in a ``v<N>.pt`` file (``{"config", "state_dict", "version"}``) and the file's SHA-256.

    With ``sha256`` the file must still be the one the run was planned with.
    """
    data = _read(Path(path))
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise CheckpointError(f"checkpoint {path} changed since the run was planned (SHA-256 differs)")
    return _decode(data, path)[0], digest


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None


def _decode(data: bytes, path: str | os.PathLike[str]) -> tuple[UNet, dict]:
    """The network and the whole payload (its embedded version record rebuilds a lost manifest)."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        net = UNet(UNetConfig(**payload["config"]))
        net.load_state_dict(_unpack(payload))
    except Exception as exc:  # any decoding problem means the file is unusable
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CheckpointError(f"{path} is not a valid emloop checkpoint: {reason}") from None
    return net.eval(), payload


def checkpoint_bytes(net: UNet, record: dict, *, compact: bool = False) -> bytes:
    """A checkpoint file: ``{"config", "state_dict", "version"}``, the version record as JSON text
    (`weights_only` loading takes any string, and a lost manifest is rebuilt from it).

    `compact` (weights shipped in the package) moves the weight arrays into ``"compact"``
    (`_pack`): about a quarter of the float32 file; `_decode` unpacks them to float32.
    """
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    payload: dict = {"config": net.config.to_dict(), "state_dict": state, "version": json.dumps(record)}
    if compact:
        payload["compact"] = _pack(state)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _pack(state: dict[str, torch.Tensor]) -> dict:
    """Removes every weight array from `state` and returns them in 8 bits with one scale per
    output channel (outputs move by ~1e-3), deflated into one byte string (one record, not a
    file entry per tensor)."""
    keys = [k for k, v in state.items() if v.is_floating_point() and v.dim() > 1]
    shapes, codes, scales = [], [], []
    for key in keys:
        value = state.pop(key).float()
        scale = value.abs().amax(dim=tuple(range(1, value.dim())), keepdim=True).clamp(min=1e-12) / 127
        shapes.append(tuple(value.shape))
        codes.append(torch.round(value / scale).to(torch.int8).numpy().tobytes())
        scales.append(scale.flatten())
    return {
        "keys": keys,
        "shapes": shapes,
        "scales": torch.cat(scales),
        # A tensor, not bytes: pickle protocol 2 writes bytes as latin-1 text, a third larger.
        "codes": torch.frombuffer(bytearray(zlib.compress(b"".join(codes), 9)), dtype=torch.uint8),
    }


def _unpack(payload: dict) -> dict[str, torch.Tensor]:
    """The full float32 state of a payload, compact or not."""
    state = dict(payload["state_dict"])
    packed = payload.get("compact")
    if packed:
        codes = np.frombuffer(zlib.decompress(packed["codes"].numpy().tobytes()), np.int8)
        at = row = 0
        for key, shape in zip(packed["keys"], packed["shapes"], strict=True):
            size = math.prod(shape)
            weight = torch.from_numpy(codes[at : at + size].astype(np.float32)).view(shape)
            scale = packed["scales"][row : row + shape[0]].view(-1, *[1] * (len(shape) - 1))
            state[key] = weight * scale
            at, row = at + size, row + shape[0]
    return state


class CheckpointStore:
    """The versions of one project's model for one label config."""

    def __init__(
        self,
        root: Path,
        target: BrushTarget,
        network: UNetConfig | None = None,
        mirror: RedisMirror | None = None,
    ) -> None:
        self.root = Path(root)
        self.target = target
        self.network = network or UNetConfig(n_classes=target.n_classes)
        self.mirror = mirror

    @classmethod
    def for_project(
        cls, model_dir: Path, project: str, target: BrushTarget, mirror: RedisMirror | None = None
    ) -> CheckpointStore:
        return cls(Path(model_dir) / f"project-{project}" / target.signature, target, mirror=mirror)

    @classmethod
    def for_settings(cls, settings: Settings, project: str, target: BrushTarget) -> CheckpointStore:
        """The project's store as the backend and the workers configure it (MODEL_DIR, CHECKPOINT_STORE)."""
        mirror = mirror_for(settings.checkpoint_store, settings.redis_url, settings.queue_name)
        return cls.for_project(settings.model_dir, project, target, mirror)

    def version_name(self, number: int) -> str:
        return version_name(number, self.target)

    @property
    def lineage(self) -> str:
        """``project-<id>/<label signature>``: the same on every machine, whatever its MODEL_DIR."""
        return f"{self.root.parent.name}/{self.root.name}"

    # -- reading ---------------------------------------------------------------
    def manifest_stamp(self) -> tuple[int, int, int]:
        """Changes whenever a version is added (a new file replaces the manifest); cheap per request."""
        self._pull()
        try:
            st = (self.root / MANIFEST).stat()
        except FileNotFoundError:
            return (0, 0, 0)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def versions(self) -> list[Version]:
        """All recorded versions, oldest first, version 0 included.

        An unreadable manifest is rebuilt from the intact version files (see `_repair`):
        falling back to version 0 would serve the untrained network and let the next save
        reuse, and overwrite, a version number.
        """
        self._pull()
        return self._local_versions()

    def _local_versions(self) -> list[Version]:
        try:
            return self._read_manifest()
        except (OSError, ValueError, TypeError, KeyError):
            if not self._version_files():
                return [self._initial()]
        with self._locked():
            return self._repair()

    def _pull(self) -> None:
        """Adopt the versions other machines published (a no-op without a mirror)."""
        if self.mirror is not None:
            known = lambda: {v.number for v in self._local_versions()}  # noqa: E731
            self.mirror.pull(self.lineage, known, self._adopt, self._published_form)

    def _published_form(self) -> Iterator[tuple[int, str, bytes]]:
        """(number, record, bytes) of each intact local version, to seed a lineage Redis lacks."""
        for version in self._local_versions()[1:]:
            try:
                data = _read(self.root / str(version.file))
            except CheckpointError as exc:
                log.error("not published: %s", exc)
                continue
            if hashlib.sha256(data).hexdigest() == version.sha256:
                yield version.number, json.dumps(asdict(version)), data

    def _adopt(self, record: str, data: bytes) -> None:
        """Write a published version into this MODEL_DIR, as `save` would have, if its bytes
        are the ones published; a number this machine already holds is left as it is."""
        version = Version(**json.loads(record))
        if hashlib.sha256(data).hexdigest() != version.sha256:
            raise CheckpointError(f"{version.name}: the bytes in Redis do not match its SHA-256")
        with self._locked():
            existing = self._repair()
            if any(v.number == version.number for v in existing):
                return
            version = replace(version, file=f"v{version.number}.pt")
            atomic_write_bytes(self.root / version.file, data)
            self._write_manifest(sorted([*existing, version], key=lambda v: v.number))
        log.info("adopted %s from Redis into %s", version.name, self.root)

    def _initial(self) -> Version:
        return Version(0, self.version_name(0))

    def _read_manifest(self) -> list[Version]:
        data = json.loads((self.root / MANIFEST).read_text())
        return [self._initial(), *(Version(**entry) for entry in data["versions"])]

    def _version_files(self) -> dict[int, Path]:
        files = (VERSION_FILE.fullmatch(p.name) for p in self.root.glob("v*.pt"))
        return {int(m.group(1)): self.root / m.group(0) for m in files if m}

    def _repair(self) -> list[Version]:
        """Under the lock: the manifest's versions, or, if it is unreadable, the intact files'.

        Each file gives its own SHA-256 and the version record embedded at save time; the
        unreadable manifest is kept beside the new one for inspection.
        """
        files = self._version_files()
        try:
            return self._read_manifest()
        except FileNotFoundError:
            if not files:
                return [self._initial()]  # a new lineage
            reason = "missing"
        except (OSError, ValueError, TypeError, KeyError) as exc:
            reason = f"unreadable ({type(exc).__name__}: {exc})"
        versions = [self._initial()]
        for number, path in sorted(files.items()):
            try:
                data = _read(path)
                record = json.loads(_decode(data, path)[1].get("version", "{}"))
            except (CheckpointError, ValueError, AttributeError) as exc:
                log.error("not in the rebuilt manifest: %s", exc)
                continue
            versions.append(
                Version(
                    number=number,
                    name=self.version_name(number),
                    file=path.name,
                    sha256=hashlib.sha256(data).hexdigest(),
                    created=record.get("created", path.stat().st_mtime),
                    parent=record.get("parent"),
                    metrics=record.get("metrics", {}),
                )
            )
        log.error(
            "manifest %s %s: rebuilt from %d intact checkpoint files",
            self.root / MANIFEST,
            reason,
            len(versions) - 1,
        )
        manifest = self.root / MANIFEST
        try:
            if manifest.exists():
                os.replace(manifest, manifest.with_name(f"{MANIFEST}.unreadable-{time.time():.0f}"))
            self._write_manifest(versions)
        except OSError as exc:  # a read-only MODEL_DIR: serve the rebuilt history all the same
            log.error("cannot write the rebuilt manifest %s: %s", manifest, exc)
        return versions

    def _write_manifest(self, versions: list[Version]) -> None:
        entries = [asdict(v) for v in versions[1:]]
        manifest = {"labels": list(self.target.labels), "versions": entries}
        atomic_write_bytes(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())

    def latest(self) -> Version:
        return self.versions()[-1]

    def initial_network(self) -> UNet:
        """Version 0, served until a training run publishes version 1."""
        return build_unet(self.network, seed=0)

    def load(self, version: Version) -> UNet:
        """The network of `version`; raises CheckpointError if its file is not intact."""
        if version.number == 0:
            return self.initial_network()
        try:
            return load_checkpoint(self.root / str(version.file), version.sha256)[0]
        except CheckpointError as exc:
            raise CheckpointError(f"{version.name}: {exc}") from None

    def load_newest_intact(self) -> tuple[Version, UNet]:
        """Newest version that loads; falls back through history past corrupt files."""
        for version in reversed(self.versions()):
            try:
                return version, self.load(version)
            except CheckpointError as exc:
                log.error("skipping checkpoint: %s", exc)
        raise AssertionError("unreachable: version 0 always loads")

    # -- writing ---------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def save(self, net: UNet, *, parent: Version | None, metrics: dict) -> Version:
        """Write the next version: checkpoint file first, then the manifest naming it.

        The number is past every recorded version and every file on disk, so no save ever
        replaces an existing file (a stray one from a writer killed before its manifest update).
        """
        self._pull()
        with self._locked():
            existing = self._repair()
            published = self.mirror.highest(self.lineage) if self.mirror else 0
            number = max([existing[-1].number, *self._version_files(), published]) + 1
            record = {"created": time.time(), "parent": parent.name if parent else None, "metrics": metrics}
            data = checkpoint_bytes(net, record)
            version = Version(
                number=number,
                name=self.version_name(number),
                file=f"v{number}.pt",
                sha256=hashlib.sha256(data).hexdigest(),
                **record,
            )
            if self.mirror is not None:  # first: a version other machines cannot see is not saved
                self.mirror.publish(self.lineage, number, data, json.dumps(asdict(version)))
            atomic_write_bytes(self.root / version.file, data)
            self._write_manifest([*existing, version])
        return version


# -- a checkpoint named by file or by project, outside serving (whole-volume segmentation) ----------
@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: str
    sha256: str
    n_classes: int
    labels: tuple[str, ...]  # the label config's <Label> values: class i + 1 is labels[i]
    version: str


def _manifest_labels(folder: Path) -> tuple[str, ...] | None:
    try:
        return tuple(json.loads((folder / "manifest.json").read_text())["labels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_from_file(path: str | os.PathLike[str]) -> ResolvedCheckpoint:
    """A ``v<N>.pt`` file; class names come from the store's manifest beside it when there is one."""
    path = Path(path).resolve()
    net, digest = load_checkpoint(path)
    n = net.config.n_classes
    labels = _manifest_labels(path.parent)
    if labels is None or len(labels) != n - 1:
        labels = tuple(f"class {i}" for i in range(1, n))
    return ResolvedCheckpoint(str(path), digest, n, labels, path.stem)


def newest_checkpoint(
    model_dir: str | os.PathLike[str], project: str, signature: str | None = None
) -> ResolvedCheckpoint:
    """The newest intact trained version in ``MODEL_DIR/project-<id>/<label signature>/``.

    With several label signatures (the label config changed), the most recently updated one is
    used unless ``signature`` (a prefix is enough) picks another.
    """
    base = Path(model_dir) / f"project-{project}"
    stores = sorted(p for p in base.glob("*") if (p / "manifest.json").is_file())
    if signature:
        stores = [p for p in stores if p.name.startswith(signature)]
    if not stores:
        which = f" with label signature {signature!r}" if signature else ""
        raise CheckpointError(f"no trained checkpoint for project {project}{which} under {base}")
    folder = max(stores, key=lambda p: (p / "manifest.json").stat().st_mtime_ns)
    labels = _manifest_labels(folder) or ()
    store = CheckpointStore(folder, BrushTarget("", "", "", labels))
    for version in reversed(store.versions()):
        if version.number == 0:
            break
        try:
            net = store.load(version)
        except CheckpointError:
            continue
        return ResolvedCheckpoint(
            str((folder / str(version.file)).resolve()), str(version.sha256), net.config.n_classes, labels,
            version.name,
        )  # fmt: skip
    raise CheckpointError(f"no intact trained checkpoint in {folder}")
