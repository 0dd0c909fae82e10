"""Scribble mode (issue 16, item 2): with a Background label, only painted pixels count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.config import Settings
from ml_backend.learner.inference import predict_image
from ml_backend.learner.network import UNetConfig, build_unet
from ml_backend.learner.training import IGNORE, TrainConfig, fine_tune, segmentation_loss
from sdk.annotations import AnnotationError, label_map
from sdk.brush import mask_to_rle, rle_to_mask
from sdk.label_config import UNLABELLED, LabelConfigError, parse_brush_target
from sdk.predictions import brush_results

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(*labels: str) -> str:
    inner = "".join(f'<Label value="{label}"/>' for label in labels)
    brush = f'<BrushLabels name="brush" toName="em">{inner}</BrushLabels>'
    return f'<View><Image name="em" value="$image"/>{brush}</View>'


SCRIBBLE = parse_brush_target(config("Mito", "Background"))
FULL = parse_brush_target(config("Mito"))


def region(mask: np.ndarray, label: str) -> dict:
    h, w = mask.shape
    value = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
    size = {"original_width": w, "original_height": h}
    return {"from_name": "brush", "to_name": "em", "type": "brushlabels", **size, "value": value}


def test_a_background_label_turns_scribble_mode_on() -> None:
    assert SCRIBBLE.scribbles and SCRIBBLE.labels == ("Mito",) and SCRIBBLE.background == "Background"
    assert not FULL.scribbles and FULL.n_classes == SCRIBBLE.n_classes == 2
    assert SCRIBBLE.signature == FULL.signature, "adding a Background label keeps the model's lineage"
    assert parse_brush_target(config("mito", "BACKGROUND")).background == "BACKGROUND"  # any case
    assert parse_brush_target(config("Mito", "Rest"), background_label="Rest").background == "Rest"
    off = parse_brush_target(config("Mito", "Background"), background_label="")
    assert not off.scribbles and off.labels == ("Mito", "Background")
    with pytest.raises(LabelConfigError, match="only the background label"):
        parse_brush_target(config("Background"))


def test_settings_read_the_background_label(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKGROUND_LABEL", "Rest")
    assert Settings.from_env().brush_target(config("Mito", "Rest")).background == "Rest"
    assert not Settings.from_env().brush_target(config("Mito", "Background")).scribbles


def test_unpainted_pixels_are_unknown_in_scribble_mode_and_background_otherwise() -> None:
    mito, rest = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    mito[1:3, 1:3], rest[5:7, :] = True, True
    annotation = {"result": [region(mito, "Mito"), region(rest, "Background")]}
    labels = label_map(annotation, SCRIBBLE, (8, 8))
    assert (
        (labels[mito] == 1).all()
        and (labels[rest] == 0).all()
        and (labels[~(mito | rest)] == UNLABELLED).all()
    )
    full = label_map({"result": [region(mito, "Mito")]}, FULL, (8, 8))
    assert (full[mito] == 1).all() and (full[~mito] == 0).all()
    with pytest.raises(AnnotationError, match="not one of"):
        label_map(annotation, FULL, (8, 8))  # without scribble mode, Background is no label


def test_pre_annotations_paint_background_too_so_an_accepted_one_is_complete() -> None:
    labels = np.zeros((6, 6), np.uint8)
    labels[2:4, 2:4] = 1
    regions = {r["value"]["brushlabels"][0]: r for r in brush_results(labels, SCRIBBLE)}
    assert set(regions) == {"Mito", "Background"}
    accepted = label_map({"result": list(regions.values())}, SCRIBBLE, (6, 6))
    np.testing.assert_array_equal(accepted, labels)
    assert (rle_to_mask(regions["Background"]["value"]["rle"], 6, 6) > 0).sum() == 32
    assert [r["value"]["brushlabels"] for r in brush_results(labels, FULL)] == [["Mito"]]


def test_a_batch_with_nothing_painted_has_a_finite_loss() -> None:
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((2, 8, 8), IGNORE))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def discs(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs on a dark noisy background, and their mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(6):
        cy, cx = rng.integers(8, size - 8, 2)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= int(rng.integers(4, 8)) ** 2
    image = np.where(mask, 190, 50) + rng.normal(0, 20, (size, size))
    return image.clip(0, 255).astype(np.uint8), mask


def test_partial_labels_do_not_teach_unpainted_objects_to_be_background() -> None:
    """Half the discs painted. By default the unpainted discs are background; in scribble mode (the
    same discs, plus a few background strokes) they are unknown, and the model still finds them."""
    images, partial, scribbled, missed = [], [], [], []
    for seed in range(6):
        image, mask = discs(seed)
        painted = mask & (np.arange(64)[None, :] < 32)  # the left half's discs
        strokes = ~mask & (np.arange(64)[:, None] % 8 == 0)  # background strokes across the image
        images.append(image)
        partial.append(label_map({"result": [region(painted, "Mito")]}, FULL, (64, 64)))
        both = [region(painted, "Mito"), region(strokes, "Background")]
        scribbled.append(label_map({"result": both}, SCRIBBLE, (64, 64)))
        missed.append(mask & ~painted)
    found = {}
    for mode, masks in (("default", partial), ("scribbles", scribbled)):
        net = build_unet(UNetConfig(n_classes=2, base_channels=8, depth=3), seed=0)
        config = TrainConfig(steps=150, patch_size=32, batch_size=8, seed=1)
        fine_tune(net, images, masks, config, keep_start=False)
        probs = [predict_image(net.eval(), im, tile=64, overlap=0).probs[1] for im in images]
        found[mode] = float(np.mean(np.concatenate([p[m] for p, m in zip(probs, missed, strict=True)])))
    print(f"mean foreground probability on the unpainted discs: {found}")
    assert found["scribbles"] > 0.5 and found["scribbles"] > found["default"] + 0.2, found
