"""The click network (ml_backend.learner.clicks, click_training): objects and simulated examples,
a few training steps, the shipped-weights format, segment_prompt's window and its checkpoint store."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ml_backend.config import Settings
from ml_backend.learner.checkpoints import (
    CheckpointError,
    CheckpointStore,
    checkpoint_bytes,
    load_checkpoint,
    newest_checkpoint,
    trained_version_names,
)
from ml_backend.learner.click_checkpoints import (
    DEFAULT_CLICK_WEIGHTS,
    ClickCheckpointStore,
    shipped_click_network,
)
from ml_backend.learner.click_training import (
    ClickTrainConfig,
    ObjectSet,
    click_batches,
    clicked_object_iou,
    object_clicks,
    train_clicks,
)
from ml_backend.learner.clicks import (
    CLICK_NETWORK,
    object_probability,
    prompt_input,
    segment_prompt,
)
from ml_backend.learner.network import UNet, UNetConfig, build_unet
from ml_backend.learner.training import IGNORE
from sdk.label_config import parse_brush_target
from sdk.prompts import CLICK_SIGMA, Click, Prompt, nearer_to_positive, prompt_window
from sdk.synthetic import synthetic_em

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = UNetConfig(n_classes=2, in_channels=3, base_channels=4, depth=2, dropout=0.0)
QUICK = ClickTrainConfig(steps=4, batch_size=2, crop=32, bn_crops=4, min_object=10)


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def synthetic(n: int = 2, size: int = 64) -> tuple[list[np.ndarray], list[np.ndarray]]:
    pairs = [synthetic_em(size, size, seed=40 + i, n_classes=2) for i in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.fixture(scope="module")
def trained() -> UNet:
    """A tiny click network after a few steps: BatchNorm statistics and weights off their start."""
    net = build_unet(TINY, seed=3)
    train_clicks(net, *synthetic(), QUICK)
    return net


def constant_net(foreground: bool) -> UNet:
    """A real click U-Net whose head ignores its features: every pixel is (not) the object."""
    net = build_unet(TINY, seed=0)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-8.0, 8.0] if foreground else [8.0, -8.0]))
    return net


# -- objects and examples ----------------------------------------------------------------------------
def test_the_object_set_holds_every_piece_of_every_class_large_enough() -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[disc(mask.shape, 12, 12, 6)] = 1  # two pieces of class 1
    mask[disc(mask.shape, 12, 44, 6)] = 1
    mask[30:40, 4:14] = 2  # class 2, touching a class-1 piece: two objects
    mask[30:40, 14:20] = 1
    mask[26:32, 30:36] = 1  # touching at a corner only: two pieces (4-connected)
    mask[32:38, 36:42] = 1
    mask[48:51, 50:53] = 1  # 9 pixels: too small to offer
    mask[56:, :] = 255  # nobody painted here
    image = np.dstack([np.full(mask.shape, 90, np.uint8)] * 3)  # RGB works too
    objects = ObjectSet([image], [mask], min_object=20)

    assert objects.images[0].shape == (64, 64) and objects.images[0].dtype == np.float32
    pieces = objects.pieces[0]
    assert (pieces[mask == 255] == -1).all() and (pieces[mask == 0] == 0).all()
    assert (pieces[mask == 1] > 0).all() and (pieces[mask == 2] > 0).all()
    offered = {piece for _, piece, _, _ in objects.objects}
    assert len(objects.objects) == len(offered) == 6
    assert int(pieces[49, 51]) not in offered and pieces[49, 51] > 0  # too small, still not background
    square, beside = np.unique(pieces[30:40, 4:14]), np.unique(pieces[30:40, 14:20])
    assert len(square) == len(beside) == 1 and square[0] != beside[0]  # touching, of two classes
    assert {int(square[0]), int(beside[0])} <= offered
    assert pieces[30, 30] != pieces[35, 38]  # diagonal neighbours are separate objects
    for k, piece, cy, cx in objects.objects:
        assert k == 0
        ys, xs = np.nonzero(pieces == piece)
        assert cy == pytest.approx(ys.mean()) and cx == pytest.approx(xs.mean())
        assert ndimage.label(pieces == piece)[1] == 1  # one connected piece
    centres = {(round(cy), round(cx)) for _, _, cy, cx in objects.objects}
    assert {(12, 12), (12, 44)} <= centres
    area = np.array([objects.sizes[0][p] for _, p, _, _ in objects.objects], float)
    np.testing.assert_allclose(objects.weights, np.sqrt(area) / np.sqrt(area).sum())
    with pytest.raises(ValueError, match="no labelled object of at least 20 pixels"):
        ObjectSet([image], [np.where(mask == 255, 255, 0).astype(np.uint8)], min_object=20)
    with pytest.raises(ValueError, match="no labelled object"):
        ObjectSet([image], [np.where(pieces == pieces[49, 51], 1, 0).astype(np.uint8)], min_object=20)


def test_objects_too_small_for_the_zoom_are_refused_not_looped_on() -> None:
    """Objects that shrink below 4 pixels in every zoomed crop end in a clear error (the worker
    then skips the click fine-tuning), not an endless search."""
    mask = np.zeros((64, 64), np.uint8)
    mask[10:12, 10:12] = mask[40:42, 30:32] = 1  # 4-pixel objects
    objects = ObjectSet([np.zeros((64, 64), np.float32)], [mask], min_object=4)
    tiny = ClickTrainConfig(crop=32, zoom=(0.1, 0.1), min_object=4)  # each object: ~0.04 px
    with pytest.raises(ValueError, match="too small for the zoom range"):
        objects.example(tiny, np.random.default_rng(0))


# Bright discs on a dark background, kept apart; an unpainted mid-grey band between two of them.
LAYOUT = (128, 128)
DISCS = [(52, 64, 6, 1), (76, 64, 6, 1), (52, 44, 5, 2)]  # centre y, centre x, radius, class
BAND = slice(62, 67)  # rows nobody painted, between the two class-1 discs


def layout() -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(LAYOUT, np.uint8)
    for cy, cx, r, value in DISCS:
        mask[disc(LAYOUT, cy, cx, r)] = value
    mask[BAND] = 255
    image = np.select([mask == 255, mask > 0], [110, 200], 20).astype(np.uint8)
    return image, mask


def test_click_batches_ask_for_the_clicked_object_only() -> None:
    image, mask = layout()
    objects = ObjectSet([image], [mask], min_object=20)
    assert len(objects.objects) == 3
    # No intensity augmentation and no zoom: the input's first plane shows the objects as they are.
    config = ClickTrainConfig(crop=32, zoom=(1.0, 1.0), contrast=1.0, brightness=0.0, noise=0.0)
    xs, ys = click_batches(objects, config, 24, np.random.default_rng(0))
    assert xs.shape == (24, 3, 32, 32) and xs.dtype == np.float32 and xs.flags.c_contiguous
    assert ys.shape == (24, 32, 32) and ys.dtype == np.int64
    assert set(np.unique(ys)) <= {0, 1, IGNORE}
    others_seen = ignored_seen = 0
    for x, y in zip(xs, ys, strict=True):
        peak = np.unravel_index(int(x[1].argmax()), y.shape)
        assert x[1][peak] > 0.9 and y[peak] == 1, "the positive click lies on what is asked for"
        assert 0 <= x[2].max() <= 1
        lo, hi = x[0].min(), x[0].max()  # the background's and the discs' levels
        bright = x[0] > lo + 0.75 * (hi - lo)
        pieces, n = ndimage.label(bright)
        clicked = pieces[ndimage.binary_dilation(y == 1)]
        clicked = int(np.bincount(clicked[clicked > 0]).argmax())
        near_clicked = ndimage.binary_dilation(pieces == clicked, iterations=2)
        assert not ((y == 1) & ~near_clicked).any(), "only the clicked object is asked for"
        core = ndimage.binary_erosion(pieces == clicked)
        assert (y[core] == 1).mean() >= 0.2  # a negative click may split off part of it, never most
        for other in set(range(1, n + 1)) - {clicked}:
            inner = ndimage.binary_erosion(pieces == other)
            assert (y[inner] == 0).all(), "other objects, same class or not, are background here"
            others_seen += int(inner.any())
        # The crop never leaves the image here: the ignored pixels are the unpainted band's.
        band = (x[0] > lo + 1e-3) & (x[0] < hi - 1e-3)
        flat = ndimage.maximum_filter(x[0], 3) - ndimage.minimum_filter(x[0], 3) < 1e-4
        assert (y[band & flat] == IGNORE).all() and band[y == IGNORE].all()
        ignored_seen += int((band & flat).any())
    assert others_seen >= 5 and ignored_seen >= 5


def test_examples_are_augmented_and_reproducible() -> None:
    objects = ObjectSet(*synthetic(1), min_object=10)
    a = click_batches(objects, QUICK, 4, np.random.default_rng(7))
    b = click_batches(objects, QUICK, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0][0], a[0][1])
    assert (a[1] == 1).any(axis=(1, 2)).all()  # every example asks for something


# -- training and the weights format -----------------------------------------------------------------
def test_a_few_training_steps_change_the_weights_and_leave_the_net_in_eval_mode() -> None:
    net = build_unet(TINY, seed=1)
    before = copy.deepcopy(net.state_dict())
    steps = []
    summary = train_clicks(
        net, *synthetic(), QUICK, progress=lambda step, total, loss: steps.append((step, total, loss))
    )
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"]) and summary["objects"] >= 2
    assert [s[:2] for s in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(np.isfinite(s[2]) for s in steps)
    assert not net.training and all(not m.training for m in net.modules())
    after = net.state_dict()
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["encoders.0.0.weight"], after["encoders.0.0.weight"])
    bn_means = [k for k in after if k.endswith("running_mean")]
    assert bn_means and any(not torch.equal(before[k], after[k]) for k in bn_means)


def window_and_prompt() -> tuple[np.ndarray, Prompt]:
    image, _ = synthetic_em(48, 40, seed=5)
    return image, Prompt("x", (Click(20.0, 18.0), Click(30.0, 8.0, False)))


def test_prompt_input_and_object_probability() -> None:
    window, prompt = window_and_prompt()
    x = prompt_input(window, prompt)
    assert x.shape == (3, 48, 40) and x.dtype == np.float32
    assert x[0].min() >= -1.5 and x[0].max() <= 1.5 and x[0].std() > 0.1
    assert x[1, 20, 18] == pytest.approx(1.0) and x[2, 30, 8] == pytest.approx(1.0) and x[1, 30, 8] < 0.1
    prob = object_probability(constant_net(True), window, prompt)
    assert prob.shape == (48, 40) and prob.dtype == np.float32 and prob.min() > 0.99


def test_shipping_checkpoints_round_trip_in_8_bits(trained: UNet, tmp_path: Path) -> None:
    window, prompt = window_and_prompt()
    record = {"iou": 0.5, "torch": str(torch.__version__)}
    (tmp_path / "compact.pt").write_bytes(checkpoint_bytes(trained, record, compact=True))
    (tmp_path / "full.pt").write_bytes(checkpoint_bytes(trained, record))
    payload = torch.load(tmp_path / "compact.pt", weights_only=True)
    assert payload["config"] == TINY.to_dict() and json.loads(payload["version"]) == record
    weights = [k for k, v in trained.state_dict().items() if v.dim() > 1]
    assert payload["compact"]["keys"] == weights and not set(weights) & set(payload["state_dict"])
    assert payload["state_dict"]["intensity"].dtype == torch.float64  # the window stays exact
    assert (tmp_path / "compact.pt").stat().st_size < 0.6 * (tmp_path / "full.pt").stat().st_size

    expected = object_probability(trained, window, prompt)
    compact = load_checkpoint(tmp_path / "compact.pt")[0]
    assert compact.config == TINY and not compact.training
    for key, value in trained.state_dict().items():
        got = compact.state_dict()[key]
        assert got.dtype == value.dtype, key
        if key in weights:  # within half a step of 8 bits per output channel
            step = value.abs().flatten(1).amax(1) / 127
            assert ((got - value).abs().flatten(1).amax(1) <= step / 2 + 1e-7).all(), key
        else:
            assert torch.equal(got, value), key
    np.testing.assert_allclose(object_probability(compact, window, prompt), expected, atol=0.02)
    full = load_checkpoint(str(tmp_path / "full.pt"))[0]
    np.testing.assert_allclose(object_probability(full, window, prompt), expected, atol=1e-6)

    damaged = bytearray((tmp_path / "compact.pt").read_bytes())
    at = damaged.find(b"\x78\xda")  # the deflated weights' header: flip a byte after it
    damaged[at + 100] ^= 0xFF
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="not a valid emloop checkpoint"):
        load_checkpoint(tmp_path / "damaged.pt")


# -- segment_prompt ------------------------------------------------------------------------------------
IMAGE = synthetic_em(150, 200, seed=9)[0]
CLICK = Prompt("Mito", (Click(75.0, 50.0),))


def test_the_window_grows_while_the_object_runs_out_of_it() -> None:
    everything, one = constant_net(True), (1.0,)
    y0, x0, y1, x1 = prompt_window(CLICK, IMAGE.shape, 64)
    expected = np.zeros(IMAGE.shape, bool)
    expected[y0:y1, x0:x1] = True
    got = segment_prompt(everything, IMAGE, CLICK, window=64, max_window=64, scales=one)  # may not grow
    assert got.dtype == bool and got.shape == IMAGE.shape
    np.testing.assert_array_equal(got, expected)
    assert segment_prompt(everything, IMAGE, CLICK, window=64, max_window=128, scales=one).sum() == 128 * 128
    # Grown to the whole image, shrunk to the network's 32 pixels and back.
    assert segment_prompt(everything, IMAGE, CLICK, window=32, max_window=1024, scales=one).all()
    # Three zooms: the coarsest looks at four windows' width, which is then the frame that grows.
    assert segment_prompt(everything, IMAGE, CLICK, window=32, max_window=128).sum() == 128 * 128
    rgb = np.dstack([IMAGE] * 3)
    assert segment_prompt(everything, rgb, CLICK, window=64).shape == IMAGE.shape
    assert not segment_prompt(constant_net(False), IMAGE, CLICK, window=64).any()


def test_the_most_confident_zoom_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A network sure of the object only at the coarsest zoom (the window shrunk 4×) gives that
    zoom's mask; one sure only at the finest gives the finest's."""
    import ml_backend.learner.clicks as clicks

    zooms: list[int] = []

    def fake(net, grey, prompt, box, window, frame):
        size = box[2] - box[0]
        zooms.append(size)
        out = np.zeros((frame[2] - frame[0], frame[3] - frame[1]), np.float32)
        y, x = int(prompt.clicks[0].y) - frame[0], int(prompt.clicks[0].x) - frame[1]
        half = size // 8  # each zoom sees an object of its own size
        out[max(0, y - half) : y + half, max(0, x - half) : x + half] = 0.99 if size == confident else 0.6
        return out

    monkeypatch.setattr(clicks, "_zoomed_probability", fake)
    for confident, side in ((128, 32), (32, 8)):
        zooms.clear()
        got = segment_prompt(constant_net(True), IMAGE, CLICK, window=32, max_window=128)
        assert zooms == [32, 64, 128]
        assert got.sum() == side * side, (confident, got.sum())


