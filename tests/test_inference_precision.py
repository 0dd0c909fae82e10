"""The GPU inference path on CPU: batched tiles and reduced-precision autocast give the masks
float32 gives, one tile at a time (issue 15)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_backend.inference import autocast_dtype, default_tile_batch, predict_image
from ml_backend.network import UNetConfig, build_unet
from ml_backend.simulation import SimConfig, load_vnc
from ml_backend.training import TrainConfig, confusion_counts, fine_tune, scores_from_counts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vnc_model(vnc_dir: Path):
    """A small network trained briefly on four VNC sections' top halves, and the bottom halves."""
    data = load_vnc(vnc_dir, replace(SimConfig(), sections=4))
    net = build_unet(UNetConfig(n_classes=2, base_channels=4, depth=4), seed=0)
    fine_tune(
        net,
        list(data.train_raw),
        list(data.train_mask),
        TrainConfig(steps=150, batch_size=8),
        keep_start=False,
    )
    return net.eval(), data.test_images, data.test_masks


def test_batched_tiles_give_the_same_probabilities_and_embedding() -> None:
    net = build_unet(UNetConfig(n_classes=3, base_channels=4, depth=3), seed=1).eval()
    image = np.random.default_rng(0).integers(0, 255, (300, 500), dtype=np.uint8)
    one = predict_image(net, image, tile=128, overlap=32, tile_batch=1, with_embedding=True)
    for size in (3, 64):
        many = predict_image(net, image, tile=128, overlap=32, tile_batch=size, with_embedding=True)
        np.testing.assert_allclose(many.probs, one.probs, atol=1e-5)
        np.testing.assert_allclose(many.embedding, one.embedding, rtol=1e-4, atol=1e-5)


def test_defaults_keep_float32_and_single_tiles_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None and default_tile_batch(cpu) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_masks_agree_with_float32_on_vnc(vnc_model, dtype: torch.dtype) -> None:
    """What a GPU runs (`autocast_dtype`), on CPU where autocast allows: >= 99.9 % of pixels."""
    net, images, masks = vnc_model
    agree = total = 0
    counts = np.zeros((2, 3), np.int64)
    for image, mask in zip(images, masks, strict=True):
        reference = predict_image(net, image, tile=384, overlap=64, precision=None).probs.argmax(0)
        try:
            reduced = predict_image(net, image, tile=384, overlap=64, precision=dtype, tile_batch=4)
        except RuntimeError as exc:  # an autocast dtype this CPU build does not run
            pytest.skip(f"{dtype} autocast on CPU: {exc}")
        agree += int((reduced.probs.argmax(0) == reference).sum())
        total += reference.size
        counts += confusion_counts(reference, mask, 2)
    assert scores_from_counts(counts)["iou"] > 0.3, "the masks compared must be real segmentations"
    assert agree / total >= 0.999, f"{dtype}: {agree / total:.5f} of the pixels agree with float32"
