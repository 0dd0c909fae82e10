"""Probabilities → Label Studio prediction: confidence score and brush regions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdk.brush import rle_to_mask
from sdk.label_config import parse_brush_target
from sdk.predictions import brush_results, build_prediction, confidence_score, label_map

TARGET = parse_brush_target(
    '<View><Image name="em" value="$image"/><BrushLabels name="brush" toName="em">'
    '<Label value="Membrane"/><Label value="Mito"/><Label value="Synapse"/></BrushLabels></View>'
)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


def test_confidence_by_hand() -> None:
    # 3 classes, 1 x 2 pixels.
    probs = np.array([[[0.5, 1.0]], [[0.25, 0.0]], [[0.25, 0.0]]], np.float32)
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    h1 = 0.0
    expected = 1 - ((h0 + h1) / 2) / math.log(3)
    assert confidence_score(probs) == pytest.approx(expected, abs=1e-6)


def test_confidence_random_against_formula() -> None:
    probs = softmax(np.random.default_rng(0).normal(0, 2, (4, 9, 11)))
    p = probs.astype(np.float64)
    entropy = -(p * np.log(p)).sum(axis=0)
    assert confidence_score(probs) == pytest.approx(1 - entropy.mean() / math.log(4), abs=1e-5)


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_confidence_extremes(n_classes: int) -> None:
    uniform = np.full((n_classes, 5, 6), 1 / n_classes, np.float32)
    assert confidence_score(uniform) == pytest.approx(0.0, abs=1e-6)
    onehot = np.zeros((n_classes, 5, 6), np.float32)
    onehot[np.arange(30) % n_classes, np.arange(30) // 6, np.arange(30) % 6] = 1
    assert confidence_score(onehot) == pytest.approx(1.0, abs=1e-7)
    mixed = onehot * 0.5 + uniform * 0.5
    assert 0.0 < confidence_score(mixed) < 1.0


def test_confidence_is_more_for_sharper_maps() -> None:
    logits = np.random.default_rng(1).normal(0, 1, (3, 8, 8))
    scores = [confidence_score(softmax(logits * t)) for t in (0.5, 1, 2, 4)]
    assert scores == sorted(scores) and scores[0] < scores[-1]


def test_confidence_single_class() -> None:
    assert confidence_score(np.ones((1, 4, 4), np.float32)) == 1.0


def test_label_map_is_argmax() -> None:
    probs = softmax(np.random.default_rng(2).normal(0, 1, (4, 6, 7)))
    labels = label_map(probs)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, probs.argmax(axis=0))
    assert label_map(np.zeros((300, 2, 2), np.float32)).dtype == np.uint16


def test_brush_results_decode_to_argmax_mask() -> None:
    height, width = 23, 37
    yy, xx = np.mgrid[:height, :width]
    labels = np.zeros((height, width), np.uint8)
    labels[(yy - 10) ** 2 + (xx - 12) ** 2 < 40] = 1
    labels[:, 30:] = 3
    labels[0, 0] = 3  # a single pixel of the same class far away
    # class 2 (Mito) is absent
    results = brush_results(labels, TARGET)
    assert [r["value"]["brushlabels"] for r in results] == [["Membrane"], ["Synapse"]]
    for region, class_index in zip(results, (1, 3), strict=True):
        assert region["from_name"] == "brush"
        assert region["to_name"] == "em"
        assert region["type"] == "brushlabels"
        assert (region["original_width"], region["original_height"]) == (width, height)
        assert region["value"]["format"] == "rle"
        decoded = rle_to_mask(region["value"]["rle"], height, width)
        np.testing.assert_array_equal(decoded > 0, labels == class_index)
        assert set(np.unique(decoded)) <= {0, 255}
    assert len({r["id"] for r in results}) == 2


def test_background_only_gives_no_regions() -> None:
    assert brush_results(np.zeros((8, 9), np.uint8), TARGET) == []


def test_build_prediction() -> None:
    probs = np.zeros((4, 6, 8), np.float32)
    probs[0] = 1.0
    probs[:, 2:4, 3:6] = np.array([0.1, 0.1, 0.7, 0.1], np.float32)[:, None, None]
    pred = build_prediction(probs, TARGET, "emloop-v3-abcdef")
    assert pred["model_version"] == "emloop-v3-abcdef"
    assert 0.0 <= pred["score"] <= 1.0
    assert pred["score"] == pytest.approx(confidence_score(probs))
    [region] = pred["result"]
    assert region["value"]["brushlabels"] == ["Mito"]
    mask = rle_to_mask(region["value"]["rle"], 6, 8) > 0
    expected = np.zeros((6, 8), bool)
    expected[2:4, 3:6] = True
    np.testing.assert_array_equal(mask, expected)