def test_a_negative_click_on_the_object_removes_the_part_nearer_to_it() -> None:
    prompt = Prompt("Mito", (Click(75.0, 50.0), Click(75.0, 150.0, False)))
    got = segment_prompt(constant_net(True), IMAGE, prompt, window=48, max_window=512)
    expected = nearer_to_positive(IMAGE.shape, prompt.positives, prompt.negatives)
    np.testing.assert_array_equal(got, expected)


def test_a_trained_net_answers_near_the_click(trained: UNet) -> None:
    image, mask = synthetic_em(96, 96, seed=11)
    obj, prompt = object_clicks(mask, min_object=50)[0]
    y, x = int(prompt.clicks[0].y), int(prompt.clicks[0].x)
    assert obj[y, x]
    got = segment_prompt(trained, image, prompt, window=64)
    assert got.dtype == bool and got.shape == image.shape
    if got.any():  # a few steps teach little; what it answers is at the click
        assert ndimage.distance_transform_edt(~got)[y, x] <= 4 * CLICK_SIGMA
    scores = clicked_object_iou(trained, [image], [mask], min_object=50)
    assert len(scores) == len(object_clicks(mask, 50)) and all(0 <= s <= 1 for s in scores)


# -- the checkpoint store and the shipped weights ------------------------------------------------------
@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("CHECKPOINT_STORE", raising=False)
    return Settings.from_env()


