"""Smart-tool prompts (sdk.prompts): Label Studio's clicks and boxes as pixels, and the array maths
of click-to-mask: the window, the click maps, the negative-click rule and simulated clicks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from sdk.label_config import parse_brush_target
from sdk.prompts import (
    CLICK_SIGMA,
    Click,
    Prompt,
    PromptError,
    click_maps,
    nearer_to_positive,
    object_at_clicks,
    parse_prompt,
    prompt_regions,
    prompt_window,
    shift_prompt,
    simulate_clicks,
)
from sdk.synthetic import synthetic_em


def brush(*labels: str) -> str:
    inner = "".join(f'<Label value="{label}"/>' for label in labels)
    return (
        f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{inner}'
        '</BrushLabels><KeyPointLabels name="click" toName="image" smart="true"><Label value="Mito"/>'
        '</KeyPointLabels><RectangleLabels name="box" toName="image" smart="true"><Label value="Mito"/>'
        "</RectangleLabels></View>"
    )


ONE = parse_brush_target(brush("Mitochondria"))
TWO = parse_brush_target(brush("Mitochondria", "Vesicle"))
H, W = 100, 200  # the image the annotator clicked on


def keypoint(x: float, y: float, *labels: str, positive: bool = True) -> dict:
    """A keypoint region as Label Studio sends it in `context["result"]` (x, y in percent)."""
    return {
        "id": "kp1",
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "is_positive": positive,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": list(labels)},
    }


def rectangle(x: float, y: float, width: float, height: float, *labels: str) -> dict:
    return {
        "id": "box1",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "rotation": 0,
            "rectanglelabels": list(labels),
        },
    }


def context(*regions: dict) -> dict:
    return {"result": list(regions)}


# -- parse_prompt ----------------------------------------------------------------------------------
def test_positive_and_negative_keypoints_become_pixel_clicks() -> None:
    found = parse_prompt(
        context(
            keypoint(25.0, 50.0, "Mitochondria"),
            keypoint(30.0, 60.0, "Mitochondria", positive=False),
            {"type": "brushlabels", "value": {"brushlabels": ["Mitochondria"]}},  # not a smart region
        ),
        TWO,
        H,
        W,
    )
    assert found == Prompt("Mitochondria", (Click(50.0, 50.0, True), Click(60.0, 60.0, False)))
    assert found.positives == [Click(50.0, 50.0)] and found.negatives == [Click(60.0, 60.0, False)]


def test_a_rectangle_becomes_a_pixel_box_pointing_at_its_centre() -> None:
    found = parse_prompt(context(rectangle(10.0, 20.0, 30.0, 40.0, "Vesicle")), TWO, H, W)
    assert found.label == "Vesicle" and found.clicks == ()
    assert found.box == pytest.approx((20.0, 20.0, 60.0, 80.0))
    assert found.positives == [Click(40.0, 50.0)]  # a box alone points at its centre
    both = parse_prompt(
        context(rectangle(10.0, 20.0, 30.0, 40.0, "Vesicle"), keypoint(12.0, 30.0, "Vesicle")), TWO, H, W
    )
    assert both.positives == [Click(30.0, 24.0)] and both.box == pytest.approx((20.0, 20.0, 60.0, 80.0))
    negative_only = parse_prompt(
        context(rectangle(10.0, 20.0, 30.0, 40.0), keypoint(12.0, 30.0, positive=False)), ONE, H, W
    )
    assert negative_only.positives == [Click(40.0, 50.0)] and len(negative_only.negatives) == 1


def test_coordinates_are_clipped_inside_the_image() -> None:
    found = parse_prompt(context(keypoint(-5.0, 120.0), keypoint(100.0, 0.0)), ONE, H, W)
    assert found.clicks == (Click(H - 1.0, 0.0), Click(0.0, W - 1.0))
    box = parse_prompt(context(rectangle(90.0, -10.0, 30.0, 50.0)), ONE, H, W).box
    assert box == pytest.approx((0.0, 180.0, 40.0, float(W)))
    flipped = parse_prompt(context(rectangle(40.0, 60.0, -20.0, -30.0)), ONE, H, W).box
    assert flipped == pytest.approx((30.0, 40.0, 60.0, 80.0))  # a negative size is drawn leftwards/up
    with pytest.raises(PromptError, match="empty inside the image"):
        parse_prompt(context(rectangle(110.0, 10.0, 20.0, 20.0)), ONE, H, W)


def test_the_label_must_be_a_brush_label_unless_there_is_only_one() -> None:
    for labels in ((), ("Mito",), ("anything", "at all")):
        assert parse_prompt(context(keypoint(10.0, 10.0, *labels)), ONE, H, W).label == "Mitochondria"
    assert parse_prompt(context(keypoint(10.0, 10.0, "Vesicle")), TWO, H, W).label == "Vesicle"
    assert parse_prompt(context(keypoint(10.0, 10.0, "Mito", "Vesicle")), TWO, H, W).label == "Vesicle"
    with pytest.raises(PromptError, match=r"'Mito' is not a label of <BrushLabels name='tag'>"):
        parse_prompt(context(keypoint(10.0, 10.0, "Mito")), TWO, H, W)
    with pytest.raises(PromptError, match="carries no label: choose one of the brush labels"):
        parse_prompt(context(keypoint(10.0, 10.0)), TWO, H, W)
    # A negative click's label does not name the object.
    found = parse_prompt(
        context(keypoint(10.0, 10.0, "Vesicle"), keypoint(20.0, 20.0, "Mitochondria", positive=False)),
        TWO,
        H,
        W,
    )
    assert found.label == "Vesicle"


def test_unusable_smart_regions_raise_a_prompt_error() -> None:
    with pytest.raises(PromptError, match="only negative clicks"):
        parse_prompt(context(keypoint(10.0, 10.0, "Mitochondria", positive=False)), ONE, H, W)
    bad_x = keypoint(10.0, 10.0)
    bad_x["value"]["x"] = "left"
    with pytest.raises(PromptError, match="no numeric x/y"):
        parse_prompt(context(bad_x), ONE, H, W)
    no_y = keypoint(10.0, 10.0)
    del no_y["value"]["y"]
    with pytest.raises(PromptError, match="no numeric x/y"):
        parse_prompt(context(no_y), ONE, H, W)
    with pytest.raises(PromptError, match="no finite x/y"):
        parse_prompt(context(keypoint(math.nan, 10.0)), ONE, H, W)
    no_width = rectangle(10.0, 10.0, 5.0, 5.0)
    del no_width["value"]["width"]
    with pytest.raises(PromptError, match="no numeric width/height"):
        parse_prompt(context(no_width), ONE, H, W)
    with pytest.raises(PromptError, match="has no value"):
        parse_prompt(context({"type": "keypointlabels", "value": None}), ONE, H, W)
    assert issubclass(PromptError, ValueError)


@pytest.mark.parametrize(
    "ctx",
    [
        None,
        "result",
        [],
        {},
        {"result": None},
        {"result": []},
        {"result": [{"type": "brushlabels", "value": {}}, "not a region", {"type": "choices"}]},
    ],
)
def test_a_context_without_smart_regions_is_no_prompt(ctx: object) -> None:
    assert prompt_regions(ctx) == []  # told before the image is fetched
    with pytest.raises(PromptError, match="no keypoint or rectangle"):
        parse_prompt(ctx, ONE, H, W)


def test_prompt_regions_are_the_keypoints_and_rectangles() -> None:
    point = {"type": "keypointlabels", "value": {"x": 1, "y": 2}}
    box = {"type": "rectanglelabels", "value": {}}  # unusable, but a prompt: parse_prompt says why
    context = {"result": [{"type": "brushlabels"}, point, "junk", box]}
    assert prompt_regions(context) == [point, box]


# -- window and coordinates --------------------------------------------------------------------------
def random_prompt(rng: np.random.Generator, shape: tuple[int, int]) -> Prompt:
    h, w = shape
    count = int(rng.integers(1, 5))
    positive = [i == 0 or rng.random() < 0.5 for i in range(count)]
    clicks = [Click(rng.uniform(0, h - 1), rng.uniform(0, w - 1), bool(p)) for p in positive]
    box = None
    if rng.random() < 0.4:
        y0, y1 = sorted(rng.uniform(0, h, 2))
        x0, x1 = sorted(rng.uniform(0, w, 2))
        box = (y0, x0, min(y1 + 1, h), min(x1 + 1, w))
        if rng.random() < 0.5:
            clicks = [c for c in clicks if not c.positive]  # a box alone, or with negative clicks
    return Prompt("x", tuple(clicks), box)


@pytest.mark.parametrize("shape", [(60, 80), (300, 200), (1000, 1500), (40, 700)])
@pytest.mark.parametrize("size", [32, 128, 256])
def test_the_window_is_inside_the_image_at_least_the_asked_size_and_holds_the_prompt(
    shape: tuple[int, int], size: int
) -> None:
    rng = np.random.default_rng(size + shape[0])
    for _ in range(50):
        prompt = random_prompt(rng, shape)
        y0, x0, y1, x1 = prompt_window(prompt, shape, size)
        assert all(isinstance(v, int) for v in (y0, x0, y1, x1))
        assert 0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1], (prompt, (y0, x0, y1, x1))
        assert y1 - y0 >= min(size, shape[0]) and x1 - x0 >= min(size, shape[1])
        for c in [*prompt.clicks, *prompt.positives]:
            assert y0 <= c.y < y1 and x0 <= c.x < x1, (c, (y0, x0, y1, x1))
        if prompt.box is not None:
            by0, bx0, by1, bx1 = prompt.box
            assert y0 <= by0 and x0 <= bx0 and by1 <= y1 and bx1 <= x1, (prompt.box, (y0, x0, y1, x1))


def test_a_single_click_is_centred_in_a_window_of_the_asked_size() -> None:
    window = prompt_window(Prompt("x", (Click(500.0, 400.0),)), (1000, 1000), 256)
    assert window == (372, 272, 628, 528)
    corner = prompt_window(Prompt("x", (Click(3.0, 995.0),)), (1000, 1000), 256)
    assert corner == (0, 744, 256, 1000)  # pushed inside the image, same size
    far = prompt_window(Prompt("x", (Click(100.0, 100.0), Click(100.0, 700.0, False))), (1000, 1000), 256)
    assert (
        far[3] - far[1] >= 600 + 2 * (256 // 8) and far[2] - far[0] == 256
    )  # grown to hold both, with margin


def test_shift_prompt_moves_then_scales_clicks_and_box() -> None:
    prompt = Prompt("Mito", (Click(50.0, 60.0), Click(70.0, 20.0, False)), (40.0, 10.0, 80.0, 90.0))
    moved = shift_prompt(prompt, 30, 10, scale=0.5)
    assert moved == Prompt("Mito", (Click(10.0, 25.0), Click(20.0, 5.0, False)), (5.0, 0.0, 25.0, 40.0))
    assert shift_prompt(moved, 0, 0) == moved


# -- click maps and the negative-click rule ----------------------------------------------------------
def test_click_maps_peak_at_the_clicks_in_their_own_plane() -> None:
    maps = click_maps((40, 50), [Click(10.0, 12.0), Click(30.0, 40.0, False), Click(12.0, 14.0)])
    assert maps.shape == (2, 40, 50) and maps.dtype == np.float32
    assert maps[0, 10, 12] == pytest.approx(1.0) and maps[0, 12, 14] == pytest.approx(1.0)
    assert maps[1, 30, 40] == pytest.approx(1.0)
    assert np.unravel_index(maps[1].argmax(), (40, 50)) == (30, 40)
    assert maps[0, 30, 40] < 1e-6 and maps[1, 10, 12] < 1e-6  # each plane holds its own kind only
    assert maps.max() <= 1.0  # overlapping bumps take the maximum, not the sum
    sigma_away = maps[1, 30, 40 - int(CLICK_SIGMA)]
    assert sigma_away == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert not click_maps((8, 8), []).any()
    assert (
        click_maps((20, 20), [Click(5.0, 5.0)], sigma=1.0)[0, 5, 9]
        < click_maps((20, 20), [Click(5.0, 5.0)])[0, 5, 9]
    )


def test_nearer_to_positive() -> None:
    assert nearer_to_positive((6, 7), [Click(1.0, 1.0)], []).all()
    near = nearer_to_positive((10, 15), [Click(5.0, 2.0)], [Click(5.0, 12.0, False)])
    assert near.shape == (10, 15) and near.dtype == bool
    assert near[:, :7].all() and not near[:, 7:].any()  # x = 7 is as near to both: not kept
    two = nearer_to_positive((10, 15), [Click(5.0, 2.0), Click(5.0, 14.0)], [Click(5.0, 8.0, False)])
    assert two[:, :5].all() and two[:, 12:].all() and not two[:, 6:11].any()


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


SHAPE = (80, 120)
LEFT, RIGHT = disc(SHAPE, 40, 30, 12), disc(SHAPE, 40, 90, 12)
TWO_DISCS = LEFT | RIGHT


def test_only_the_piece_holding_a_positive_click_is_kept() -> None:
    np.testing.assert_array_equal(object_at_clicks(TWO_DISCS, Prompt("x", (Click(40.0, 30.0),))), LEFT)
    both = object_at_clicks(TWO_DISCS, Prompt("x", (Click(40.0, 30.0), Click(38.0, 92.0))))
    np.testing.assert_array_equal(both, TWO_DISCS)
    assert not object_at_clicks(np.zeros(SHAPE, bool), Prompt("x", (Click(40.0, 30.0),))).any()


def test_a_negative_click_on_the_mask_splits_off_the_part_nearer_to_it() -> None:
    bar = np.zeros(SHAPE, bool)
    bar[30:50, 10:110] = True
    got = object_at_clicks(bar, Prompt("x", (Click(40.0, 20.0), Click(40.0, 80.0, False))))
    np.testing.assert_array_equal(
        got, bar & nearer_to_positive(SHAPE, [Click(40.0, 20.0)], [Click(40.0, 80.0)])
    )
    assert got[:, 10:50].any() and got[30:50, 10:50].all() and not got[:, 50:].any()
    # On another piece: that piece is cut, and dropped anyway; the clicked one stays whole.
    other = object_at_clicks(TWO_DISCS, Prompt("x", (Click(40.0, 30.0), Click(40.0, 95.0, False))))
    np.testing.assert_array_equal(other, LEFT)


def test_a_negative_click_off_the_mask_does_not_cut() -> None:
    prompt = Prompt("x", (Click(40.0, 30.0), Click(40.0, 44.0, False), Click(10.0, 60.0, False)))
    assert not TWO_DISCS[40, 44] and not TWO_DISCS[10, 60]  # background, right beside the object
    np.testing.assert_array_equal(object_at_clicks(TWO_DISCS, prompt), LEFT)


def test_the_box_restricts_the_object() -> None:
    bar = np.zeros(SHAPE, bool)
    bar[30:50, 10:110] = True
    boxed = object_at_clicks(bar, Prompt("x", (), (20.0, 40.0, 60.0, 70.0)))
    expected = np.zeros(SHAPE, bool)
    expected[30:50, 40:70] = True
    np.testing.assert_array_equal(boxed, expected)
    # A box around the left disc with a click on the right one keeps nothing of the right disc.
    clicked_outside = object_at_clicks(TWO_DISCS, Prompt("x", (Click(40.0, 90.0),), (20.0, 10.0, 60.0, 50.0)))
    np.testing.assert_array_equal(clicked_outside, LEFT)  # the nearest piece inside the box


def test_a_click_beside_an_object_snaps_to_it_and_one_far_from_everything_gives_nothing() -> None:
    near = object_at_clicks(TWO_DISCS, Prompt("x", (Click(40.0, 46.0),)))  # 4 pixels off the left disc
    np.testing.assert_array_equal(near, LEFT)
    assert ndimage.distance_transform_edt(~TWO_DISCS)[5, 60] > 4 * CLICK_SIGMA
    assert not object_at_clicks(TWO_DISCS, Prompt("x", (Click(5.0, 60.0),))).any()


# -- simulated clicks --------------------------------------------------------------------------------
def pixel(click: Click) -> tuple[int, int]:
    return int(round(click.y)), int(round(click.x))


@pytest.mark.parametrize("seed", range(6))
def test_simulated_clicks_point_at_what_they_ask_for(seed: int) -> None:
    _, mask = synthetic_em(160, 160, seed=seed, n_classes=2)
    pieces, n = ndimage.label(mask > 0)
    sizes = np.bincount(pieces.ravel())
    assert n >= 2
    rng = np.random.default_rng(seed)
    negatives_seen = 0
    for piece in [int(p) for p in np.argsort(sizes[1:])[::-1][:8] + 1]:
        target = pieces == piece
        others = (pieces > 0) & ~target
        for _ in range(5):
            clicks, wanted = simulate_clicks(target, others, rng)
            positives = [c for c in clicks if c.positive]
            negatives = [c for c in clicks if not c.positive]
            assert clicks[0].positive and target[pixel(clicks[0])]
            assert 1 <= len(positives) <= 3 and len(negatives) <= 3
            assert wanted.dtype == bool and wanted.shape == target.shape
            assert not (wanted & ~target).any()
            assert wanted.sum() >= 0.2 * target.sum()
            for c in positives:
                assert wanted[pixel(c)], (c, seed, piece)
            for c in negatives:
                assert all(0 <= v < 160 for v in pixel(c))  # jittered within half a pixel: on the image
                assert not wanted[pixel(c)], (c, seed, piece)
            negatives_seen += len(negatives)
    assert negatives_seen > 0


def test_simulated_clicks_split_objects_sometimes_and_are_reproducible() -> None:
    target = np.zeros((60, 60), bool)
    target[10:50, 10:50] = True
    runs = [simulate_clicks(target, np.zeros_like(target), np.random.default_rng(s)) for s in range(40)]
    cuts = [r for r in runs if r[1].sum() < target.sum()]
    assert cuts, "a negative click on the object itself splits it now and then"
    for clicks, wanted in cuts:
        kept = target & nearer_to_positive(
            target.shape,
            [c for c in clicks if c.positive],
            [c for c in clicks if not c.positive and target[pixel(c)]],
        )
        np.testing.assert_array_equal(wanted, kept)  # what the correction rule at inference leaves
    again = simulate_clicks(target, np.zeros_like(target), np.random.default_rng(3))
    assert again[0] == runs[3][0] and np.array_equal(again[1], runs[3][1])


def test_simulated_clicks_on_thin_and_empty_objects() -> None:
    line = np.zeros((40, 40), bool)
    line[10:12, 5:35] = True  # two pixels thick: no pixel lies "deep" inside
    for seed in range(10):
        clicks, wanted = simulate_clicks(line, np.zeros_like(line), np.random.default_rng(seed))
        assert all(line[pixel(c)] for c in clicks if c.positive) and not (wanted & ~line).any()
    with pytest.raises(ValueError, match="empty"):
        simulate_clicks(np.zeros((10, 10), bool), np.zeros((10, 10), bool), np.random.default_rng(0))
