"""Scoring a pool with the model (ml_backend.learner.scoring) and the pure priority helpers (sdk.priority)."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ml_backend.config import Settings
from ml_backend.images import ImageError
from ml_backend.jobs.ranking import RankedTask, Ranking, ScoringOptions, rank_tasks
from ml_backend.learner.checkpoints import Version
from ml_backend.learner.inference import normalize_image, predict_image
from ml_backend.learner.network import UNetConfig, build_unet
from ml_backend.learner.scoring import PoolScores, score_kind, score_pool
from sdk import priority
from sdk.label_config import parse_brush_target
from sdk.queue_order import write_order
from sdk.strategies import SCORE_STRATEGIES, cluster_labels, image_score, score, select
from sdk.synthetic import synthetic_em

from .helpers import BRUSH_CONFIG

CPU = torch.device("cpu")
TINY = UNetConfig(n_classes=3, base_channels=4, depth=2)


@pytest.fixture(scope="module")
def net():
    model = build_unet(TINY, seed=3)
    # Non-trivial BatchNorm statistics, so the untrained network's outputs vary between images;
    # drawn from their own generator, so earlier tests' use of torch's global one changes nothing.
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


def em_images(shapes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    return [synthetic_em(h, w, seed=seed + i)[0] for i, (h, w) in enumerate(shapes)]


EQUAL = [(32, 40)] * 5


def run(net, images, strategy, **kw):
    kw.setdefault("device", CPU)
    kw.setdefault("progress", False)
    return score_pool(net, images, strategy, **kw)


# -- what is computed -----------------------------------------------------------------------------------
def test_outputs_have_the_shapes_select_takes(net):
    images = em_images([(32, 40), (32, 40), (24, 36), (40, 28)])
    out = run(net, images, "entropy", keep_maps=True, keep_labels=True)
    dim = TINY.base_channels * 2**TINY.depth
    assert out.embeddings.shape == (4, dim) and out.embeddings.dtype == np.float32
    assert out.scores.shape == (4,) and out.scores.dtype == np.float64
    assert out.score_kind == out.map_kind == "entropy"
    assert out.probs is None and out.mc_probs is None  # reduced as it went
    assert out.shapes == [im.shape for im in images]
    assert [m.shape for m in out.uncertainty_maps] == out.shapes
    assert [m.shape for m in out.label_maps] == out.shapes
    assert all(m.dtype == np.uint8 and m.max() < TINY.n_classes for m in out.label_maps)
    assert np.all(out.scores > 0) and len(set(out.scores.round(6))) == 4
    for image, s, m in zip(images, out.scores, out.uncertainty_maps, strict=True):
        probs = predict_image(net, image, device=CPU).probs
        assert s == pytest.approx(image_score("entropy", probs), rel=1e-5)
        assert m.sum() == pytest.approx(s, rel=1e-5)

    full = run(net, em_images(EQUAL), "bald", mc_samples=3, keep_probs=True, keep_mc_probs=True)
    assert full.probs.shape == (5, 3, 32, 40)
    assert full.mc_probs.shape == (3, 5, 3, 32, 40)
    np.testing.assert_allclose(full.probs.sum(axis=1), 1.0, atol=1e-5)
    assert select("bald", 2, mc_probs=full.mc_probs).tolist() == full.select("bald", 2).tolist()


def test_what_each_strategy_needs(net):
    images = em_images([(32, 32)] * 3)
    for strategy in ("random", "kmeans", "coreset", None):
        out = run(net, images, strategy)
        assert out.scores is None and out.score_kind is None and out.embeddings.shape == (3, 16)
    assert score_kind("ceal") == score_kind("hybrid") == "entropy"
    assert score_kind("hybrid", "margin") == "margin"
    assert run(net, images, "hybrid", uncertainty="margin").score_kind == "margin"
    with pytest.raises(ValueError, match="unknown strategy"):
        run(net, images, "nope")
    with pytest.raises(ValueError, match="one size"):
        run(net, em_images([(32, 32), (32, 36)]), "entropy", keep_probs=True)
    with pytest.raises(ValueError, match="reduction"):
        run(net, images, "entropy", reduction="median")


@pytest.mark.parametrize("reduction", ["sum", "mean", "region"])
@pytest.mark.parametrize("strategy", SCORE_STRATEGIES)
def test_streaming_scores_equal_score_on_materialised_probs(net, strategy, reduction):
    images = em_images(EQUAL, seed=10)
    opts = {"reduction": reduction, "region_size": 8, "mc_samples": 4}
    streamed = run(net, images, strategy, **opts)
    full = run(net, images, strategy, keep_probs=True, keep_mc_probs=strategy == "bald", **opts)
    expected = score(
        strategy,
        probs=None if strategy == "bald" else full.probs,
        mc_probs=full.mc_probs,
        reduction=reduction,
        region_size=8,
    )
    np.testing.assert_allclose(streamed.scores, expected, rtol=1e-5)
    np.testing.assert_allclose(full.scores, expected, rtol=1e-6)


def test_pool_probabilities_are_the_backends_predictions(net):
    """Batched single-tile passes give what predict_image (the backend) gives per image."""
    images = em_images(EQUAL, seed=20)
    full = run(net, images, "entropy", keep_probs=True, batch_size=3)
    for image, probs in zip(images, full.probs, strict=True):
        np.testing.assert_allclose(probs, predict_image(net, image, device=CPU).probs, atol=1e-5)
    one_by_one = run(net, images, "entropy", batch_size=1)
    np.testing.assert_allclose(one_by_one.scores, full.scores, rtol=1e-5)


def test_images_larger_than_a_tile_are_tiled_like_the_backend(net):
    images = em_images([(48, 56), (32, 32), (60, 40)], seed=30)
    out = run(net, images, "margin", tile=32, overlap=8, keep_maps=True)
    embed_only = run(net, images, "coreset", tile=32, overlap=8)
    for i, image in enumerate(images):
        pred = predict_image(net, image, tile=32, overlap=8, device=CPU, with_embedding=True)
        assert out.scores[i] == pytest.approx(image_score("margin", pred.probs), rel=1e-5)
        np.testing.assert_allclose(out.embeddings[i], pred.embedding, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(embed_only.embeddings[i], pred.embedding, rtol=1e-5, atol=1e-6)


def test_mc_samples_differ_across_passes_and_are_reproducible(net):
    images = em_images(EQUAL[:3], seed=40)
    a = run(net, images, "bald", mc_samples=4, keep_mc_probs=True, keep_probs=True, seed=1)
    t = a.mc_probs.shape[0]
    assert t == 4
    for i in range(t):
        for j in range(i + 1, t):
            assert not np.allclose(a.mc_probs[i], a.mc_probs[j], atol=1e-4), (i, j)
        assert not np.allclose(a.mc_probs[i], a.probs, atol=1e-4)
    assert np.all(a.scores > 0)
    b = run(net, images, "bald", mc_samples=4, keep_mc_probs=True, seed=1)
    np.testing.assert_array_equal(a.mc_probs, b.mc_probs)
    c = run(net, images, "bald", mc_samples=4, keep_mc_probs=True, seed=2)
    assert not np.allclose(a.mc_probs, c.mc_probs)
    assert not net.bottleneck_dropout.always_on, "MC dropout must be switched off afterwards"


def test_embeddings_match_net_embed_on_a_single_tile_image(net):
    (image,) = em_images([(32, 44)], seed=50)  # multiples of 2**depth: no padding
    x = torch.from_numpy(normalize_image(image))[None, None]
    expected = net.embed(x)[0].numpy()
    for strategy in ("kmeans", "entropy", "bald"):
        out = run(net, [image], strategy, mc_samples=2)
        np.testing.assert_allclose(out.embeddings[0], expected, rtol=1e-5, atol=1e-6, err_msg=strategy)


def test_select_on_pool_scores_matches_select_on_materialised_probs(net):
    images = em_images([(32, 32)] * 8, seed=60)
    full = run(net, images, "entropy", keep_probs=True)
    streamed = run(net, images, "entropy")
    for strategy in ("entropy", "ceal", "hybrid"):
        expected = select(strategy, 3, probs=full.probs, embeddings=full.embeddings)
        assert streamed.select(strategy, 3).tolist() == expected.tolist(), strategy
    for strategy in ("kmeans", "coreset", "random"):
        expected = select(strategy, 3, embeddings=full.embeddings, seed=0)
        assert streamed.select(strategy, 3, seed=0).tolist() == expected.tolist(), strategy
    with pytest.raises(ValueError, match="bald needs bald scores"):
        streamed.select("bald", 3)


def test_pool_scores_round_trip_through_npz(net, tmp_path):
    images = em_images([(32, 32), (24, 40)], seed=70)
    out = run(net, images, "bald", mc_samples=2, keep_maps=True, keep_labels=True)
    out.save(tmp_path / "s.npz", task_ids=np.array([5, 9]))
    back, extra = PoolScores.load(tmp_path / "s.npz")
    assert extra["task_ids"].tolist() == [5, 9]
    np.testing.assert_array_equal(back.scores, out.scores)
    np.testing.assert_array_equal(back.embeddings, out.embeddings)
    assert (back.score_kind, back.map_kind, back.shapes) == ("bald", "bald", out.shapes)
    for a, b in zip(
        back.uncertainty_maps + back.label_maps, out.uncertainty_maps + out.label_maps, strict=True
    ):
        np.testing.assert_array_equal(a, b)


# -- ranking tasks ------------------------------------------------------------------------------------------
def test_rank_tasks_picks_describes_and_skips_unreadable_images(net):
    target = parse_brush_target(BRUSH_CONFIG)
    net2 = build_unet(UNetConfig(n_classes=2, base_channels=4, depth=2), seed=1)
    images = {f"img{i}": im for i, im in enumerate(em_images([(32, 32)] * 6 + [(40, 24)], seed=80))}

    def load(url: str) -> np.ndarray:
        if url == "broken":
            raise ImageError("broken: HTTP 404")
        return images[url]

    pool = [(100 + i, f"img{i}") for i in range(7)] + [(200, "broken")]
    trained = Version(1, "emloop-v1-abcdef")
    ranking, scores = rank_tasks(
        net2, trained, target, load, pool, strategy="entropy", k=3, heatmaps=True, device=CPU, progress=False
    )
    assert (ranking.strategy, ranking.requested, ranking.trained) == ("entropy", "entropy", True)
    assert ranking.skipped == {200: "broken: HTTP 404"}
    assert len(scores) == 7 and ranking.pool_size == 8
    order = np.argsort(-scores.scores, kind="stable")[:3]
    assert [r.task for r in ranking.ranked] == [100 + int(i) for i in order]
    assert [r.score for r in ranking.ranked] == pytest.approx(scores.scores[order].tolist())
    for item in ranking.ranked:
        assert item.heatmap.startswith("data:image/png;base64,")
        for region in item.result:
            assert region["from_name"] == "organelle" and region["value"]["format"] == "rle"
    assert Ranking.from_dict(ranking.to_dict()) == ranking

    untrained = Version(0, "emloop-v0-abcdef")
    cold, _ = rank_tasks(
        net2, untrained, target, load, pool, strategy="bald", k=2, device=CPU, progress=False
    )
    assert cold.strategy == "kmeans" and "cold start" in cold.note and "'bald'" in cold.note
    kept = [t for t, _ in pool if t != 200]
    emb = run(net2, [images[f"img{i}"] for i in range(7)], None).embeddings
    assert [r.task for r in cold.ranked] == [kept[i] for i in select("kmeans", 2, embeddings=emb, seed=0)]
    assert all(r.score is None for r in cold.ranked)

    lab = [(300, "img0"), (301, "img1")]
    opts = ScoringOptions(batch_size=2)
    covered, _ = rank_tasks(
        net2, trained, target, load, pool[2:7], lab, strategy="coreset", k=2, describe=False, options=opts
    )
    pool_emb = emb[2:7]
    lab_emb = emb[:2]
    expected = select("coreset", 2, embeddings=pool_emb, labeled_embeddings=lab_emb)
    assert [r.task for r in covered.ranked] == [102 + int(i) for i in expected]
    assert all(r.result is None and r.cluster is None for r in covered.ranked)

    # Clusters come from the pool pass's embeddings: every ranked task carries its pool cluster.
    clustered, pool_scores = rank_tasks(
        net2, trained, target, load, pool, strategy="entropy", k=7, describe=False, clusters=True,
        device=CPU, progress=False,
    )  # fmt: skip
    labels = cluster_labels(pool_scores.embeddings, seed=0)
    assert [r.cluster for r in clustered.ranked] == [
        int(labels[kept.index(r.task)]) for r in clustered.ranked
    ]
    assert len(set(labels.tolist())) == 2  # 7 images: round(sqrt(3.5)) clusters
    assert Ranking.from_dict(clustered.to_dict()) == clustered


# -- sdk.priority helpers ---------------------------------------------------------------------------------
def test_choose_strategy_at_cold_start():
    assert priority.choose_strategy("bald", "m-v3", trained=True)[0] == "bald"
    used, note = priority.choose_strategy("entropy", "m-v0", trained=False)
    assert used == "kmeans" and "cold start" in note and "'entropy'" in note
    assert priority.choose_strategy("coreset", "m-v0", trained=False)[0] == "coreset"
    assert priority.choose_strategy("hybrid", "m-v0", trained=False, cold_start="random")[0] == "random"
    with pytest.raises(ValueError, match="unknown strategy"):
        priority.choose_strategy("nope", "m", trained=True)
    with pytest.raises(ValueError, match="cold-start"):
        priority.choose_strategy("entropy", "m", trained=False, cold_start="entropy")


def test_priority_names_and_scores():
    from datetime import datetime, timezone

    name = priority.priority_version(
        "emloop-v2-abc123", "bald", datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    )
    assert name == "emloop-v2-abc123+bald@20250102-030405"
    assert priority.is_priority_version(name) and priority.is_priority_version(name + ".2")
    assert not priority.is_priority_version("emloop-v2-abc123") and not priority.is_priority_version(None)
    assert priority.unique_version(name, [name, name + ".2"]) == name + ".3"
    scores = priority.rank_scores(4)
    assert scores == sorted(scores) and min(scores) > 0 and max(scores) < 1


def test_serving_order_is_label_studios_least_solved_cluster_first():
    # Ranks 1-6 in clusters 0,0,0,1,1,2: what Label Studio 1.23.2's /next served one annotator
    # in a one-off check (each task annotated as served).
    assert priority.serving_order([0, 0, 0, 1, 1, 2], 6) == [0, 3, 5, 1, 4, 2]
    assert priority.serving_order([4, 4, 9, 4], 3) == [0, 2, 1]
    assert priority.serving_order([3] * 5, 5) == [0, 1, 2, 3, 4]  # one cluster: the ranking itself
    assert priority.serving_order([1, 2], 0) == []
    with pytest.raises(ValueError, match="k must be"):
        priority.serving_order([0, 1], 3)


class FakeLabelStudio:
    """Records requests; GETs answer like a project with one older priority version and no views."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []

    def request(self, method: str, path: str, **kw) -> SimpleNamespace:
        self.calls.append((method, path, kw.get("json")))
        body = [] if path == "/api/dm/views" else {"old+entropy@20250101-000000": 3}
        return SimpleNamespace(json=lambda: body)


