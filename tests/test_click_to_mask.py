"""Click-to-mask end to end: a REAL Label Studio 1.23 and a REAL backend process.

Label Studio's interactive pre-annotation endpoint (`POST /api/ml/<id>/interactive-annotating`,
what the labeling editor calls when an annotator draws with a smart tool) is fed the smart
regions an annotator would draw on VNC ssTEM sections, EM images the click network never
saw, and the brush mask it hands back is compared with the ground truth:

- one positive click at the deepest point of each mitochondrion (a bounded sample of the
  ground truth's connected components) returns a mask of that object: it holds the click,
  it is one object, not the image, and the mean IoU with the clicked object is reported
  (printed, and written to ``click-to-mask-iou.json`` in the test's tmp dir) and must be
  at least ``MIN_MEAN_IOU``;
- a negative click inside that mask, far from the positive one, takes its part away;
- a rectangle asks for the object inside it;
- prompts the backend cannot answer (a label that is no brush label, only negative clicks)
  come back as Label Studio ``errors``, not as a crash.

The backend serves the shipped weights (``ml_backend/learner/weights/clicks-synthetic.pt``).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from scipy import ndimage

from devtools.label_studio import LabelStudioServer
from devtools.local_stack import BackendServer
from devtools.processes import REPO_ROOT
from ml_backend.learner.click_checkpoints import DEFAULT_CLICK_WEIGHTS
from sdk.brush import rle_to_mask

from .conftest import stack_env

pytestmark = pytest.mark.integration

SMART_CONFIG = (REPO_ROOT / "docs" / "label-config-smart.xml").read_text()
LABEL = "Mitochondria"
SECTIONS = ("00", "07", "14")  # the tasks; clicks go to the first two
CLICKED_SECTIONS = SECTIONS[:2]
OBJECTS_PER_SECTION = 12
MIN_OBJECT_PIXELS = 400
MIN_MEAN_IOU = 0.5
MAX_IMAGE_FRACTION = 0.05  # a mask of one mitochondrion, not of the image
MAX_AREA_RATIO = 4.0  # ... nor of its neighbours
REQUEST_TIMEOUT = 150  # seconds: Label Studio itself gives the backend 100


# -- data --------------------------------------------------------------------------------------------------
def vnc_section(vnc_dir: Path, section: str) -> tuple[np.ndarray, np.ndarray]:
    """A 1024² 8-bit VNC section and its mitochondria (bool)."""
    stack = vnc_dir / "stack1"
    raw = np.asarray(Image.open(stack / "raw" / f"{section}.tif"))
    mito = np.asarray(Image.open(stack / "mitochondria" / f"{section}.png")) > 0
    assert raw.shape == mito.shape == (1024, 1024) and raw.dtype == np.uint8
    return raw, mito


def write_png(raw: np.ndarray, path: Path) -> Path:
    """The section as a PNG (what a browser shows; the VNC raw sections are TIFFs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(raw).save(path)
    return path


@dataclass(frozen=True)
class GroundTruthObject:
    section: str
    mask: np.ndarray  # bool, the whole image
    click: tuple[int, int]  # (row, column): the pixel deepest inside the object

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1), end exclusive."""
        ys, xs = np.nonzero(self.mask)
        return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def ground_truth_objects(section: str, mito: np.ndarray, limit: int | None = None) -> list[GroundTruthObject]:
    """Connected components of at least MIN_OBJECT_PIXELS, at most `limit` of them spread evenly
    over the raster order, each with its deepest pixel (maximum of the distance transform)."""
    labels, n = ndimage.label(mito)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    ids = [i for i in range(1, n + 1) if sizes[i] >= MIN_OBJECT_PIXELS]
    if limit is not None and len(ids) > limit:
        ids = [ids[int(k)] for k in np.linspace(0, len(ids) - 1, limit).round()]
    objects = []
    for i in ids:
        mask = labels == i
        depth = ndimage.distance_transform_edt(mask)
        click = np.unravel_index(int(np.argmax(depth)), mask.shape)
        objects.append(GroundTruthObject(section, mask, (int(click[0]), int(click[1]))))
    return objects


# -- smart-tool regions, as the labeling editor serialises them ---------------------------------------
def keypoint(
    row: float, col: float, shape: tuple[int, int], *, positive: bool = True, label: str = LABEL
) -> dict:
    """A smart keypoint at the centre of pixel (row, col)."""
    height, width = shape
    return {
        "id": secrets.token_hex(5),
        "type": "keypointlabels",
        "from_name": "click",
        "to_name": "image",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "origin": "manual",
        "is_positive": positive,
        "value": {
            "x": (col + 0.5) / width * 100,
            "y": (row + 0.5) / height * 100,
            "width": 0.5,
            "keypointlabels": [label],
        },
    }


def rectangle(box: tuple[int, int, int, int], shape: tuple[int, int], label: str = LABEL) -> dict:
    """A smart rectangle over pixels box = (y0, x0, y1, x1), end exclusive."""
    height, width = shape
    y0, x0, y1, x1 = box
    return {
        "id": secrets.token_hex(5),
        "type": "rectanglelabels",
        "from_name": "box",
        "to_name": "image",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "origin": "manual",
        "value": {
            "x": x0 / width * 100,
            "y": y0 / height * 100,
            "width": (x1 - x0) / width * 100,
            "height": (y1 - y0) / height * 100,
            "rotation": 0,
            "rectanglelabels": [label],
        },
    }


def interactive_annotating(label_studio: LabelStudioServer, ml_backend_id: int, task_id: int, result: list):
    """What the labeling editor does after a smart region is drawn: Label Studio's answer (200)."""
    resp = requests.post(
        f"{label_studio.url}/api/ml/{ml_backend_id}/interactive-annotating",
        json={"task": task_id, "context": {"result": result}},
        headers=label_studio.auth_headers,
        timeout=REQUEST_TIMEOUT,
    )
    assert resp.status_code == 200, resp.text[:2000]
    assert "Traceback" not in resp.text, resp.text[:2000]
    return resp.json()


