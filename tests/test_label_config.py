"""Finding the brush control, its image and the class list in a Label Studio label config."""

from __future__ import annotations

import pytest

from sdk.label_config import BrushTarget, LabelConfigError, parse_brush_target

SIMPLE = """
<View>
  <Image name="img" value="$image"/>
  <BrushLabels name="tag" toName="img">
    <Label value="Membrane" background="red"/>
  </BrushLabels>
</View>
"""


def config(labels: list[str], *, brush: str = "seg", image: str = "em", value: str = "$picture") -> str:
    inner = "".join(f'<Label value="{label}"/>' for label in labels)
    return (
        f'<View><Header value="Segment"/><Image name="{image}" value="{value}" zoom="true"/>'
        f'<BrushLabels name="{brush}" toName="{image}">{inner}</BrushLabels></View>'
    )


def test_simple_config() -> None:
    target = parse_brush_target(SIMPLE)
    assert target == BrushTarget("tag", "img", "image", ("Membrane",))
    assert target.n_classes == 2


def test_any_names_and_field() -> None:
    target = parse_brush_target(config(["a"], brush="my brush", image="slice_0", value="$ssTEM"))
    assert (target.from_name, target.to_name, target.value_key) == ("my brush", "slice_0", "ssTEM")


def test_multi_class_labels_keep_config_order() -> None:
    target = parse_brush_target(config(["Mitochondrion", "Membrane", "Synapse"]))
    assert target.labels == ("Mitochondrion", "Membrane", "Synapse")
    assert target.n_classes == 4


def test_nested_layout_and_other_controls_are_skipped() -> None:
    xml = """
    <View>
      <Text name="notes" value="$text"/>
      <BrushLabels name="on_text" toName="notes"><Label value="x"/></BrushLabels>
      <View style="display: flex">
        <Image name="em" value="$image"/>
        <Choices name="quality" toName="em"><Choice value="good"/></Choices>
        <View><BrushLabels name="brush" toName="em, other">
          <Label value="Mito"/><Label value="Axon"/>
        </BrushLabels></View>
      </View>
    </View>
    """
    target = parse_brush_target(xml)
    assert (target.from_name, target.to_name, target.labels) == ("brush", "em", ("Mito", "Axon"))


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "empty"),
        ("   \n ", "empty"),
        (None, "empty"),
        ("<View><Image name='i' value='$image'>", "not valid XML"),
        ("<View><BrushLabels name='b' toName='i'><Label value='x'/></BrushLabels></View>", "no <Image>"),
        (
            "<View><Image name='i' value='$image'/>"
            "<RectangleLabels name='r' toName='i'><Label value='x'/></RectangleLabels></View>",
            "no <BrushLabels>",
        ),
        (
            "<View><Image name='i' value='$image'/><Text name='t' value='$text'/>"
            "<BrushLabels name='b' toName='t'><Label value='x'/></BrushLabels></View>",
            "points (toName) at an <Image>",
        ),
        (
            "<View><Image name='i' value='$image'/>"
            "<BrushLabels name='b' toName='missing'><Label value='x'/></BrushLabels></View>",
            "points (toName) at an <Image>",
        ),
        ("<View><Image name='i' value='$image'/><BrushLabels name='b' toName='i'/></View>", "no <Label>"),
        (config(["a", "b", "a"]), "repeats"),
        (config(["a"], value="http://example.org/x.png"), "task field"),
        (config(["a"], value="$"), "task field"),
        (config(["a"], value=""), "task field"),
    ],
)
def test_errors(xml: str | None, message: str) -> None:
    with pytest.raises(LabelConfigError) as info:
        parse_brush_target(xml)
    assert message in str(info.value)


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        parse_brush_target("<View/>")


def test_signature_tracks_labels_only() -> None:
    base = parse_brush_target(config(["a", "b"]))
    # Same control, image and labels with different layout / attributes: same lineage.
    restyled = parse_brush_target(
        '<View style="x"><Image name="em" value="$picture"/>'
        '<BrushLabels name="seg" toName="em"><Label value="a" background="#f00"/>'
        '<Label value="b"/></BrushLabels></View>'
    )
    assert restyled.signature == base.signature
    assert len(base.signature) == 12
    others = {
        parse_brush_target(config(["a", "b", "c"])).signature,  # label added
        parse_brush_target(config(["a"])).signature,  # label removed
        parse_brush_target(config(["b", "a"])).signature,  # classes renumbered
        parse_brush_target(config(["a", "B"])).signature,  # label renamed
        parse_brush_target(config(["a", "b"], brush="seg2")).signature,
        parse_brush_target(config(["a", "b"], image="em2")).signature,
    }
    assert base.signature not in others
    assert len(others) == 6
