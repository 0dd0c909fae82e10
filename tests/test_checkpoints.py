"""Versioned checkpoints (atomic, verified, falling back past corrupt files) and the model registry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from ml_backend.learner.checkpoints import CheckpointError, CheckpointStore, load_checkpoint, version_name
from ml_backend.learner.network import UNet, UNetConfig, build_unet
from ml_backend.serving.registry import ModelRegistry
from sdk.atomic import atomic_write_bytes
from sdk.label_config import parse_brush_target

CONFIG = """
<View><Image name="img" value="$image"/>
<BrushLabels name="seg" toName="img"><Label value="Membrane"/><Label value="Mito"/></BrushLabels></View>
"""
TARGET = parse_brush_target(CONFIG)
TINY = UNetConfig(n_classes=TARGET.n_classes, base_channels=4, depth=2)


# Tiny networks on 2 busy cores: a second torch thread only slows them down.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "ckpt", TARGET, TINY)


def perturbed(seed: int) -> UNet:
    """A network that differs from version 0 (as if it had been trained)."""
    net = build_unet(TINY, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(0.05 * seed)
    return net.eval()


def outputs(net: UNet) -> torch.Tensor:
    x = torch.linspace(-1, 1, 32 * 40).reshape(1, 1, 32, 40)
    with torch.no_grad():
        return net.eval()(x)


def same_weights(a: UNet, b: UNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_gives_identical_outputs(store: CheckpointStore) -> None:
    net = perturbed(1)
    version = store.save(net, parent=store.latest(), metrics={"iou": 0.5})
    loaded = store.load(version)
    assert isinstance(loaded, UNet) and not loaded.training
    assert loaded.config == net.config
    assert same_weights(loaded, net)
    assert torch.equal(outputs(loaded), outputs(net))


def test_versions_are_numbered_and_listed_in_manifest(store: CheckpointStore) -> None:
    assert [v.number for v in store.versions()] == [0]
    assert store.latest().name == version_name(0, TARGET)
    v1 = store.save(perturbed(1), parent=store.latest(), metrics={"iou": 0.4, "steps": 10})
    v2 = store.save(perturbed(2), parent=v1, metrics={"iou": 0.6, "steps": 20})
    assert (v1.number, v2.number) == (1, 2)
    assert (v1.file, v2.file) == ("v1.pt", "v2.pt")
    assert v1.name == f"emloop-v1-{TARGET.signature[:6]}" and v2.name != v1.name
    assert v1.parent == version_name(0, TARGET) and v2.parent == v1.name
    assert [v.number for v in store.versions()] == [0, 1, 2]
    assert store.latest() == v2
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert manifest["labels"] == ["Membrane", "Mito"]
    assert [e["name"] for e in manifest["versions"]] == [v1.name, v2.name]
    metrics = [e["metrics"] for e in manifest["versions"]]
    assert metrics == [{"iou": 0.4, "steps": 10}, {"iou": 0.6, "steps": 20}]
    assert all(len(e["sha256"]) == 64 for e in manifest["versions"])
    # A second store on the same directory (another process) sees the same history.
    assert CheckpointStore(store.root, TARGET, TINY).versions() == store.versions()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "garbage"])
def test_corrupt_newest_falls_back_to_previous(store: CheckpointStore, damage: str) -> None:
    good = perturbed(1)
    v1 = store.save(good, parent=None, metrics={})
    v2 = store.save(perturbed(2), parent=v1, metrics={})
    path = store.root / str(v2.file)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        pos = len(data) // 2
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :])
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=v2.name):
        store.load(v2)
    version, net = store.load_newest_intact()
    assert version == v1
    assert same_weights(net, good)


def test_all_files_corrupt_falls_back_to_version_0(store: CheckpointStore) -> None:
    v1 = store.save(perturbed(1), parent=None, metrics={})
    (store.root / str(v1.file)).write_bytes(b"")
    version, net = store.load_newest_intact()
    assert version.number == 0
    assert same_weights(net, build_unet(TINY, seed=0))


def test_file_with_valid_hash_but_bad_content_is_skipped(store: CheckpointStore) -> None:
    """Hash matches but the payload is not a checkpoint (e.g. written by a buggy tool)."""
    v1 = store.save(perturbed(1), parent=None, metrics={})
    v2 = store.save(perturbed(2), parent=v1, metrics={})
    junk = b"PK\x03\x04 definitely not torch"
    (store.root / str(v2.file)).write_bytes(junk)
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["versions"][-1]["sha256"] = hashlib.sha256(junk).hexdigest()
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a valid emloop checkpoint"):
        store.load(store.latest())
    assert store.load_newest_intact()[0] == v1


def test_unrecorded_files_never_load(store: CheckpointStore) -> None:
    v1 = store.save(perturbed(1), parent=None, metrics={})
    payload = (store.root / "v1.pt").read_bytes()
    # A writer killed mid-save leaves a temp file, or a complete file the manifest never named.
    (store.root / ".v2.pt.abc123.tmp").write_bytes(payload[:100])
    (store.root / "v2.pt").write_bytes((store.root / "v1.pt").read_bytes())
    (store.root / "v3.pt").write_bytes(payload[:100])
    assert [v.number for v in store.versions()] == [0, 1]
    version, _ = store.load_newest_intact()
    assert version == v1
    # The next save numbers past every file on disk: the stray files stay as they were.
    v4 = store.save(perturbed(2), parent=v1, metrics={})
    assert v4.number == 4 and [v.number for v in store.versions()] == [0, 1, 4]
    assert same_weights(store.load(v4), perturbed(2))
    assert (store.root / "v2.pt").read_bytes() == payload and (store.root / "v3.pt").read_bytes() == payload[
        :100
    ]


@pytest.mark.parametrize("damage", ['{"versions": [', "", "[]", '{"versions": [{"bogus": 1}]}', "delete"])
def test_unreadable_manifest_is_rebuilt_from_intact_files(store: CheckpointStore, damage: str) -> None:
    v1 = store.save(perturbed(1), parent=None, metrics={"iou_after": 0.5})
    v2 = store.save(perturbed(2), parent=v1, metrics={"iou_after": 0.6})
    v3 = store.save(perturbed(3), parent=v2, metrics={})
    (store.root / str(v3.file)).write_bytes(b"torn")  # and the newest file is corrupt too
    files = {p.name: p.read_bytes() for p in store.root.glob("v*.pt")}
    manifest = store.root / "manifest.json"
    manifest.unlink() if damage == "delete" else manifest.write_text(damage)

    assert store.versions() == [store.versions()[0], v1, v2]  # records, hashes and metrics kept
    version, net = store.load_newest_intact()
    assert version == v2 and same_weights(net, perturbed(2))
    assert [e["name"] for e in json.loads(manifest.read_text())["versions"]] == [v1.name, v2.name]
    kept = list(store.root.glob("manifest.json.unreadable-*"))
    assert [p.read_text() for p in kept] == ([] if damage == "delete" else [damage])
    # The next version is new: no file is overwritten, none of the history is dropped.
    v4 = store.save(perturbed(4), parent=v2, metrics={})
    assert v4.number == 4
    assert [v.number for v in store.versions()] == [0, 1, 2, 4]
    assert all((store.root / name).read_bytes() == data for name, data in files.items())


def test_checkpoints_without_an_embedded_record_are_rebuilt_too(store: CheckpointStore) -> None:
    """Files written before the version record was embedded rebuild with what the file tells."""
    net = perturbed(1)
    path = store.root / "v1.pt"
    store.root.mkdir(parents=True)
    torch.save({"config": TINY.to_dict(), "state_dict": net.state_dict()}, path)
    (store.root / "manifest.json").write_text("{")
    [_, v1] = store.versions()
    assert (v1.number, v1.file, v1.parent, v1.metrics) == (1, "v1.pt", None, {})
    assert v1.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert same_weights(store.load(v1), net)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_version_0_is_deterministic(tmp_path: Path) -> None:
    a = CheckpointStore(tmp_path / "a", TARGET, TINY)
    b = CheckpointStore(tmp_path / "b", TARGET, TINY)
    va, na = a.load_newest_intact()
    vb, nb = b.load_newest_intact()
    assert va.number == vb.number == 0 and va.name == vb.name
    assert same_weights(na, nb)
    assert not (tmp_path / "a").exists()  # version 0 is never written


def test_default_network_matches_label_config(tmp_path: Path) -> None:
    store = CheckpointStore.for_project(tmp_path, "7", TARGET)
    assert store.network.n_classes == 3
    assert store.load_newest_intact()[1].head.out_channels == 3


def test_label_configs_use_separate_directories(tmp_path: Path) -> None:
    other = parse_brush_target(CONFIG.replace('<Label value="Mito"/>', ""))
    s1 = CheckpointStore.for_project(tmp_path, "7", TARGET)
    s2 = CheckpointStore.for_project(tmp_path, "7", other)
    s3 = CheckpointStore.for_project(tmp_path, "8", TARGET)
    assert len({s1.root, s2.root, s3.root}) == 3
    assert s1.root == tmp_path / "project-7" / TARGET.signature
    s1.save(build_unet(s1.network), parent=None, metrics={})
    assert [v.number for v in s2.versions()] == [0]
    assert [v.number for v in s3.versions()] == [0]
    assert s1.latest().name != s2.latest().name  # model_version tells the lineages apart


# -- registry ---------------------------------------------------------------------------------


def test_registry_follows_new_versions_and_snapshots_keep_their_network(store: CheckpointStore) -> None:
    registry = ModelRegistry(torch.device("cpu"))
    first = registry.current(store)
    assert first.version.number == 0
    assert registry.current(store) is first  # cached while the manifest is unchanged
    before = outputs(first.net)

    trained = perturbed(1)
    v1 = store.save(trained, parent=first.version, metrics={})
    second = registry.current(store)  # no restart needed
    assert second.version == v1
    assert second.net is not first.net
    # (the registry switches to channels_last, so float summation order may differ)
    torch.testing.assert_close(outputs(second.net), outputs(trained))
    # A request that took its snapshot earlier finishes on the old, unchanged network.
    assert first.version.number == 0
    assert torch.equal(outputs(first.net), before)
    assert registry.loaded_versions() == {f"{store.root.parent.name}/{store.root.name}": v1.name}

    v2 = store.save(perturbed(2), parent=v1, metrics={})
    assert registry.current(store).version == v2


def test_registry_keeps_serving_when_newest_is_corrupt(store: CheckpointStore) -> None:
    registry = ModelRegistry(torch.device("cpu"))
    v1 = store.save(perturbed(1), parent=None, metrics={})
    served = registry.current(store)
    assert served.version == v1
    v2 = store.save(perturbed(2), parent=v1, metrics={})
    (store.root / str(v2.file)).write_bytes(b"broken")
    again = registry.current(store)
    assert again.version == v1
    assert again is served  # same version: the loaded network is reused, not reloaded


def test_the_intensity_window_travels_with_the_checkpoint(store: CheckpointStore, tmp_path: Path) -> None:
    net = perturbed(1)
    net.set_intensity_window((12.0, 3400.0))
    loaded = store.load(store.save(net, parent=store.latest(), metrics={}))
    assert loaded.intensity_window == (12.0, 3400.0)
    # A checkpoint written before the window was stored loads, and normalises per image.
    old = {k: v for k, v in perturbed(2).state_dict().items() if k != "intensity"}
    path = tmp_path / "old.pt"
    torch.save({"config": TINY.to_dict(), "state_dict": old}, path)
    legacy, _ = load_checkpoint(path)
    assert legacy.intensity_window is None