def test_click_versions_live_apart_from_the_segmentation_models(trained: UNet, settings: Settings) -> None:
    model_dir = settings.model_dir
    store = ClickCheckpointStore.for_settings(settings, "7")
    assert store.root == model_dir / "clicks" / "project-7" and store.mirror is None
    assert [v.name for v in store.versions()] == ["emloop-clicks-v0"]
    v1 = store.save(trained, parent=store.latest(), metrics={"source": "test"})
    assert (v1.number, v1.name, v1.parent) == (1, "emloop-clicks-v1", "emloop-clicks-v0")
    assert (store.root / "v1.pt").is_file() and store.latest() == v1
    window, prompt = window_and_prompt()
    np.testing.assert_allclose(
        object_probability(store.load(v1), window, prompt),
        object_probability(trained, window, prompt),
        atol=1e-6,
    )
    again = ClickCheckpointStore.for_settings(settings, "7")
    assert [v.name for v in again.versions()] == ["emloop-clicks-v0", "emloop-clicks-v1"]
    assert ClickCheckpointStore.for_settings(settings, "8").latest().number == 0  # per project

    # Not a segmentation model: neither listed to Label Studio nor picked for whole volumes.
    assert trained_version_names(model_dir) == []
    with pytest.raises(CheckpointError, match="no trained checkpoint for project 7"):
        newest_checkpoint(model_dir, "7")
    target = parse_brush_target(
        '<View><Image name="em" value="$image"/><BrushLabels name="brush" toName="em">'
        '<Label value="Mito"/></BrushLabels></View>'
    )
    segmentation = CheckpointStore.for_settings(settings, "7", target)
    seg_v1 = segmentation.save(build_unet(UNetConfig(base_channels=4, depth=2)), parent=None, metrics={})
    store.save(trained, parent=v1, metrics={})  # the newer file: still not picked
    assert trained_version_names(model_dir) == [seg_v1.name]
    found = newest_checkpoint(model_dir, "7")
    assert found.version == seg_v1.name and Path(found.path) == (segmentation.root / "v1.pt").resolve()


