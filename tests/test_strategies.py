"""Unit tests for sdk.strategies against hand-computed answers on tiny arrays."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from sdk import strategies as st
from sdk.strategies import (
    COLD_START_STRATEGIES,
    SCORE_STRATEGIES,
    STRATEGIES,
    _common,
    check_cold_start,
    get_strategy,
    select,
)

LN2 = math.log(2)


def h2(p: float) -> float:
    """Binary entropy in nats."""
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


def binary(p1: np.ndarray) -> np.ndarray:
    """(..., H, W) foreground probabilities -> (..., 2, H, W) softmax output."""
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1], axis=-3)


def full_image(p: float, size: int = 4) -> np.ndarray:
    return binary(np.full((size, size), p))


@pytest.fixture
def pool():
    rng = np.random.default_rng(0)
    n = 12
    probs = rng.dirichlet([1, 1, 1], size=(n, 8, 8)).transpose(0, 3, 1, 2).astype(np.float32)
    mc = np.clip(probs[None] + rng.normal(0, 0.05, size=(4, *probs.shape)), 1e-3, None)
    mc = (mc / mc.sum(axis=2, keepdims=True)).astype(np.float32)
    emb = rng.normal(size=(n, 5)).astype(np.float32)
    lab = rng.normal(size=(3, 5)).astype(np.float32)
    return {"probs": probs, "mc_probs": mc, "embeddings": emb, "labeled_embeddings": lab}


# --- pixel maps ---------------------------------------------------------------------


def test_pixel_entropy_hand_values_and_zero_safe():
    probs = binary(np.array([[0.5, 0.0], [1.0, 0.2]]))
    expected = np.array([[LN2, 0.0], [0.0, h2(0.2)]])
    np.testing.assert_allclose(st.pixel_entropy(probs), expected, atol=1e-12)
    # batch form and float32 in -> float32 out, no NaN for exact zeros
    batch = np.stack([probs, probs]).astype(np.float32)
    out = st.pixel_entropy(batch)
    assert out.dtype == np.float32 and out.shape == (2, 2, 2)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[1], expected, atol=1e-6)
    # float16 in -> float32 out, still zero-safe
    half = st.pixel_entropy(probs.astype(np.float16))
    assert half.dtype == np.float32 and np.all(np.isfinite(half))
    np.testing.assert_allclose(half, expected, atol=1e-3)
    # max is log C
    assert st.pixel_entropy(np.full((4, 1, 1), 0.25))[0, 0] == pytest.approx(math.log(4))


def test_pixel_least_confidence_and_margin_hand_values():
    # pixel A: [0.5, 0.5, 0.0]; pixel B: [0.4, 0.3, 0.3]
    probs = np.array([[0.5, 0.4], [0.5, 0.3], [0.0, 0.3]])[:, None, :]  # (C=3, H=1, W=2)
    np.testing.assert_allclose(st.pixel_least_confidence(probs), [[0.5, 0.6]])
    np.testing.assert_allclose(st.pixel_margin(probs), [[1.0, 0.9]])
    with pytest.raises(ValueError, match="at least 2 classes"):
        st.pixel_margin(np.ones((1, 2, 2)))


def test_pixel_bald_equals_hand_mutual_information():
    # one pixel, T=2 disagreeing samples: MI = H(mean) - mean(H) = ln2 - H(0.9)
    mc = np.stack([binary(np.array([[0.9]])), binary(np.array([[0.1]]))])  # (T, C, 1, 1)
    assert st.pixel_bald(mc)[0, 0] == pytest.approx(LN2 - h2(0.9))
    # agreeing samples: maximal entropy but zero mutual information
    mc_same = np.stack([binary(np.array([[0.5]]))] * 3)
    assert st.pixel_bald(mc_same)[0, 0] == pytest.approx(0.0, abs=1e-12)
    # (T, N, C, H, W) form with random values vs. the formula written out
    rng = np.random.default_rng(1)
    mc5 = rng.dirichlet([1, 2, 3], size=(3, 2, 4, 4)).transpose(0, 1, 4, 2, 3)
    mean = mc5.mean(axis=0)
    manual = -(mean * np.log(mean)).sum(1) - (-(mc5 * np.log(mc5)).sum(2)).mean(0)
    np.testing.assert_allclose(st.pixel_bald(mc5), manual, atol=1e-12)


# --- uncertainty selection ----------------------------------------------------------


def test_entropy_picks_max_entropy_image():
    probs = np.stack([full_image(0.9), full_image(0.5), full_image(0.99), full_image(0.7)])
    assert st.select("entropy", 1, probs=probs).tolist() == [1]
    assert st.select("entropy", 4, probs=probs).tolist() == [1, 3, 0, 2]
    np.testing.assert_allclose(st.score("entropy", probs=probs), [16 * h2(p) for p in (0.9, 0.5, 0.99, 0.7)])


def test_least_confidence_and_margin_order_differ():
    # image 0 is all pixel A ([.5,.5,0]), image 1 all pixel B ([.4,.3,.3])
    a = np.broadcast_to(np.array([0.5, 0.5, 0.0])[:, None, None], (3, 2, 2))
    b = np.broadcast_to(np.array([0.4, 0.3, 0.3])[:, None, None], (3, 2, 2))
    probs = np.stack([a, b])
    assert st.select("least_confidence", 2, probs=probs).tolist() == [1, 0]
    assert st.select("margin", 2, probs=probs).tolist() == [0, 1]
    np.testing.assert_allclose(st.score("least_confidence", probs=probs), [2.0, 2.4])
    np.testing.assert_allclose(st.score("margin", probs=probs), [4.0, 3.6])


def test_bald_prefers_disagreement_over_aleatoric_noise():
    # image 0: every MC sample says 0.5 (aleatoric); image 1: samples disagree (epistemic)
    img0 = np.stack([full_image(0.5), full_image(0.5)])
    img1 = np.stack([full_image(0.9), full_image(0.1)])
    mc = np.stack([img0, img1], axis=1)  # (T=2, N=2, C, H, W)
    np.testing.assert_allclose(st.score("bald", mc_probs=mc), [0.0, 16 * (LN2 - h2(0.9))])
    assert st.select("bald", 1, mc_probs=mc).tolist() == [1]
    # entropy of the MC mean cannot tell them apart: tie -> lower index first
    assert st.select("entropy", 2, mc_probs=mc).tolist() == [0, 1]


def test_reductions_sum_vs_region():
    big = np.ones((32, 32))
    big[:, :16] = 0.8  # half the tile moderately uncertain (lots of foreground)
    small = np.ones((32, 32))
    small[8:16, 8:16] = 0.5  # one compact, very uncertain 8x8 region
    probs = np.stack([binary(big), binary(small)])
    assert st.select("entropy", 1, probs=probs, reduction="sum").tolist() == [0]
    assert st.select("entropy", 1, probs=probs, reduction="mean").tolist() == [0]
    region = st.score("entropy", probs=probs, reduction="region", region_size=8)
    np.testing.assert_allclose(region, [h2(0.8), LN2])
    assert st.select("entropy", 1, probs=probs, reduction="region", region_size=8).tolist() == [1]


def test_mean_and_region_are_size_independent_but_sum_is_not():
    small, large = full_image(0.7, size=16), full_image(0.7, size=32)
    for reduction, ratio in (("sum", 4.0), ("mean", 1.0), ("region", 1.0)):
        s = st.image_score("entropy", small, reduction=reduction)
        lg = st.image_score("entropy", large, reduction=reduction)
        assert lg / s == pytest.approx(ratio), reduction


def test_region_windows_cover_border_with_full_size_windows():
    # width 20, windows of 8 -> [0:8], [8:16], [12:20]; the last is shifted, not cut
    maps = np.zeros((1, 1, 20))
    maps[0, 0, 19] = 8.0
    assert st.reduce_pixels(maps, "region", region_size=8)[0] == pytest.approx(1.0)
    maps2 = np.arange(4, dtype=float).reshape(1, 2, 2)  # one window (size clipped to 2)
    assert st.reduce_pixels(maps2, "region")[0] == pytest.approx(1.5)
    # quantile < 1 uses the distribution of window means: windows are 0, 1, 2, 3
    maps3 = np.repeat(np.arange(4.0), 2)[None, None, :]
    assert st.reduce_pixels(maps3, "region", region_size=2, region_quantile=0.5)[0] == 1.5
    with pytest.raises(ValueError, match="reduction"):
        st.reduce_pixels(maps, "max")


def test_image_score_matches_pool_score_and_mc_mean(pool):
    probs, mc = pool["probs"], pool["mc_probs"]
    for name in st.SCORE_STRATEGIES:
        for reduction in st.REDUCTIONS:
            pooled = st.score(name, probs=probs, mc_probs=mc, reduction=reduction, region_size=4)
            single = [
                st.image_score(name, probs[i], mc_one=mc[:, i], reduction=reduction, region_size=4)
                for i in range(len(probs))
            ]
            np.testing.assert_allclose(pooled, single, rtol=1e-6)
    # entropy from MC samples only == entropy of their mean
    np.testing.assert_allclose(
        st.score("entropy", mc_probs=mc), st.score("entropy", probs=mc.mean(0)), rtol=1e-5
    )


def test_chunked_computation_matches_unchunked(pool, monkeypatch):
    kw = {"probs": pool["probs"], "mc_probs": pool["mc_probs"]}
    expected = {name: st.score(name, **kw) for name in ("entropy", "bald")}
    emb, lab = pool["embeddings"], pool["labeled_embeddings"]
    coreset = st.select("coreset", 5, embeddings=emb, labeled_embeddings=lab)
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 100)  # ~1 image / 1 centre per chunk
    for name, value in expected.items():
        np.testing.assert_allclose(st.score(name, **kw), value, rtol=1e-6)
    got = st.select("coreset", 5, embeddings=emb, labeled_embeddings=lab)
    np.testing.assert_array_equal(got, coreset)
    np.testing.assert_array_equal(coreset, naive_k_center(emb, 5, lab))


def test_precomputed_scores():
    scores = np.array([0.1, 0.7, 0.7, 0.3])
    assert st.select("entropy", 3, scores=scores).tolist() == [1, 2, 3]
    assert st.select("ceal", 2, scores=scores).tolist() == [1, 2]
    with pytest.raises(ValueError, match="not both"):
        st.select("entropy", 1, scores=scores, probs=np.stack([full_image(0.5)] * 4))
    with pytest.raises(ValueError, match="reduction"):
        st.select("entropy", 1, scores=scores, reduction="mean")


# --- diversity ----------------------------------------------------------------------


def naive_k_center(points, k, labeled=None):
    """Greedy k-center written out with a full distance matrix."""
    pts = np.asarray(points, dtype=float)
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    if labeled is not None and len(labeled):
        mind = np.linalg.norm(pts[:, None] - np.asarray(labeled, float)[None], axis=-1).min(1)
        chosen = []
    else:
        first = int(np.argmin(np.linalg.norm(pts - pts.mean(0), axis=1)))
        chosen, mind = [first], dist[first].copy()
    while len(chosen) < k:
        masked = mind.copy()
        masked[chosen] = -np.inf
        i = int(np.argmax(masked))
        chosen.append(i)
        mind = np.minimum(mind, dist[i])
    return np.array(chosen)


POINTS = np.array([[0, 0], [1, 0], [5, 0], [0, 4], [10, 10]], dtype=float)


def test_coreset_matches_hand_run_greedy_k_center():
    # hand run with labeled {(0,0)}: min dists 0,1,5,4,14.1 -> (10,10); then (5,0)
    # (min dist 5 vs 4 for (0,4)); then (0,4) (4 vs 1); then (1,0)
    got = st.select("coreset", 4, embeddings=POINTS, labeled_embeddings=[[0.0, 0.0]])
    assert got.tolist() == [4, 2, 3, 1]
    # cold start: mean (3.2, 2.8) is nearest (5,0); then (10,10); then (0,4)
    assert st.select("coreset", 3, embeddings=POINTS).tolist() == [2, 4, 3]
    assert st.select("coreset", 3, embeddings=POINTS, labeled_embeddings=np.empty((0, 2))).tolist() == [
        2,
        4,
        3,
    ]
    rng = np.random.default_rng(3)
    pts, lab = rng.normal(size=(40, 2)), rng.normal(size=(4, 2))
    np.testing.assert_array_equal(
        st.select("coreset", 10, embeddings=pts, labeled_embeddings=lab),
        naive_k_center(pts, 10, lab),
    )
    np.testing.assert_array_equal(st.select("coreset", 10, embeddings=pts), naive_k_center(pts, 10))


def test_coreset_with_duplicates_returns_distinct():
    pts = np.array([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2)
    got = st.select("coreset", 5, embeddings=pts)
    assert sorted(got.tolist()) == [0, 1, 2, 3, 4]


def test_kmeans_picks_sample_nearest_each_centroid():
    a = [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]]  # centroid (0,0), size 5
    b = [[100, 0], [100, 1], [100, -1], [101, 0]]  # centroid (100.25,0), size 4
    c = [[0, 100], [0, 101], [0, 102]]  # centroid (0,101), size 3
    pts = np.array(a + b + c, dtype=float)
    perm = np.random.default_rng(0).permutation(len(pts))
    shuffled = pts[perm]
    inv = np.argsort(perm)  # inv[original index] = position in shuffled
    got = st.select("kmeans", 3, embeddings=shuffled, seed=0)
    assert got.tolist() == [inv[0], inv[5], inv[10]]  # largest cluster first


def test_kmeans_shared_nearest_sample_takes_next_unused():
    pts = np.array([[0.0, 0.0]] * 3 + [[50.0, 50.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn: fewer distinct points than clusters
        got = st.select("kmeans", 3, embeddings=pts, seed=0)
    assert len(set(got.tolist())) == 3


def test_cluster_count_grows_with_the_pool_within_bounds():
    assert [st.cluster_count(n) for n in (0, 1, 4, 5, 8, 50, 2000)] == [1, 1, 1, 2, 2, 5, 32]
    assert st.cluster_count(10**6) == st.MAX_CLUSTERS
    with pytest.raises(ValueError, match=">= 0"):
        st.cluster_count(-1)


def test_cluster_labels_group_near_duplicates_deterministically():
    # Eight tight blobs of 50 (a pool of 400 gets round(sqrt(200)) = 14 clusters): no cluster
    # mixes two blobs.
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=100.0, size=(8, 6))
    blob = np.repeat(np.arange(8), 50)
    pts = centres[blob] + rng.normal(scale=0.5, size=(400, 6))
    labels = st.cluster_labels(pts, seed=0)
    assert labels.dtype == np.int64 and labels.shape == (400,)
    assert set(labels.tolist()) == set(range(14))
    for cluster in range(14):
        assert len(set(blob[labels == cluster].tolist())) == 1
    np.testing.assert_array_equal(labels, st.cluster_labels(pts, seed=0))


def test_cluster_labels_tiny_and_duplicate_pools():
    assert st.cluster_labels(np.zeros((0, 3))).shape == (0,)
    np.testing.assert_array_equal(st.cluster_labels(np.arange(8.0).reshape(4, 2)), [0, 0, 0, 0])
    # 18 samples ask for 3 clusters, but only 2 distinct points exist.
    pts = np.array([[0.0, 0.0]] * 9 + [[5.0, 5.0]] * 9)
    labels = st.cluster_labels(pts)
    assert len(set(labels[:9].tolist())) == len(set(labels[9:].tolist())) == 1 and labels[0] != labels[9]


def test_random_deterministic_per_seed():
    a = st.select("random", 10, n=1000, seed=1)
    b = st.select("random", 10, embeddings=np.zeros((1000, 2)), seed=1)
    c = st.select("random", 10, n=1000, seed=2)
    np.testing.assert_array_equal(a, b)
    assert a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 1000


# --- all strategies -----------------------------------------------------------------


@pytest.mark.parametrize("name", st.STRATEGIES)
@pytest.mark.parametrize("k", [0, 1, 5, 12])
def test_all_strategies_return_k_distinct_deterministic(pool, name, k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = st.select(name, k, seed=0, **pool)
        b = st.select(name, k, seed=0, **pool)
    assert a.dtype == np.int64 and a.shape == (k,)
    assert len(set(a.tolist())) == k
    assert np.all((a >= 0) & (a < 12))
    np.testing.assert_array_equal(a, b)


def test_cold_start_strategies_need_only_embeddings(pool):
    for name in st.COLD_START_STRATEGIES:
        assert len(st.select(name, 3, embeddings=pool["embeddings"], seed=0)) == 3


# --- errors -------------------------------------------------------------------------


def test_errors(pool):
    probs, emb = pool["probs"], pool["embeddings"]
    with pytest.raises(ValueError, match="valid strategies: random, entropy"):
        st.select("entropyy", 1, probs=probs)
    with pytest.raises(ValueError, match="needs probs or mc_probs"):
        st.select("entropy", 1, embeddings=emb)
    with pytest.raises(ValueError, match="mc_probs"):
        st.select("bald", 1, probs=probs)
    with pytest.raises(ValueError, match="needs embeddings"):
        st.select("coreset", 1, probs=probs)
    with pytest.raises(ValueError, match="needs embeddings"):
        st.select("hybrid", 1, probs=probs)
    with pytest.raises(ValueError, match="pool size"):
        st.select("random", 1)
    with pytest.raises(ValueError, match="unknown option"):
        st.select("entropy", 1, probs=probs, beta=3)
    with pytest.raises(ValueError, match="unknown option"):
        st.select("coreset", 1, embeddings=emb, reduction="sum")
    with pytest.raises(ValueError, match="larger than the pool"):
        st.select("entropy", 13, probs=probs)
    with pytest.raises(ValueError, match=">= 0"):
        st.select("kmeans", -1, embeddings=emb)
    with pytest.raises(ValueError, match="4-D"):
        st.select("entropy", 1, probs=probs[0])
    with pytest.raises(ValueError, match="2-D"):
        st.select("coreset", 1, embeddings=emb[:, :, None])
    with pytest.raises(ValueError, match="disagree"):
        st.select("hybrid", 1, probs=probs, embeddings=emb[:5])
    with pytest.raises(ValueError, match="dimension"):
        st.select("coreset", 1, embeddings=emb, labeled_embeddings=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="no per-sample score"):
        st.score("kmeans", probs=probs)
    with pytest.raises(ValueError, match="valid strategies"):
        st.score("nope", probs=probs)
    with pytest.raises(ValueError, match="uncertainty must be"):
        st.select("ceal", 1, probs=probs, uncertainty="kmeans")


# --- CEAL ---------------------------------------------------------------------------


def test_ceal_threshold_decays_linearly_to_zero():
    assert st.ceal_threshold(0.05, 0.01, 0) == pytest.approx(0.05)
    assert st.ceal_threshold(0.05, 0.01, 2) == pytest.approx(0.03)
    assert st.ceal_threshold(0.05, 0.01, 10) == 0.0
    with pytest.raises(ValueError):
        st.ceal_threshold(-1, 0.1, 0)


def test_ceal_query_and_pseudo_are_disjoint():
    ps = [0.5, 1 - 2**-10, 0.6, 2**-10, 0.998, 0.9]  # exact binary fractions
    probs = np.stack([full_image(p) for p in ps])
    threshold = 0.1  # mean entropies: 0.69, 0.0077, 0.67, 0.0077, 0.014, 0.33
    sel = st.select_ceal(2, probs=probs, threshold=threshold)
    assert sel.query.tolist() == [0, 2]
    assert sel.query.tolist() == st.select("ceal", 2, probs=probs).tolist()
    assert sel.pseudo.tolist() == [1, 3, 4]  # most confident first, tie by index
    np.testing.assert_array_equal(sel.pseudo_labels[:, 0, 0], [1, 0, 1])
    assert sel.pseudo_labels.shape == (3, 4, 4) and sel.pseudo_labels.dtype == np.uint8
    # a confident sample that is also queried never becomes a pseudo-label
    sel_all = st.select_ceal(6, probs=probs, threshold=threshold)
    assert sel_all.pseudo.size == 0
    big = st.select_ceal(5, probs=probs, threshold=1.0)
    assert set(big.query.tolist()).isdisjoint(big.pseudo.tolist())
    assert sorted(big.query.tolist() + big.pseudo.tolist()) == list(range(6))
    # standalone helper with exclude / max_samples
    idx, labels = st.ceal_pseudo_labels(probs, threshold, exclude=[3], max_samples=1)
    assert idx.tolist() == [1] and labels.shape == (1, 4, 4)


# --- hybrid -------------------------------------------------------------------------


def test_hybrid_spreads_over_clusters_where_entropy_takes_duplicates():
    probs = np.stack([full_image(0.5)] * 6 + [full_image(0.99)])
    emb = np.array([[0, 0]] * 3 + [[10, 10]] * 3 + [[100, 100]], dtype=float)
    assert st.select("entropy", 2, probs=probs).tolist() == [0, 1]
    assert st.select("hybrid", 2, probs=probs, embeddings=emb, beta=3).tolist() == [0, 3]
    # the confident far-away outlier is filtered out by the uncertainty pre-filter...
    assert 6 not in st.select("hybrid", 3, probs=probs, embeddings=emb, beta=2).tolist()
    # ...and a labeled set covering cluster A sends the first pick to cluster B
    got = st.select("hybrid", 1, probs=probs, embeddings=emb, labeled_embeddings=[[0.0, 0.0]])
    assert got.tolist() == [3]


def test_hybrid_prefers_more_uncertain_at_equal_distance():
    scores = np.array([1.0, 0.5, 0.9])
    emb = np.array([[0.0, 0.0], [5.0, 0.0], [-5.0, 0.0]])
    # after taking 0, points 1 and 2 are equally far; 2 is more uncertain
    assert st.select("hybrid", 2, scores=scores, embeddings=emb).tolist() == [0, 2]
    with pytest.raises(ValueError, match="non-negative"):
        st.select("hybrid", 1, scores=-scores, embeddings=emb)


# -- the registry ---------------------------------------------------------------------------------
def _inputs_for(spec, rng: np.random.Generator, n: int = 12) -> dict:
    """Exactly the inputs the registry says a strategy needs (precomputed scores for uncertainty)."""
    inputs: dict = {}
    if spec.ranks_by_uncertainty:
        inputs["scores"] = rng.random(n)
    if spec.needs_embeddings:
        inputs["embeddings"] = rng.normal(size=(n, 5))
    if spec.uses_labeled_embeddings:
        inputs["labeled_embeddings"] = rng.normal(size=(3, 5))
    if not spec.needs_model_outputs:
        inputs["n"] = n
    return inputs


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_selects_from_what_the_registry_says_it_needs(name: str) -> None:
    spec = get_strategy(name)
    inputs = _inputs_for(spec, np.random.default_rng(0))
    picked = select(name, 4, seed=0, **inputs)
    assert len(set(picked.tolist())) == 4
    for needed in ("scores", "embeddings"):
        if needed in inputs:
            with pytest.raises(ValueError):
                select(name, 4, seed=0, **{k: v for k, v in inputs.items() if k != needed})


def test_registry_facts() -> None:
    assert set(COLD_START_STRATEGIES) == {s for s in STRATEGIES if get_strategy(s).cold_start}
    assert [get_strategy(s).uncertainty() for s in SCORE_STRATEGIES] == list(SCORE_STRATEGIES)
    assert get_strategy("hybrid").uncertainty("bald") == "bald"
    assert get_strategy("kmeans").uncertainty() is None and not get_strategy("random").needs_model_outputs
    with pytest.raises(ValueError, match="unknown strategy 'nope'; valid strategies: random, entropy"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        get_strategy("ceal").uncertainty("kmeans")
    with pytest.raises(ValueError, match="cold-start strategy must be one of kmeans, coreset, random"):
        check_cold_start("entropy")
