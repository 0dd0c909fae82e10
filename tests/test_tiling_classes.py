"""sdk.tiling.classes: the --classes syntax, default classes and the label → class-id mapping."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.tiling import default_classes, format_classes, map_classes, parse_classes

VNC_LABELS = np.array([0, 32, 64, 96, 128, 159, 191, 223, 255], np.uint8)  # VNC stack1/labels values


def test_parse_the_vnc_specs() -> None:
    assert parse_classes("membranes=0-128,glia=159,mitochondria=191,synapses=223") == [
        ("membranes", [(0, 128)]),
        ("glia", [(159, 159)]),
        ("mitochondria", [(191, 191)]),
        ("synapses", [(223, 223)]),
    ]
    assert parse_classes(" organelles = 191 + 223 ") == [("organelles", [(191, 191), (223, 223)])]
    assert parse_classes("mitochondria=1-255") == [("mitochondria", [(1, 255)])]
    assert parse_classes("a=1-5+3") == [("a", [(1, 5), (3, 3)])]  # overlap within a class is a merge


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("mito", "not name=values"),
        ("=3", "empty name"),
        ("a=1,a=2", "'a' appears twice"),
        ("a=x", "bad value 'x'"),
        ("a=1.5", "bad value '1.5'"),
        ("a=-1", "bad value '-1'"),
        ("a=1+", "bad value ''"),
        ("a=5-", "bad value '5-'"),
        ("a=9-3", "reversed range 9-3"),
        ("a=1-10,b=5", r"value\(s\) 5 claimed by both 'a' and 'b'"),
        ("a=1-10,b=12+8-20", r"value\(s\) 8-10 claimed by both 'a' and 'b'"),
        (",".join(f"c{i}={i}" for i in range(255)), "255 classes; expected 1 to 254"),
    ],
)
def test_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_classes(spec)


def test_format_round_trips() -> None:
    spec = "membranes=0-128,glia=159,organelles=191+223"
    assert format_classes(parse_classes(spec)) == spec
    assert format_classes(parse_classes(" glia = 159 ")) == "glia=159"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.float32])
def test_map_classes_any_integer_dtype(dtype) -> None:
    labels = np.tile(VNC_LABELS, (2, 3, 1)).astype(dtype)
    classes = parse_classes("membranes=0-128,glia=159,mitochondria=191,synapses=223")
    out = map_classes(labels, classes)
    assert out.dtype == np.uint8 and out.shape == labels.shape
    np.testing.assert_array_equal(out[1, 2], [1, 1, 1, 1, 1, 2, 3, 4, 0])  # 255 is no class: background
    merged = map_classes(labels, parse_classes("organelles=191+223"))
    np.testing.assert_array_equal(merged[0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 0])


def test_map_classes_edges() -> None:
    wide = np.array([-7, 0, 1, 65535, 70000, 2**31 - 1], np.int32)
    np.testing.assert_array_equal(map_classes(wide, [("cells", [(1, 70000)])]), [0, 0, 1, 1, 1, 0])
    binary = np.array([[True, False]])
    np.testing.assert_array_equal(map_classes(binary, parse_classes("fg=1")), [[1, 0]])
    big = np.array([0, 2**63 + 5], np.uint64)  # no float rounding on huge unsigned values
    np.testing.assert_array_equal(map_classes(big, [("x", [(2**63 + 5, 2**63 + 5)])]), [0, 1])
    with pytest.raises(ValueError, match="non-integer values such as 0.5"):
        map_classes(np.array([0.0, 0.5, 1.0], np.float32), parse_classes("a=1"))
    with pytest.raises(ValueError, match="non-integer values such as nan"):
        map_classes(np.array([np.nan]), parse_classes("a=1"))
    with pytest.raises(ValueError, match="0 classes"):
        map_classes(VNC_LABELS, [])


def test_map_classes_in_chunks(monkeypatch) -> None:
    import sdk.tiling.classes as module

    monkeypatch.setattr(module, "_CHUNK", 7)  # chunk borders fall inside rows and slices
    labels = np.random.default_rng(0).choice(VNC_LABELS, size=(3, 5, 11))
    classes = parse_classes("membranes=0-128,organelles=191+223")
    expected = np.select([labels <= 128, (labels == 191) | (labels == 223)], [1, 2], 0)
    np.testing.assert_array_equal(map_classes(labels[:, ::2, 1:], classes), expected[:, ::2, 1:])


def test_default_classes() -> None:
    labels = np.zeros((3, 4, 4), np.uint16)
    labels[0, 0, 0], labels[2, 1, 1], labels[1, 3, 3] = 300, 7, 300
    classes = default_classes(labels)
    assert classes == [("7", [(7, 7)]), ("300", [(300, 300)])]
    np.testing.assert_array_equal(map_classes(labels, classes)[0, 0, :2], [2, 0])
    assert default_classes(np.array([[[0.0, 2.0]]], np.float32)) == [("2", [(2, 2)])]


def test_default_classes_refuses_non_label_volumes() -> None:
    with pytest.raises(ValueError, match="only 0"):
        default_classes(np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="non-integer"):
        default_classes(np.full((1, 2, 2), 0.25, np.float32))

    seen = []

    def slices():  # an intensity image: stops at the first slice with too many values
        for z in range(100):
            seen.append(z)
            yield np.arange(64, dtype=np.uint8).reshape(8, 8) + z

    with pytest.raises(ValueError, match="more than 32 distinct non-zero values.*--classes"):
        default_classes(slices())
    assert seen == [0]
    assert len(default_classes(np.arange(1, 6).reshape(1, 1, 5), max_classes=5)) == 5