@pytest.mark.parametrize("clusters", [None, [1, 0, 1]])
def test_write_order_posts_predictions_with_their_clusters(clusters):
    api = FakeLabelStudio()
    ranked = [
        RankedTask(task=task, score=0.5, result=[], cluster=None if clusters is None else clusters[i])
        for i, task in enumerate([12, 10, 11])
    ]
    order = Ranking("emloop-v2-abc", True, "entropy", "entropy", "", 3, ranked)
    tasks = [{"id": t, "data": {"image": f"/{t}.png"}} for t in (10, 11, 12)]
    written = write_order(api, {"id": 5, "label_config": ""}, order, tasks, say=lambda _: None)
    posts = [(path, body) for method, path, body in api.calls if method == "POST" and "predictions" in path]
    if clusters is None:  # one bulk import; Label Studio's bulk import would drop a cluster
        ((path, predictions),) = posts
        assert path == "/api/projects/5/import/predictions"
        assert all("cluster" not in p for p in predictions)
    else:
        assert {path for path, _ in posts} == {"/api/predictions"}
        predictions = [body for _, body in posts]
        assert [p["cluster"] for p in predictions] == clusters
    assert [p["task"] for p in predictions] == [12, 10, 11]
    assert [p["score"] for p in predictions] == priority.rank_scores(3)
    assert {p["model_version"] for p in predictions} == {written.version}
    switch = {"model_version": written.version, "sampling": "Uncertainty sampling"}
    assert ("PATCH", "/api/projects/5", switch) in api.calls
    assert written.removed_versions == 1