def test_version_zero_is_the_shipped_network(settings: Settings) -> None:
    store = ClickCheckpointStore.for_settings(settings, "3")
    v0 = store.versions()[0]
    assert v0.name == "emloop-clicks-v0" and v0.number == 0
    net = store.load(v0)
    assert net.config == CLICK_NETWORK and not net.training
    shipped = shipped_click_network()
    for key, value in shipped.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    version, newest = store.load_newest_intact()
    assert version == v0 and newest.config == CLICK_NETWORK


def test_the_shipped_weights_are_small_and_load_safely() -> None:
    assert DEFAULT_CLICK_WEIGHTS.stat().st_size < 2_000_000
    payload = torch.load(DEFAULT_CLICK_WEIGHTS, map_location="cpu", weights_only=True)
    assert UNetConfig(**payload["config"]) == CLICK_NETWORK
    assert "head.weight" in payload["compact"]["keys"]  # shipped in 8 bits
    record = json.loads(DEFAULT_CLICK_WEIGHTS.with_suffix(".json").read_text())
    assert record == json.loads(payload["version"]) and "synthetic" in record["trained_on"]


def test_nothing_downloads_weights_or_data() -> None:
    """The product never fetches a model at run time: no hub, no URL loader, anywhere in it."""
    root = Path(__file__).resolve().parents[1]
    forbidden = ("torch.hub", "load_state_dict_from_url", "urlretrieve", "hf_hub_download", "from_pretrained")
    for package in ("ml_backend", "sdk"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            assert not [word for word in forbidden if word in text], path
