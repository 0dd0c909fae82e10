"""The GPU inference path on CPU: batched tiles and reduced-precision autocast give the masks
float32 gives, one tile at a time (issue 15)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_backend.experiments.simulation_setup import SimConfig, load_vnc
from ml_backend.learner.inference import (
    autocast_dtype,
    bfloat16_supported,
    default_tile_batch,
    mask_agreement,
    predict_image,
)
from ml_backend.learner.network import UNetConfig, build_unet
from ml_backend.learner.training import TrainConfig, evaluate, fine_tune

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


def test_the_fixed_network_is_a_real_segmenter(vnc_model) -> None:
    """The masks compared below must be real segmentations, not all background."""
    net, images, masks = vnc_model
    assert evaluate(net, images, masks, tile=384)["iou"] > 0.3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_masks_agree_with_float32_on_vnc(vnc_model, dtype: torch.dtype) -> None:
    """What a GPU runs (`autocast_dtype`), on CPU where autocast allows: >= 99.9 % of pixels."""
    net, images, _ = vnc_model
    try:
        agree = mask_agreement(net, images, dtype, tile=384)
    except RuntimeError as exc:  # an autocast dtype this CPU build does not run
        pytest.skip(f"{dtype} autocast on CPU: {exc}")
    assert agree >= 0.999, f"{dtype}: {agree:.5f} of the pixels agree with float32"


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True), (False, True, True)]
)
def test_bfloat16_counts_as_supported_on_cpu_only_where_it_is_native(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, native: bool
) -> None:
    """oneDNN emulates bfloat16 on any AVX-512 CPU, slower than float32: training must not use it there."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert bfloat16_supported(torch.device("cpu")) is native
    assert bfloat16_supported(torch.device("meta")) is False