@pytest.mark.parametrize(("raw", "expected"), [("", True), ("0", False), ("off", False), ("Yes", True)])
def test_the_closed_loop_clusters_unless_told_not_to(monkeypatch, raw, expected):
    monkeypatch.setenv("QUEUE_CLUSTERS", raw)
    assert Settings.from_env().queue_clusters is expected


def test_updated_task_data_rules():
    upd = priority.updated_task_data
    assert upd({"img": "a"}, rank=2) == {"img": "a", "priority": 2}
    assert upd({"img": "a", "priority": 2}, rank=2) is None
    assert upd({"img": "a", "priority": 2}, rank=None) == {"img": "a"}
    assert upd({"img": "a"}, rank=None) is None
    assert upd({"img": "a"}, rank=1, heatmap="data:x") == {"img": "a", "priority": 1, "uncertainty": "data:x"}
    stale = {"img": "a", "priority": 1, "uncertainty": "data:old"}
    ph = priority.PLACEHOLDER_URI
    assert upd(stale, rank=None, manage_heatmaps=True) == {"img": "a", "uncertainty": ph}
    assert upd(stale, rank=None, manage_heatmaps=True, labeled=True) == {
        "img": "a",
        "uncertainty": "data:old",
    }
    assert upd({"img": "a"}, rank=None, heatmap_required=True) == {"img": "a", "uncertainty": ph}


def test_heatmap_png_is_colour_mapped_and_downsampled():
    values = np.tile(np.linspace(0, np.log(2), 1200, dtype=np.float32), (300, 1))
    uri = priority.heatmap_uri(values, priority.heatmap_vmax("entropy", 2))
    assert uri.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    assert image.size == (512, 128)
    rgb = np.asarray(image)
    np.testing.assert_array_equal(rgb[0, 0], priority.PALETTE[0])
    np.testing.assert_array_equal(rgb[0, -1], priority.PALETTE[255])
    assert priority.heatmap_vmax("bald", 2, [np.array([0.1, 0.3])]) == pytest.approx(0.3)
    assert priority.heatmap_vmax("least_confidence", 4) == pytest.approx(0.75)
    small = priority.downsample(np.ones((10, 20)))
    assert small.shape == (10, 20)
