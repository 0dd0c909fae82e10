"""The U-Net and whole-image tiled inference: shapes, blending, MC dropout, embeddings, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ml_backend.learner.inference import (
    blend_window,
    intensity_window,
    normalize_image,
    predict_image,
    tile_starts,
)
from ml_backend.learner.network import MCDropout2d, UNet, UNetConfig, build_unet

TINY = UNetConfig(n_classes=3, base_channels=4, depth=2)


# Tiny networks on 2 busy cores: a second torch thread only slows them down.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def net() -> UNet:
    return build_unet(TINY, seed=0)


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = (np.sin(yy / 5) + np.cos(xx / 7)) * 60 + 128 + rng.normal(0, 10, (height, width))
    return img.clip(0, 255).astype(np.uint8)


# -- network ---------------------------------------------------------------------------------


def test_unet_shapes_and_embedding() -> None:
    model = build_unet(UNetConfig(n_classes=4, base_channels=4, depth=3))
    assert model.config.size_multiple == 8
    x = torch.randn(2, 1, 24, 40)
    logits, emb = model(x, return_embedding=True)
    assert logits.shape == (2, 4, 24, 40)
    assert emb.shape == (2, 4 * 2**3)
    torch.testing.assert_close(model.embed(x), emb)


def test_build_unet_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_unet(TINY, seed=0), build_unet(TINY, seed=0), build_unet(TINY, seed=1)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)
    assert not a.training  # built for inference


# -- tiling ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [
        (70, 32, 8),
        (90, 32, 8),
        (33, 32, 8),
        (64, 32, 0),
        (65, 32, 0),
        (1000, 256, 64),
        (40, 8, 7),
        (40, 8, 12),
    ],
)
def test_tile_starts_cover_exactly(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert starts[-1] + tile == length  # the last tile ends at the border, never past it
    assert starts == sorted(set(starts))
    assert all(0 <= s <= length - tile for s in starts)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    # Consecutive tiles share at least `overlap` pixels (when the tile allows it).
    stride = max(1, tile - overlap)
    assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize(("length", "tile"), [(1, 32), (31, 32), (32, 32)])
def test_tile_starts_single_tile(length: int, tile: int) -> None:
    assert tile_starts(length, tile, 8) == [0]


def test_blend_window() -> None:
    w = blend_window(32, 40, 8)
    assert w.shape == (32, 40)
    assert (w > 0).all() and (w <= 1).all()
    assert w[16, 20] == 1.0  # interior is fully trusted
    assert w[0, 20] < w[4, 20] < w[8, 20]  # fades towards the edge
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert (blend_window(5, 7, 0) == 1).all()


class PerPixel(nn.Module):
    """A stand-in network whose output at a pixel depends on that pixel only."""

    def __init__(self) -> None:
        super().__init__()
        self.config = UNetConfig(n_classes=3, depth=2)
        self.conv = nn.Conv2d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([3.0, -2.0, 0.5]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 0.3, -0.1]))

    intensity_window = None  # each image normalised on its own, as an untrained UNet

    def set_mc_dropout(self, enabled: bool) -> None:
        pass

    def forward(self, x: torch.Tensor, return_embedding: bool = False) -> torch.Tensor:
        return self.conv(x)


def test_tiles_are_stitched_exactly_for_a_pointwise_model() -> None:
    # No receptive field: any error would come from tiling/blending/normalising the weights.
    model = PerPixel().eval()
    image = textured(70, 90)
    whole = predict_image(model, image, tile=1024).probs
    for tile, overlap in [(32, 8), (32, 0), (16, 12), (64, 30)]:
        tiled = predict_image(model, image, tile=tile, overlap=overlap).probs
        np.testing.assert_allclose(tiled, whole, atol=1e-6)


def test_tiled_prediction_close_to_single_tile() -> None:
    model = build_unet(TINY, seed=0)
    with torch.no_grad():
        model.head.weight.mul_(10)  # sharper outputs than a fresh head gives
    image = textured(70, 90)
    whole = predict_image(model, image, tile=1024).probs
    blended = predict_image(model, image, tile=32, overlap=8).probs
    seams = predict_image(model, image, tile=32, overlap=0).probs
    assert blended.shape == whole.shape == (3, 70, 90)
    err_blended = np.abs(blended - whole)
    err_seams = np.abs(seams - whole)
    assert err_blended.max() < 0.1
    assert err_blended.mean() < 0.005
    assert (blended.argmax(0) == whole.argmax(0)).mean() > 0.98
    assert not np.allclose(blended, whole, atol=1e-6)  # tiles do see less context
    assert err_blended.mean() < err_seams.mean()  # blending over the overlap reduces seam error


@pytest.mark.parametrize("shape", [(37, 53), (5, 7), (1, 1), (2, 3), (3, 100), (64, 64), (17, 1)])
@pytest.mark.parametrize("depth", [2, 4])
def test_any_image_size(shape: tuple[int, int], depth: int) -> None:
    model = build_unet(UNetConfig(n_classes=3, base_channels=4, depth=depth))
    image = textured(*shape)
    out = predict_image(model, image, tile=32, overlap=8)
    assert out.probs.shape == (3, *shape)
    assert out.probs.dtype == np.float32
    assert np.isfinite(out.probs).all()
    np.testing.assert_allclose(out.probs.sum(axis=0), 1.0, atol=1e-5)


def test_probabilities_sum_to_one(net: UNet) -> None:
    probs = predict_image(net, textured(70, 90), tile=32, overlap=8).probs
    assert (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_mc_dropout(net: UNet) -> None:
    image = textured(40, 48)
    torch.manual_seed(0)
    a = predict_image(net, image, mc_dropout=True).probs
    b = predict_image(net, image, mc_dropout=True).probs
    assert not np.allclose(a, b, atol=1e-6)  # each call is a different dropout sample
    np.testing.assert_allclose(a.sum(axis=0), 1.0, atol=1e-5)
    c = predict_image(net, image).probs
    d = predict_image(net, image).probs
    np.testing.assert_array_equal(c, d)  # deterministic without MC dropout
    # Switching MC dropout on for one call must not leave it on for the next.
    assert not any(m.always_on for m in net.modules() if isinstance(m, MCDropout2d))
    assert not np.allclose(a, c, atol=1e-6)


def test_mc_dropout_switched_off_after_an_error(net: UNet) -> None:
    with pytest.raises(ValueError):
        predict_image(net, np.zeros((2, 3, 4, 5)), mc_dropout=True)
    assert not any(m.always_on for m in net.modules() if isinstance(m, MCDropout2d))


def test_embedding(net: UNet) -> None:
    image = textured(32, 48)
    out = predict_image(net, image, with_embedding=True)
    assert out.embedding is not None
    assert out.embedding.shape == (TINY.base_channels * 2**TINY.depth,)
    assert out.embedding.dtype == np.float32
    pixels = torch.from_numpy(normalize_image(image))[None, None]
    np.testing.assert_allclose(out.embedding, net.embed(pixels)[0].numpy(), rtol=1e-5, atol=1e-6)
    tiled = predict_image(net, textured(70, 90), tile=32, overlap=8, with_embedding=True).embedding
    assert tiled is not None and tiled.shape == out.embedding.shape and np.isfinite(tiled).all()
    assert predict_image(net, image).embedding is None


# -- normalisation ---------------------------------------------------------------------------


def test_normalize_ignores_bit_depth_and_scale() -> None:
    img8 = textured(60, 80)
    img16 = img8.astype(np.uint16) * 257  # the same picture using the whole 16-bit range
    a, b = normalize_image(img8), normalize_image(img16)
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(normalize_image(img8.astype(np.float64) / 255 + 3), a, atol=1e-4)
    assert a.min() >= -1.5 and a.max() <= 1.5
    assert -1.1 < np.percentile(a, 1) < -0.9 and 0.9 < np.percentile(a, 99) < 1.1
    # ...and so does the network's output.
    model = build_unet(TINY)
    np.testing.assert_allclose(predict_image(model, img8).probs, predict_image(model, img16).probs, atol=1e-4)


def test_normalize_constant_image_is_finite() -> None:
    out = normalize_image(np.full((10, 12), 7, np.uint16))
    assert np.isfinite(out).all()


def test_rgb_input() -> None:
    grey = textured(30, 40)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full((30, 40, 1), 255, np.uint8)], axis=2)
    np.testing.assert_allclose(normalize_image(rgb), normalize_image(grey), atol=1e-4)
    np.testing.assert_allclose(normalize_image(rgba), normalize_image(grey), atol=1e-4)
    colour = np.random.default_rng(1).integers(0, 256, (30, 40, 3)).astype(np.uint8)
    out = predict_image(build_unet(TINY), colour, tile=16, overlap=4)
    assert out.probs.shape == (3, 30, 40)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5)])
def test_normalize_rejects_other_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        normalize_image(np.zeros(shape))


def test_fused_network_computes_the_same_function() -> None:
    from torch import nn

    from ml_backend.learner.network import fuse_for_inference

    net = build_unet(UNetConfig(base_channels=4, depth=2), seed=3)
    for module in net.modules():  # non-trivial statistics, as after training
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    fused = fuse_for_inference(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules()), "the original is untouched"
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net.eval()(x), atol=1e-5, rtol=1e-4)


def test_a_trained_network_normalises_with_its_own_window() -> None:
    """The window travels with the network: a dark crop is stretched like the same pixels in a section."""
    section = textured(64, 64)
    crop = section[:16, :16]
    net = build_unet(TINY)
    net.set_intensity_window(intensity_window([section]))
    expected = normalize_image(section, net.intensity_window)[:16, :16]
    np.testing.assert_allclose(normalize_image(crop, net.intensity_window), expected)
    assert not np.allclose(normalize_image(crop), expected)  # its own percentiles stretch it differently
    with torch.no_grad():
        direct = torch.softmax(
            net(torch.from_numpy(normalize_image(section, net.intensity_window))[None, None]), 1
        )
    np.testing.assert_allclose(predict_image(net, section).probs, direct[0].numpy(), atol=1e-5)


def test_intensity_window_pools_the_images_and_maps_to_minus_one_one() -> None:
    dark, bright = np.full((40, 40), 10, np.uint16), np.full((40, 40), 1000, np.uint16)
    lo, hi = intensity_window([dark, bright])
    assert lo == pytest.approx(10) and hi == pytest.approx(1000)
    np.testing.assert_allclose(normalize_image(dark, (lo, hi)), -1.0)
    np.testing.assert_allclose(normalize_image(bright, (lo, hi)), 1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        build_unet(TINY).set_intensity_window((5.0, 5.0))


def test_grey_alpha_input_uses_the_grey_channel() -> None:
    grey = textured(30, 40)
    la = np.stack([grey, np.full_like(grey, 255)], axis=2)
    np.testing.assert_array_equal(normalize_image(la), normalize_image(grey))