def returned_mask(answer: dict, shape: tuple[int, int], label: str = LABEL) -> np.ndarray:
    """The one brush region of Label Studio's `{"data": prediction}` answer, as a bool mask."""
    assert "errors" not in answer, answer
    prediction = answer["data"]
    assert "error" not in prediction, prediction
    regions = prediction["result"]
    assert len(regions) == 1, f"one brush region expected, got {len(regions)}"
    (region,) = regions
    assert region["type"] == "brushlabels"
    assert (region["from_name"], region["to_name"]) == ("tag", "image")
    assert (region["original_height"], region["original_width"]) == shape
    assert region["value"]["format"] == "rle"
    assert region["value"]["brushlabels"] == [label]
    return rle_to_mask(region["value"]["rle"], *shape) > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def weights_record() -> dict | None:
    """How the shipped weights were trained (the JSON `emloop-train-clicks` writes beside them)."""
    path = DEFAULT_CLICK_WEIGHTS.with_suffix(".json")
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return {k: record.get(k) for k in ("summary", "synthetic_clicked_object_iou", "seconds")}


# -- the stack -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def click_backend(label_studio, redis_url, tmp_path_factory) -> Iterator[BackendServer]:
    """One backend process for the module, serving the shipped click weights."""
    if not DEFAULT_CLICK_WEIGHTS.is_file():
        pytest.fail(f"the shipped click weights {DEFAULT_CLICK_WEIGHTS} are missing", pytrace=False)
    folder = tmp_path_factory.mktemp("click-backend")
    env = stack_env(folder / "models", redis_url, label_studio, tmp_path_factory.getbasetemp())
    with BackendServer(env, log_path=folder / "backend.log") as backend:
        yield backend


@dataclass
class SmartProject:
    id: int
    ml_backend_id: int
    task_ids: dict[str, int]  # section -> task
    sections: dict[str, tuple[np.ndarray, np.ndarray]]  # section -> (raw, mitochondria)


