"""Find what to segment from a Label Studio label config.

Nothing is hard-coded: the `BrushLabels` control, the `Image` it draws on, and
the class list (background + every `<Label>`) all come from the project's XML.

Scribble mode: when the control has a `<Label>` named like the background (``Background``
by default, `BACKGROUND_LABEL` in the backend), annotators paint background too, and pixels
nobody painted are unknown rather than background, so a few strokes per class are honest
training data. Without such a label, unpainted pixels are background.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

DEFAULT_BACKGROUND_LABEL = "Background"
UNLABELLED = 255  # a label map's value for pixels nobody painted, in scribble mode (ignored by training)


class LabelConfigError(ValueError):
    """The label config cannot drive a brush segmentation model."""


@dataclass(frozen=True)
class BrushTarget:
    """The control/object pair predictions are written for.

    `labels[i]` is class `i + 1`; class 0 is background. `background` is the `<Label>` that
    paints class 0 in scribble mode, None otherwise.
    """

    from_name: str
    to_name: str
    value_key: str
    labels: tuple[str, ...]
    background: str | None = None

    @property
    def scribbles(self) -> bool:
        """Whether unpainted pixels are unknown (a background label exists) rather than background."""
        return self.background is not None

    @property
    def n_classes(self) -> int:
        return len(self.labels) + 1

    @property
    def signature(self) -> str:
        """Stable id of what a checkpoint was trained to predict (changes if labels change)."""
        text = "\x1f".join((self.from_name, self.to_name, *self.labels))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_brush_target(
    label_config: str | None, max_labels: int | None = None, background_label: str = DEFAULT_BACKGROUND_LABEL
) -> BrushTarget:
    """Return the first `BrushLabels` control that points at an `Image`.

    `max_labels` bounds the classes: prediction memory grows with pixels × classes. A `<Label>`
    named `background_label` (compared without case; "" = never) turns scribble mode on.
    """
    if not label_config or not label_config.strip():
        raise LabelConfigError("label config is empty")
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from None

    images = {
        el.get("name"): el.get("value", "") for el in root.iter() if el.tag == "Image" and el.get("name")
    }
    if not images:
        raise LabelConfigError("label config has no <Image> object to segment")

    brushes = [el for el in root.iter() if el.tag == "BrushLabels"]
    if not brushes:
        raise LabelConfigError("label config has no <BrushLabels> control")

    for control in brushes:
        from_name = control.get("name")
        to_name = (control.get("toName") or "").split(",")[0].strip()
        if not from_name or to_name not in images:
            continue
        labels = tuple(
            label.get("value") for label in control.iter() if label.tag == "Label" and label.get("value")
        )
        if not labels:
            raise LabelConfigError(f"<BrushLabels name={from_name!r}> has no <Label> values")
        if max_labels is not None and len(labels) > max_labels:
            raise LabelConfigError(
                f"<BrushLabels name={from_name!r}> has {len(labels)} labels,"
                f" more than {max_labels} (MAX_LABELS)"
            )
        if len(set(labels)) != len(labels):
            raise LabelConfigError(f"<BrushLabels name={from_name!r}> repeats a <Label> value")
        value = images[to_name]
        if not value.startswith("$") or len(value) < 2:
            raise LabelConfigError(
                f'<Image name={to_name!r}> must take its URL from a task field, e.g. value="$image"'
            )
        background = next(
            (name for name in labels if background_label and name.lower() == background_label.lower()), None
        )
        foreground = tuple(name for name in labels if name != background)
        if not foreground:
            raise LabelConfigError(
                f"<BrushLabels name={from_name!r}> has only the background label {background!r}"
            )
        return BrushTarget(from_name, to_name, value[1:], foreground, background)

    raise LabelConfigError("no <BrushLabels> control points (toName) at an <Image> of the config")
