"""Fine-tuning, evaluation, hold-out split, and brush annotations → label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.jobs.train_job import holdout_split
from ml_backend.learner.inference import intensity_window, normalize_image
from ml_backend.learner.network import UNetConfig, build_unet
from ml_backend.learner.training import (
    IGNORE,
    TrainConfig,
    augment_batch,
    confusion_counts,
    evaluate,
    fine_tune,
    learning_rate,
    sample_patches,
    scores_from_counts,
    segmentation_loss,
    validation_patches,
    validation_score,
)
from sdk.annotations import AnnotationError, MaskCache, choose_annotation, label_map
from sdk.brush import mask_to_rle
from sdk.label_config import parse_brush_target
from sdk.synthetic import synthetic_em

TARGET = parse_brush_target(
    '<View><Image name="em" value="$image"/><BrushLabels name="brush" toName="em">'
    '<Label value="Membrane"/><Label value="Mito"/></BrushLabels></View>'
)


# Tiny networks on 2 busy cores: a second torch thread only slows them down.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def discs(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs on a dark noisy background, and their mask (class 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), np.uint8)
    for _ in range(4):
        cy, cx = rng.integers(8, size - 8, 2)
        r = rng.integers(5, 10)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    image = np.where(mask, 200, 40) + rng.normal(0, 15, (size, size))
    return image.clip(0, 255).astype(np.uint8), mask


# -- patches and loss -------------------------------------------------------------------------


def test_sample_patches_shapes_and_consistent_augmentation() -> None:
    image = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    mask = (image > 0.5).astype(np.uint8)
    xs, ys = sample_patches([image], [mask], 32, 16, np.random.default_rng(1))
    assert xs.shape == (16, 1, 32, 32) and xs.dtype == np.float32
    assert ys.shape == (16, 32, 32) and ys.dtype == np.int64
    assert not (ys == IGNORE).any()  # the image is larger than the patch: no padding
    # Flips/rotations are applied to image and labels alike.
    np.testing.assert_array_equal(ys, (xs[:, 0] > 0.5).astype(np.int64))
    again = sample_patches([image], [mask], 32, 16, np.random.default_rng(1))
    np.testing.assert_array_equal(again[0], xs)


def test_sample_patches_pads_small_images_with_ignore() -> None:
    small = np.ones((20, 30), np.float32)
    xs, ys = sample_patches([small], [np.ones((20, 30), np.uint8)], 32, 8, np.random.default_rng(0))
    assert xs.shape == (8, 1, 32, 32)
    for x, y in zip(xs[:, 0], ys, strict=True):
        assert (y == IGNORE).sum() == 32 * 32 - 20 * 30  # every patch holds the whole image
        assert ((y == 1) == (x == 1)).all()  # the image sits where the labels are
    # Mixed sizes: patches come from both images.
    big = np.zeros((40, 40), np.float32)
    masks = [np.ones((20, 30), np.uint8), np.zeros((40, 40), np.uint8)]
    _, ys = sample_patches([small, big], masks, 32, 40, np.random.default_rng(0))
    has_ignore = (ys == IGNORE).any(axis=(1, 2))
    assert has_ignore.any() and not has_ignore.all()


def test_segmentation_loss_ignores_ignore_pixels() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 10, generator=gen, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 10), generator=gen)
    target[..., 6:] = IGNORE
    loss = segmentation_loss(logits, target)
    # Same as the loss on the valid part only.
    cropped = segmentation_loss(logits[..., :6], target[..., :6])
    torch.testing.assert_close(loss, cropped)
    # Whatever the network says on IGNORE pixels changes nothing...
    other = logits.detach().clone()
    other[..., 6:] = torch.randn(2, 3, 8, 4, generator=gen) * 10
    torch.testing.assert_close(segmentation_loss(other, target), loss.detach())
    # ...and gets no gradient.
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[..., 6:] == 0)
    assert torch.any(logits.grad[..., :6] != 0)


def test_segmentation_loss_lower_for_right_answers() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    right = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 10
    assert float(segmentation_loss(right, target)) < 0.01
    assert float(segmentation_loss(-right, target)) > 1.0


# -- fine-tuning -------------------------------------------------------------------------------


def test_fine_tune_learns_discs() -> None:
    train = [discs(seed) for seed in range(3)]
    held_image, held_mask = discs(100)
    net = build_unet(UNetConfig(n_classes=2, base_channels=4, depth=2), seed=0)
    before = evaluate(net, [held_image], [held_mask])
    losses: list[float] = []
    config = TrainConfig(steps=30, patch_size=48, batch_size=4, learning_rate=1e-2, warmup_steps=5, seed=0)
    summary = fine_tune(
        net,
        [im for im, _ in train],
        [m for _, m in train],
        config,
        progress=lambda step, total, loss: losses.append(loss),
    )
    assert summary["steps"] == 30 and len(losses) == 30
    assert summary["final_loss"] == losses[-1]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert not net.training
    after = evaluate(net, [held_image], [held_mask])
    assert after["iou"] > 0.5
    assert after["iou"] > before["iou"]
    assert after["dice"] >= after["iou"]


def test_fine_tune_reports_the_validation_score_of_the_weights_it_returns() -> None:
    images, masks = zip(*(discs(seed, 48) for seed in range(2)), strict=True)
    val_image, val_mask = discs(50, 48)
    net = build_unet(UNetConfig(n_classes=2, base_channels=4, depth=2), seed=1)
    config = TrainConfig(steps=12, patch_size=32, batch_size=2, learning_rate=1e-2, warmup_steps=2)
    summary = fine_tune(
        net, images, masks, config, val_images=[val_image], val_masks=[val_mask], keep_start=False
    )
    assert summary["steps"] == 12 and summary["kept_start"] is False and summary["val_iou_start"] is None
    vx, vy = validation_patches(
        [normalize_image(val_image, net.intensity_window)], [val_mask], 32, config.val_crops
    )
    score = validation_score(net, torch.from_numpy(vx), torch.from_numpy(vy), chunk=2 * config.batch_size)
    assert score[0] == pytest.approx(summary["val_iou"], rel=1e-6) and 0.0 <= score[0] <= 1.0


def test_a_fresh_network_takes_the_training_data_intensity_window_and_keeps_it() -> None:
    images, masks = zip(*(discs(seed, 48) for seed in range(2)), strict=True)
    net = build_unet(UNetConfig(n_classes=2, base_channels=4, depth=2), seed=1)
    assert net.intensity_window is None
    config = TrainConfig(steps=2, patch_size=32, batch_size=2)
    fine_tune(net, images, masks, config)
    window = net.intensity_window
    assert window == pytest.approx(intensity_window(images))
    brighter = [np.clip(im.astype(np.int32) + 40, 0, 255).astype(np.uint8) for im in images]
    fine_tune(net, brighter, masks, config)  # a later run keeps the window the weights learnt with
    assert net.intensity_window == window


def test_prefetched_batches_train_the_same_weights() -> None:
    """Batches drawn ahead in a thread (the default on CUDA) are the batches drawn in the loop."""
    images, masks = zip(*(discs(seed, 48) for seed in range(3)), strict=True)
    weights = []
    for ahead in (False, True):
        net = build_unet(UNetConfig(n_classes=2, base_channels=4, depth=2, dropout=0.2), seed=3)
        config = TrainConfig(steps=6, patch_size=32, batch_size=3, seed=5)
        fine_tune(net, images, masks, config, keep_start=False, prefetch_batches=ahead)
        weights.append(net.state_dict())
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    config = TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10)
    rates = [learning_rate(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))  # never rises after the peak
    assert rates[-1] < 1e-6 and learning_rate(100, config) == pytest.approx(0.0)
    # A run shorter than four warm-ups still reaches the peak, after a quarter of its steps.
    short = TrainConfig(steps=20, learning_rate=1e-3, warmup_steps=50)
    rates = [learning_rate(step, short) for step in range(20)]
    assert max(rates) == pytest.approx(1e-3) and rates.index(max(rates)) == 4


def test_augment_batch_moves_image_and_labels_together() -> None:
    rng = np.random.default_rng(0)
    x = torch.zeros(6, 1, 32, 32)
    y = torch.zeros(6, 32, 32, dtype=torch.long)
    x[:, :, 8:20, 10:24], y[:, 8:20, 10:24] = 1.0, 1  # a bright labelled rectangle
    config = TrainConfig(contrast=1.0, brightness=0.0)  # geometry only
    ax, ay = augment_batch(x, y, config, rng)
    assert ax.shape == x.shape and ay.shape == y.shape and ay.dtype == torch.long
    assert set(torch.unique(ay).tolist()) <= {0, 1, IGNORE}
    inside = ay != IGNORE
    # Where a label survived, the image agrees with it (bilinear edges aside).
    assert (ax[:, 0][inside & (ay == 1)] > 0.5).float().mean() > 0.9
    assert (ax[:, 0][inside & (ay == 0)] < 0.5).float().mean() > 0.9
    assert not torch.equal(ay, y)  # turned by some angle or zoomed
    off = TrainConfig(rotate=False, scale=1.0, contrast=1.0, brightness=0.0)
    same_x, same_y = augment_batch(x, y, off, rng)
    assert torch.equal(same_x, x) and torch.equal(same_y, y)
    jittered, labels = augment_batch(x, y, TrainConfig(rotate=False, scale=1.0), rng)
    assert torch.equal(labels, y) and not torch.equal(jittered, x)


def test_sample_patches_draw_images_in_proportion_to_their_area() -> None:
    small, big = np.zeros((32, 32), np.float32), np.ones((128, 128), np.float32)
    masks = [np.zeros((32, 32), np.uint8), np.zeros((128, 128), np.uint8)]
    xs, _ = sample_patches([small, big], masks, 32, 400, np.random.default_rng(0))
    share_big = float((xs[:, 0, 0, 0] == 1).mean())
    assert 0.9 < share_big < 0.99  # 16/17 of the pixels


def test_validation_patches_cover_every_image_at_fixed_positions() -> None:
    images = [np.full((40, 50), k, np.float32) for k in range(5)]
    masks = [np.full((40, 50), k, np.uint8) for k in range(5)]
    masks[4] = masks[4][:20, :20]  # smaller than the crop: padded with IGNORE
    images[4] = images[4][:20, :20]
    xs, ys = validation_patches(images, masks, 32, 3)
    assert xs.shape == (5, 1, 32, 32)  # at least one crop per image, even when count is smaller
    assert [int(x[0, 0, 0]) for x in xs] == [0, 1, 2, 3, 4]
    assert (ys[4][20:, :] == IGNORE).all() and (ys[4][:20, :20] == 4).all()
    again = validation_patches(images, masks, 32, 3)
    assert np.array_equal(xs, again[0]) and np.array_equal(ys, again[1])
    assert len(validation_patches(images, masks, 32, 12)[0]) == 12


def test_fine_tune_needs_images() -> None:
    with pytest.raises(ValueError, match="no labelled images"):
        fine_tune(build_unet(UNetConfig(base_channels=4, depth=2)), [], [])


# -- scores -----------------------------------------------------------------------------------


def test_confusion_counts_by_hand() -> None:
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    truth = np.array([[0, 1, 2], [2, IGNORE, 1]])
    counts = confusion_counts(pred, truth, 3)
    # valid (pred, truth) pairs: (0,0) (1,1) (1,2) (2,2) (0,1)
    np.testing.assert_array_equal(counts, [[1, 2, 1], [1, 2, 2], [1, 1, 2]])
    scores = scores_from_counts(counts)
    # class 1: 1 / (2 + 2 - 1); class 2: 1 / (1 + 2 - 1)
    assert scores["iou"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert scores["dice"] == pytest.approx((2 / 4 + 2 / 3) / 2)


def test_scores_skip_absent_classes() -> None:
    # class 2 neither predicted nor present: not averaged in.
    counts = np.array([[10, 12, 11], [3, 4, 5], [0, 0, 0]])
    assert scores_from_counts(counts) == {"iou": pytest.approx(3 / 6), "dice": pytest.approx(6 / 9)}
    assert scores_from_counts(np.array([[5, 5, 5], [0, 0, 0]])) == {"iou": 1.0, "dice": 1.0}
    assert scores_from_counts(np.array([[0, 0, 5], [0, 5, 0]])) == {"iou": 0.0, "dice": 0.0}


def test_evaluate_perfect_and_wrong() -> None:
    image, mask = discs(3, 40)
    net = build_unet(UNetConfig(n_classes=2, base_channels=4, depth=2))
    with torch.no_grad():  # a head that always says "foreground" / "background"
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 5.0]))
    everything = evaluate(net, [image], [mask])
    assert everything["iou"] == pytest.approx(mask.sum() / mask.size)
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([5.0, 0.0]))
    assert evaluate(net, [image], [mask])["iou"] == 0.0
    assert evaluate(net, [image], [np.zeros_like(mask)])["iou"] == 1.0


# -- hold-out split ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 5, 10, 37, 200])
def test_holdout_split(n: int) -> None:
    ids = [1000 + 7 * i for i in range(n)]
    train, held = holdout_split(ids, 0.15)
    assert holdout_split(ids, 0.15) == (train, held)  # deterministic
    assert not set(train) & set(held)
    assert sorted(train + held) == list(range(n))  # positions, covering every task
    assert 1 <= len(held) < n
    if n >= 37:
        assert abs(len(held) - 0.15 * n) < 4 * (0.15 * 0.85 * n) ** 0.5  # about the fraction asked
    # Depends on the task ids, not on their order in the list.
    shuffled = ids[::-1]
    _, held_rev = holdout_split(shuffled, 0.15)
    assert sorted(shuffled[i] for i in held_rev) == sorted(ids[i] for i in held)


def test_holdout_split_is_stable_as_the_project_grows() -> None:
    """A task trained on never becomes held out later (the 'before' score stays honest)."""
    ids = [1000 + 7 * i for i in range(300)]
    trained_before: set[int] = set()
    for n in range(20, 301, 20):
        train, held = holdout_split(ids[:n], 0.15)
        held_ids = {ids[i] for i in held}
        assert not held_ids & trained_before
        trained_before |= {ids[i] for i in train}


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_holdout_split_too_few_tasks(n: int) -> None:
    assert holdout_split(list(range(n)), 0.5) == (list(range(n)), [])


def test_holdout_split_disabled() -> None:
    assert holdout_split(list(range(10)), 0.0) == (list(range(10)), [])


# -- annotations ------------------------------------------------------------------------------


def region(mask: np.ndarray, label: str, **extra: object) -> dict:
    h, w = mask.shape
    return {
        "from_name": "brush",
        "to_name": "em",
        "type": "brushlabels",
        "original_width": w,
        "original_height": h,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
        **extra,
    }


def test_choose_annotation() -> None:
    old_gt = {"id": 1, "ground_truth": True, "updated_at": "2024-01-01T00:00:00Z", "result": []}
    newer = {"id": 2, "updated_at": "2024-03-01T00:00:00Z", "result": []}
    newest = {"id": 3, "updated_at": "2024-05-01T00:00:00Z", "result": []}
    cancelled = {"id": 4, "updated_at": "2024-09-01T00:00:00Z", "result": [], "was_cancelled": True}
    assert choose_annotation({"annotations": [newer, old_gt, newest]}) is old_gt
    assert choose_annotation({"annotations": [newer, newest, cancelled]}) is newest
    assert choose_annotation({"annotations": [newest, newer]}) is newest
    cancelled_gt = {**old_gt, "was_cancelled": True}
    assert choose_annotation({"annotations": [cancelled_gt, newer]}) is newer
    assert choose_annotation({"annotations": [cancelled]}) is None
    assert choose_annotation({"annotations": []}) is None
    assert choose_annotation({}) is None
    assert choose_annotation({"annotations": None}) is None
    assert choose_annotation({"annotations": ["junk", {"id": 5, "result": None}]}) is None


def test_label_map_from_brush_regions() -> None:
    shape = (24, 32)
    a = np.zeros(shape, np.uint8)
    a[2:12, 2:20] = 255
    b = np.zeros(shape, np.uint8)
    b[8:20, 10:30] = 255
    annotation = {
        "result": [
            region(a, "Membrane"),
            region(b, "Mito"),  # later region wins where they overlap
            {"type": "rectanglelabels", "from_name": "box", "value": {"rectanglelabels": ["x"]}},
            {**region(np.ones(shape, np.uint8), "Membrane"), "from_name": "other_brush"},
        ]
    }
    labels = label_map(annotation, TARGET, shape)
    assert labels.dtype == np.uint8 and labels.shape == shape
    expected = np.zeros(shape, np.uint8)
    expected[a > 0] = 1
    expected[b > 0] = 2
    np.testing.assert_array_equal(labels, expected)
    # Reversed order: Membrane wins the overlap.
    flipped = label_map({"result": annotation["result"][1::-1]}, TARGET, shape)
    assert flipped[10, 15] == 1 and labels[10, 15] == 2


def test_label_map_empty_annotation_is_background() -> None:
    assert not label_map({"result": []}, TARGET, (5, 6)).any()


def test_label_map_errors() -> None:
    mask = np.ones((10, 12), np.uint8)
    with pytest.raises(AnnotationError, match="not one of"):
        label_map({"result": [region(mask, "Synapse")]}, TARGET, (10, 12))
    unlabelled = {**region(mask, "Mito"), "value": {"rle": [0], "brushlabels": []}}
    with pytest.raises(AnnotationError, match="not one of"):
        label_map({"result": [unlabelled]}, TARGET, (10, 12))
    with pytest.raises(AnnotationError, match="12x10 but the image is 12x11"):
        label_map({"result": [region(mask, "Mito")]}, TARGET, (11, 12))
    not_rle = region(mask, "Mito")
    not_rle["value"] = {"format": "png", "brushlabels": ["Mito"]}
    with pytest.raises(AnnotationError, match="not RLE"):
        label_map({"result": [not_rle]}, TARGET, (10, 12))


def test_mask_cache_decodes_once_per_version() -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    annotation = {"id": 7, "updated_at": "2024-01-01T00:00:00Z", "result": [region(mask, "Mito")]}
    cache = MaskCache()
    first = cache.get(annotation, TARGET, (16, 16))
    assert cache.decoded == 1
    assert first[5, 5] == 2
    assert cache.get(dict(annotation), TARGET, (16, 16)) is first
    assert cache.decoded == 1
    edited = {**annotation, "updated_at": "2024-01-02T00:00:00Z", "result": [region(mask, "Membrane")]}
    second = cache.get(edited, TARGET, (16, 16))
    assert cache.decoded == 2
    assert second[5, 5] == 1
    other_id = {**annotation, "id": 8}
    cache.get(other_id, TARGET, (16, 16))
    assert cache.decoded == 3


def test_mask_cache_is_bounded() -> None:
    cache = MaskCache(max_bytes=600)  # room for two 16x16 maps
    annotations = [{"id": i, "updated_at": "t", "result": []} for i in range(3)]
    for a in annotations:
        cache.get(a, TARGET, (16, 16))
    assert cache.decoded == 3
    cache.get(annotations[2], TARGET, (16, 16))
    assert cache.decoded == 3
    cache.get(annotations[0], TARGET, (16, 16))  # evicted: decoded again
    assert cache.decoded == 4


def test_fine_tune_never_returns_weights_worse_than_its_start() -> None:
    images, masks = zip(*(discs(seed, 48) for seed in range(2)), strict=True)
    val_image, val_mask = discs(50, 48)
    net = build_unet(UNetConfig(n_classes=2, base_channels=4, depth=2), seed=1)
    fine_tune(net, images, masks, TrainConfig(steps=40, patch_size=32, batch_size=2, learning_rate=1e-2))
    start = {k: v.clone() for k, v in net.named_parameters()}
    # A learning rate this large wrecks the weights at the first step; validation must notice.
    config = TrainConfig(steps=6, patch_size=32, batch_size=2, learning_rate=1e3, warmup_steps=1)
    summary = fine_tune(net, images, masks, config, val_images=[val_image], val_masks=[val_mask])
    assert summary["kept_start"] is True and summary["steps"] == 6
    assert summary["val_iou"] == summary["val_iou_start"] >= summary["val_iou_trained"]
    assert all(torch.equal(start[k], v) for k, v in net.named_parameters())


def test_validation_iou_decides_and_the_loss_breaks_ties() -> None:
    from ml_backend.learner.training import _improves

    assert _improves((0.5, -2.0), (0.4, -0.1))  # higher IoU wins even with a higher loss
    assert not _improves((0.4, -0.1), (0.5, -2.0))
    assert _improves((0.0, -0.5), (0.0, -0.9))  # all background so far: the loss tells progress
    assert not _improves((0.0, -0.9), (0.0, -0.9))
    net = build_unet(UNetConfig(n_classes=2, base_channels=4, depth=2), seed=0)
    x, y = torch.zeros(3, 1, 32, 32), torch.zeros(3, 32, 32, dtype=torch.long)
    iou, negative_loss = validation_score(net, x, y, chunk=2)
    assert iou == 0.0 and negative_loss < 0  # no foreground to score: only the loss counts


def test_the_workers_held_out_evaluation_tiles_like_the_backend(tmp_path, monkeypatch) -> None:
    """TILE_SIZE and TILE_OVERLAP reach the held-out IoU before and after a run, as /predict sees it."""
    import ml_backend.jobs.train_job as train_job
    from ml_backend.config import Settings

    images, masks = zip(*(discs(seed, 48) for seed in range(6)), strict=True)
    data = train_job.TrainingSet(TARGET, list(images), list(masks), list(range(1, 7)))
    monkeypatch.setattr(train_job, "fetch_training_set", lambda project, settings: data)
    seen: list[dict] = []
    real = train_job.evaluate
    monkeypatch.setattr(train_job, "evaluate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    settings = Settings(
        model_dir=tmp_path,
        tile_size=32,
        tile_overlap=8,
        train_steps=2,
        train_patch_size=32,
        train_batch_size=2,
        click_train_steps=0,
    )
    record = train_job.train_project("3", settings)
    assert record["metrics"]["n_holdout"] >= 1
    assert seen == [{"tile": 32, "overlap": 8}] * 2
    assert record["clicks"] == {"skipped": "CLICK_TRAIN_STEPS=0"}


def test_a_training_run_fine_tunes_the_click_network_and_keeps_the_better_one(tmp_path, monkeypatch) -> None:
    """The worker's click fine-tuning publishes a version only when held-out objects are found at
    least as well as before; a run that ruins the network leaves the parent served."""
    import ml_backend.jobs.train_job as train_job
    from ml_backend.config import Settings
    from ml_backend.learner.click_checkpoints import ClickCheckpointStore

    images, masks = zip(*(synthetic_em(160, 160, seed=seed) for seed in range(3)), strict=True)
    settings = Settings(model_dir=tmp_path, click_train_steps=2)
    device = torch.device("cpu")
    first = train_job.train_click_network("3", settings, list(images), list(masks), [], [], device)
    assert first["published"] is True and first["version"] == "emloop-clicks-v1"
    assert first["heldout_clicked_iou_before"] is None and first["steps"] == 2
    store = ClickCheckpointStore.for_settings(settings, "3")
    assert store.latest().name == "emloop-clicks-v1"

    hold = [[im] for im in synthetic_em(256, 256, seed=60)]  # mitochondria of 300-2000 pixels
    ruined = train_job.ClickTrainConfig(steps=3, learning_rate=1e3)
    monkeypatch.setattr(train_job, "ClickTrainConfig", lambda steps: ruined)  # wrecks the weights
    second = train_job.train_click_network("3", settings, list(images), list(masks), *hold, device)
    assert second["published"] is False and second["version"] == "emloop-clicks-v1"
    assert second["heldout_clicked_iou_after"] < second["heldout_clicked_iou_before"]
    assert store.latest().name == "emloop-clicks-v1"


def test_a_project_without_objects_to_click_skips_click_training(tmp_path) -> None:
    import ml_backend.jobs.train_job as train_job
    from ml_backend.config import Settings

    image, _ = discs(1, 64)
    empty = np.zeros((64, 64), np.uint8)
    settings = Settings(model_dir=tmp_path, click_train_steps=2)
    record = train_job.train_click_network("4", settings, [image], [empty], [], [], torch.device("cpu"))
    assert "no labelled object" in record["skipped"]