def smart_project(label_studio, backend: BackendServer, vnc_dir: Path, title: str, sections) -> SmartProject:
    """A project with the smart-tool config, one task per VNC section (uploaded PNG) and the backend
    connected for interactive pre-annotations."""
    client = label_studio.client()
    project = client.projects.create(title=title, label_config=SMART_CONFIG)
    data = {s: vnc_section(vnc_dir, s) for s in sections}
    folder = label_studio.document_root / f"clicks{project.id}"
    task_ids = {}
    for section, (raw, _) in data.items():
        path = write_png(raw, folder / f"{section}.png")
        (task_ids[section],) = label_studio.upload_files(project.id, [path])
    ml = client.ml.create(project=project.id, url=backend.url, title="emloop", is_interactive=True)
    return SmartProject(project.id, ml.id, task_ids, data)


@pytest.fixture(scope="module")
def project(label_studio, click_backend, vnc_dir) -> SmartProject:
    return smart_project(label_studio, click_backend, vnc_dir, "emloop click-to-mask", SECTIONS)


# -- tests -----------------------------------------------------------------------------------------------
def test_one_click_masks_the_clicked_mitochondrion(label_studio, project, tmp_path):
    records, problems = [], []
    started = time.monotonic()
    for section in CLICKED_SECTIONS:
        _, mito = project.sections[section]
        for obj in ground_truth_objects(section, mito, OBJECTS_PER_SECTION):
            row, col = obj.click
            answer = interactive_annotating(
                label_studio,
                project.ml_backend_id,
                project.task_ids[section],
                [keypoint(row, col, mito.shape)],
            )
            mask = returned_mask(answer, mito.shape) if answer["data"]["result"] else np.zeros_like(mito)
            score = iou(mask, obj.mask)
            record = {
                "section": section,
                "click": [row, col],
                "object_pixels": obj.area,
                "mask_pixels": int(mask.sum()),
                "iou": round(score, 4),
                "model_version": answer["data"].get("model_version"),
            }
            records.append(record)
            what = f"section {section}, click {obj.click} (object of {obj.area} px)"
            if not mask[row, col]:
                problems.append(f"{what}: the mask ({mask.sum()} px) does not hold the click")
            if mask.mean() >= MAX_IMAGE_FRACTION or mask.sum() > MAX_AREA_RATIO * obj.area:
                problems.append(f"{what}: the mask has {mask.sum()} px, more than one object")
    seconds = time.monotonic() - started
    mean_iou = float(np.mean([r["iou"] for r in records]))
    report = {
        "mean_iou": round(mean_iou, 4),
        "median_iou": round(float(np.median([r["iou"] for r in records])), 4),
        "objects": len(records),
        "sections": list(CLICKED_SECTIONS),
        "weights": str(DEFAULT_CLICK_WEIGHTS.relative_to(REPO_ROOT)),
        "weights_record": weights_record(),
        "model_versions": sorted({str(r["model_version"]) for r in records}),
        "seconds_per_click": round(seconds / len(records), 3),
        "clicks": records,
    }
    (tmp_path / "click-to-mask-iou.json").write_text(json.dumps(report, indent=1))
    print(
        f"\nclick-to-mask on VNC sections {', '.join(CLICKED_SECTIONS)}: mean clicked-object IoU "
        f"{mean_iou:.3f} (median {report['median_iou']:.3f}) over {len(records)} mitochondria, "
        f"{report['seconds_per_click']:.2f} s per click through Label Studio; "
        f"report in {tmp_path / 'click-to-mask-iou.json'}"
    )
    assert len(records) >= 20
    assert not problems, "\n".join(problems)
    assert mean_iou >= MIN_MEAN_IOU, f"mean clicked-object IoU {mean_iou:.3f} < {MIN_MEAN_IOU}"


