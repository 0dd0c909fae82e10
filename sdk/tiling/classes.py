"""Label volumes → class-id volumes: which label values form which class.

Label volumes come with their tools' own values (VNC's ``labels/`` folder: 191 mitochondria,
0–128 membranes, 159 glia, 223 synapses, 255 intracellular space), while a network wants
0 = background and 1..N. A class is a name and inclusive value ranges; values no class claims
are background. The spec syntax (``--classes``) is ``name=values,...`` with values joined by
``+`` (merged into one class), each a value ``v`` or an inclusive range ``a-b``::

    membranes=0-128,glia=159,mitochondria=191,synapses=223
    organelles=191+223
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

Classes = list[tuple[str, list[tuple[int, int]]]]

MAX_CLASSES = 254  # class ids are uint8 and 255 means "not annotated"
DEFAULT_MAX_CLASSES = 32  # more distinct values is almost surely not a label volume
_CHUNK = 1 << 22  # voxels mapped at a time: bounds the int64 temporaries


def parse_classes(spec: str) -> Classes:
    """``"a=1+3-5,b=7"`` → ``[("a", [(1, 1), (3, 5)]), ("b", [(7, 7)])]``; ValueError on bad specs."""
    if not spec.strip():
        raise ValueError("the class spec is empty; expected name=values,... (e.g. mitochondria=1-255)")
    classes: Classes = []
    owner: list[tuple[int, int, str]] = []
    for item in spec.split(","):
        name, eq, values = (part.strip() for part in item.partition("="))
        if not eq:
            raise ValueError(f"class {item.strip()!r} in {spec!r} is not name=values")
        if not name:
            raise ValueError(f"class {item.strip()!r} in {spec!r} has an empty name")
        if any(name == n for n, _ in classes):
            raise ValueError(f"class {name!r} appears twice in {spec!r}")
        ranges = [_parse_range(v, name) for v in values.split("+")]
        for a, b in ranges:
            for c, d, other in owner:
                if a <= d and c <= b and other != name:
                    shared = _format_range(max(a, c), min(b, d))
                    raise ValueError(f"label value(s) {shared} claimed by both {other!r} and {name!r}")
            owner.append((a, b, name))
        classes.append((name, ranges))
    _check_count(classes)
    return classes


def _parse_range(text: str, name: str) -> tuple[int, int]:
    low, dash, high = (t.strip() for t in text.partition("-"))
    try:
        a = int(low)
        b = int(high) if dash else a
    except ValueError:
        raise ValueError(
            f"class {name!r}: bad value {text.strip()!r}; expected an integer v >= 0 or a range a-b"
        ) from None
    if b < a:
        raise ValueError(f"class {name!r}: reversed range {a}-{b}")
    return a, b


def format_classes(classes: Classes) -> str:
    """The canonical spec of `classes` (parse_classes reads it back)."""
    return ",".join(f"{name}=" + "+".join(_format_range(a, b) for a, b in ranges) for name, ranges in classes)


def _format_range(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def _check_count(classes: Classes) -> None:
    if not 1 <= len(classes) <= MAX_CLASSES:
        raise ValueError(f"{len(classes)} classes; expected 1 to {MAX_CLASSES} (class ids are uint8)")


def default_classes(labels: Iterable[np.ndarray], max_classes: int = DEFAULT_MAX_CLASSES) -> Classes:
    """0 is background, every other value one class named by it (sorted), from slice after slice.

    Refuses more than `max_classes` values early: that is an intensity or instance-id volume,
    which needs an explicit spec.
    """
    values: set[int] = set()
    for part in labels:
        found = np.unique(_integer_values(np.asarray(part)))
        values.update(int(v) for v in found if v != 0)
        if len(values) > max_classes:
            raise ValueError(
                f"the labels hold more than {max_classes} distinct non-zero values (e.g. "
                f"{', '.join(map(str, sorted(values)[:5]))}, …): not a label volume? Name the classes with "
                "--classes, e.g. mitochondria=1-255"
            )
    if not values:
        raise ValueError("the labels hold only 0 (background): no class to learn")
    return [(str(v), [(v, v)]) for v in sorted(values)]


def map_classes(labels: np.ndarray, classes: Classes) -> np.ndarray:
    """uint8 class ids of `labels`: 0 where no class claims the value, i for the i-th class.

    Any integer or bool dtype, or floats holding integers; mapped in chunks, so the
    temporaries stay small whatever the volume.
    """
    _check_count(classes)
    labels = np.asarray(labels)
    ranges = sorted((a, b, i) for i, (_, rs) in enumerate(classes, 1) for a, b in rs)
    kind = labels.dtype.kind
    edge_type = np.uint64 if kind in "ub" else np.int64 if kind == "i" else np.float64
    starts = np.array([a for a, _, _ in ranges], edge_type)
    ends = np.array([b for _, b, _ in ranges], edge_type)
    ids = np.array([i for _, _, i in ranges], np.uint8)
    out = np.empty(labels.shape, np.uint8)
    flat, flat_out = labels.reshape(-1), out.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        part = _integer_values(flat[start : start + _CHUNK])
        k = np.searchsorted(starts, part, side="right") - 1
        k_safe = np.maximum(k, 0)
        flat_out[start : start + _CHUNK] = np.where((k >= 0) & (part <= ends[k_safe]), ids[k_safe], 0)
    return out


def _integer_values(a: np.ndarray) -> np.ndarray:
    """`a` itself when its values are integers (bool as 0/1); ValueError otherwise."""
    if a.dtype.kind == "b":
        return a.view(np.uint8)
    if a.dtype.kind in "ui":
        return a
    if a.dtype.kind == "f":
        bad = a[a != np.floor(a)]  # NaN included
        if bad.size:
            raise ValueError(
                f"the labels ({a.dtype}) hold non-integer values such as {bad[0]}: expected a label volume"
            )
        return a
    raise ValueError(f"labels of dtype {a.dtype} are not a label volume")
