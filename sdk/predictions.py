"""Turn class probabilities into a Label Studio prediction.

The per-task `score` is a confidence in [0, 1]:
``score = 1 - mean over pixels of H(p) / log(C)``, where H is the entropy of the
pixel's class distribution (natural log) and C the number of classes
(background included). 1 means every pixel is certain, 0 means every pixel is
uniform over the classes. Label Studio's "Uncertainty sampling" serves the
lowest score first, so the most uncertain image is served first.
"""

from __future__ import annotations

import secrets

import numpy as np

from sdk.brush import mask_to_rle
from sdk.label_config import BrushTarget
from sdk.strategies import pixel_entropy


def confidence_score(probs: np.ndarray) -> float:
    """1 − mean normalised pixel entropy of a (C, H, W) probability map."""
    n_classes = probs.shape[0]
    if n_classes < 2:
        return 1.0
    mean_entropy = float(pixel_entropy(probs).mean(dtype=np.float64))
    return float(np.clip(1.0 - mean_entropy / np.log(n_classes), 0.0, 1.0))


def label_map(probs: np.ndarray) -> np.ndarray:
    """Most probable class per pixel (0 = background; ties go to the lower class, as argmax).

    A running maximum over class planes: several times faster than `argmax(axis=0)`,
    which strides across planes for every pixel.
    """
    dtype = np.uint8 if probs.shape[0] <= 256 else np.uint16
    labels = np.zeros(probs.shape[1:], dtype)
    best = probs[0].copy()
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        labels[better] = c
        np.maximum(best, probs[c], out=best)
    return labels


def brush_region(mask: np.ndarray, target: BrushTarget, label: str) -> dict:
    """One `brushlabels` region: the pixels of bool `mask`, painted with `label`."""
    height, width = mask.shape
    return {
        "id": secrets.token_hex(5),
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
    }


def brush_results(labels: np.ndarray, target: BrushTarget) -> list[dict]:
    """One `brushlabels` region per class present in the label map; in scribble mode background
    too, so an annotator who accepts a pre-annotation leaves a complete label."""
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=target.n_classes))
    names = [target.background, *target.labels]
    return [
        brush_region(labels == class_index, target, str(names[int(class_index)]))
        for class_index in (present if target.scribbles else present[present > 0])
    ]


def build_prediction(probs: np.ndarray, target: BrushTarget, model_version: str) -> dict:
    """One prediction for one task, in the shape Label Studio stores."""
    return {
        "result": brush_results(label_map(probs), target),
        "score": confidence_score(probs),
        "model_version": model_version,
    }