def test_negative_click_removes_part_of_the_mask(label_studio, project):
    section = SECTIONS[0]
    _, mito = project.sections[section]
    obj = max(ground_truth_objects(section, mito), key=lambda o: o.area)
    row, col = obj.click
    positive = keypoint(row, col, mito.shape)
    task = project.task_ids[section]
    answer = interactive_annotating(label_studio, project.ml_backend_id, task, [positive])
    first = returned_mask(answer, mito.shape)
    assert first[row, col]

    # Inside the mask (not on its rim), as far from the positive click as it gets.
    inner = ndimage.distance_transform_edt(first) >= 3
    ys, xs = np.nonzero(inner)
    far = int(np.argmax((ys - row) ** 2 + (xs - col) ** 2))
    neg_row, neg_col = int(ys[far]), int(xs[far])
    distance = float(np.hypot(neg_row - row, neg_col - col))
    assert distance >= 20, f"the first mask is too small to split ({first.sum()} px)"

    negative = keypoint(neg_row, neg_col, mito.shape, positive=False)
    answer = interactive_annotating(label_studio, project.ml_backend_id, task, [positive, negative])
    second = returned_mask(answer, mito.shape)
    assert second[row, col], "the positive click is still on the object"
    assert not second[neg_row, neg_col], "the negative click's pixel is taken away"
    assert second.sum() < first.sum(), f"{second.sum()} px after the negative click, {first.sum()} before"


def test_rectangle_asks_for_the_object_inside_it(label_studio, project):
    section = SECTIONS[1]
    _, mito = project.sections[section]
    objects = ground_truth_objects(section, mito)
    obj = sorted(objects, key=lambda o: o.area)[len(objects) // 2]  # a middle-sized one
    margin = 8
    y0, x0, y1, x1 = obj.bbox
    box = (max(y0 - margin, 0), max(x0 - margin, 0), min(y1 + margin, 1024), min(x1 + margin, 1024))
    answer = interactive_annotating(
        label_studio, project.ml_backend_id, project.task_ids[section], [rectangle(box, mito.shape)]
    )
    mask = returned_mask(answer, mito.shape)
    inside = np.zeros_like(mask)
    inside[box[0] : box[2], box[1] : box[3]] = True
    assert mask.any()
    assert not (mask & ~inside).any(), "the mask stays inside the rectangle"
    assert (mask & obj.mask).sum() > 0.5 * mask.sum(), "most of the mask is the boxed mitochondrion"
    print(f"\nrectangle prompt: IoU {iou(mask, obj.mask):.3f} with the boxed mitochondrion")


TWO_LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Mitochondria" background="#ff0000"/>
    <Label value="Vesicle" background="#0000ff"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="Mitochondria" smart="true" background="#ff0000"/>
    <Label value="Synapse" smart="true" background="#00ff00"/>
  </KeyPointLabels>
</View>"""


def assert_refused(answer: dict) -> None:
    """Label Studio's `{"errors": [...]}`: the backend refused the prompt, it did not crash."""
    assert "data" not in answer, answer
    assert answer.get("errors"), answer
    text = json.dumps(answer)
    assert "Traceback" not in text and "Internal Server Error" not in text, text
    assert not any(str(e).startswith("500") for e in answer["errors"]), answer


def test_prompts_that_cannot_be_answered_are_errors(label_studio, click_backend, project):
    section = SECTIONS[0]
    _, mito = project.sections[section]
    row, col = ground_truth_objects(section, mito, 1)[0].click
    task = project.task_ids[section]

    only_negative = [keypoint(row, col, mito.shape, positive=False)]
    assert_refused(interactive_annotating(label_studio, project.ml_backend_id, task, only_negative))

    # Two brush labels: the keypoint's label must name one of them.
    client = label_studio.client()
    other = client.projects.create(title="emloop two labels", label_config=TWO_LABEL_CONFIG)
    path = label_studio.document_root / f"clicks{project.id}" / f"{section}.png"
    (other_task,) = label_studio.upload_files(other.id, [path])
    ml = client.ml.create(project=other.id, url=click_backend.url, title="emloop", is_interactive=True)
    wrong_label = [keypoint(row, col, mito.shape, label="Synapse")]
    assert_refused(interactive_annotating(label_studio, ml.id, other_task, wrong_label))

    # The same click named by a brush label is answered.
    right_label = [keypoint(row, col, mito.shape, label="Mitochondria")]
    answer = interactive_annotating(label_studio, ml.id, other_task, right_label)
    assert returned_mask(answer, mito.shape).any()
