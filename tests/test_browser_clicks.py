"""Click-to-mask in a real browser: an annotator's click in the labeling editor becomes a brush mask.

A REAL Label Studio 1.23 with the backend connected for interactive pre-annotations, and
headless Chromium (see `test_browser`): open a task of the smart-tool project
(``docs/label-config-smart.xml``), turn on Auto-Annotation and Auto-Accept Suggestions in the
editor's bottom bar, pick the keypoint's label and the smart keypoint tool, click inside a
mitochondrion of a VNC section, and check that

- the editor asks Label Studio's interactive endpoint for the region and the backend answers;
- the answer becomes a brush region labelled Mitochondria in the annotation;
- it is drawn where the returned mask is (brush layer and screen), around the click.

The screenshot is ``click-to-mask.png``, also written to ``$EMLOOP_SCREENSHOTS`` when set.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from scipy import ndimage

from sdk.brush import rle_to_mask

from .test_browser import (  # noqa: F401  (browser, chromium, page: fixtures)
    LOAD_TIMEOUT_MS,
    browser,
    chromium,
    iou,
    log_in,
    page,
    take_screenshot,
    wait_for_red_brush,
)
from .test_click_to_mask import (  # noqa: F401  (click_backend: a fixture)
    click_backend,
    ground_truth_objects,
    interactive_annotating,
    keypoint,
    returned_mask,
    smart_project,
)

pytestmark = [pytest.mark.integration, pytest.mark.browser]

SECTION = "00"
IMAGE = '.lsf-main-view__annotation .lsf-object img[alt="image"]'


def open_blank_task(tab, label_studio, project_id: int, task_id: int) -> None:
    """The labeling editor for a task without regions yet, once its image is loaded."""
    tab.goto(f"{label_studio.url}/projects/{project_id}/data?task={task_id}")
    tab.wait_for_function(
        """([taskId, selector]) => {
            const store = window.Htx && window.Htx.annotationStore;
            if (!store || !store.selected || window.Htx.task.id !== taskId) return false;
            const image = document.querySelector(selector);
            return Boolean(image && image.complete && image.naturalWidth > 0);
        }""",
        arg=[task_id, IMAGE],
    )


def regions(tab) -> list[dict]:
    return tab.evaluate(
        """() => window.Htx.annotationStore.selected.regions.map(r => ({
            type: r.type, labels: r.labels, control: r.results.map(x => x.from_name.name)[0],
        }))"""
    )


def turn_on_smart_tools(tab) -> None:
    """What the annotator does once: Auto-Annotation and Auto-Accept Suggestions in the bottom bar,
    the keypoint's label, and the smart keypoint tool of the "Auto-Detect" tool group."""
    # Both are remembered in the browser's local storage: switched on only when off.
    if not tab.evaluate("() => window.Htx.autoAnnotation"):
        tab.click("[data-testid=bottombar-auto-annotation-toggle]")
    if not tab.evaluate("() => window.Htx.autoAcceptSuggestions"):
        tab.locator(".lsf-auto-accept label").click()  # shown once Auto-Annotation is on
    flags = tab.evaluate("() => [window.Htx.autoAnnotation, window.Htx.autoAcceptSuggestions]")
    assert flags == [True, True], f"Auto-Annotation, Auto-Accept Suggestions: {flags}"

    # The config's label bars: BrushLabels, KeyPointLabels, RectangleLabels, all "Mitochondria".
    tab.locator(".lsf-label").nth(1).click()
    selected = tab.evaluate(
        """() => window.Htx.annotationStore.selected.names.get('click').selectedLabels.map(l => l.value)"""
    )
    assert selected == ["Mitochondria"], f"the keypoint label should be selected: {selected}"
    tab.hover(".lsf-toolbar .lsf-tool_smart >> nth=0")  # the group opens on hover
    tab.locator(".lsf-toolbar .lsf-tool_smart[aria-label=key-point-tool]").click()
    active = tab.evaluate(
        """() => Array.from(document.querySelectorAll('.lsf-toolbar .lsf-tool_active.lsf-tool_smart'))
            .map(e => e.getAttribute('aria-label'))"""
    )
    assert "key-point-tool" in active, f"the smart keypoint tool should be active: {active}"
    # Selecting a label scrolls the editor to the label bars; back to the whole image.
    tab.evaluate("() => { document.querySelector('.lsf-main-content').scrollTop = 0; }")
    tab.wait_for_timeout(300)


def screen_point(tab, row: int, col: int) -> tuple[float, float]:
    """Where the centre of image pixel (row, col) is on screen; it must be the editor's canvas."""
    x, y, width, height, natural_width, natural_height = tab.evaluate(
        """(selector) => { const i = document.querySelector(selector), r = i.getBoundingClientRect();
            return [r.x, r.y, r.width, r.height, i.naturalWidth, i.naturalHeight]; }""",
        IMAGE,
    )
    sx = x + (col + 0.5) * width / natural_width
    sy = y + (row + 0.5) * height / natural_height
    hit = tab.evaluate(
        """([x, y]) => { const e = document.elementFromPoint(x, y);
            return e.tagName === 'CANVAS'
                && Boolean(e.closest('.lsf-main-view__annotation .lsf-object')); }""",
        [sx, sy],
    )
    assert hit, f"pixel ({row}, {col}) is not on the editor's image at ({sx:.0f}, {sy:.0f})"
    return sx, sy


# The brush layers over the editor's <Image> (how red, as alpha, per canvas pixel) and where they are.
LAYERS_JS = """
(selector) => {
    const img = document.querySelector(selector);
    const object = img.closest('.lsf-object');
    const frame = object.querySelector('.lsf-image').getBoundingClientRect();
    const rect = img.getBoundingClientRect();
    const layers = Array.from(object.querySelectorAll('.konvajs-content canvas'))
        .filter(c => c.width > 0 && c.height > 0 && getComputedStyle(c).display !== 'none'
                     && Number(getComputedStyle(c).opacity) > 0)
        .map(c => {
            const r = c.getBoundingClientRect();
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const red = new Uint8Array(c.width * c.height);
            for (let i = 0; i < red.length; i++)
                if (d[4 * i] > 150 && d[4 * i + 1] < 100 && d[4 * i + 2] < 100) red[i] = d[4 * i + 3];
            let s = '';
            for (let i = 0; i < red.length; i += 8192) s += String.fromCharCode(...red.subarray(i, i + 8192));
            return {box: [r.x, r.y, r.width, r.height], width: c.width, height: c.height, red: btoa(s)};
        });
    return {natural: [img.naturalHeight, img.naturalWidth], rect: [rect.x, rect.y, rect.width, rect.height],
            frame: [frame.left, frame.top, frame.right, frame.bottom], layers};
}
"""


class DrawnImage:
    """The editor's <Image> per natural pixel: where its centre is on screen (`x`, `y`), whether it
    is inside the image frame (`visible`) and red in the brush layers there (`brush`).

    `test_browser.ImageView` does the same in the page, pixel by pixel: too slow for a 1024² image
    (a minute); here the page hands over the layers and numpy samples them.
    """

    def __init__(self, tab) -> None:
        raw = tab.evaluate(LAYERS_JS, IMAGE)
        self.shape = height, width = tuple(raw["natural"])
        x0, y0, rect_width, rect_height = raw["rect"]
        vx, vy = np.meshgrid(
            x0 + (np.arange(width) + 0.5) * rect_width / width,
            y0 + (np.arange(height) + 0.5) * rect_height / height,
        )
        left, top, right, bottom = raw["frame"]
        self.visible = (vx >= left) & (vx < right) & (vy >= top) & (vy < bottom)
        alpha = np.zeros(self.shape, np.uint8)
        for layer in raw["layers"]:
            lw, lh = layer["width"], layer["height"]
            red = np.frombuffer(base64.b64decode(layer["red"]), np.uint8).reshape(lh, lw)
            bx, by, bw, bh = layer["box"]
            cx = np.floor((vx - bx) * lw / bw).astype(int)
            cy = np.floor((vy - by) * lh / bh).astype(int)
            inside = (cx >= 0) & (cy >= 0) & (cx < lw) & (cy < lh)
            sampled = red[cy.clip(0, lh - 1), cx.clip(0, lw - 1)]
            alpha = np.maximum(alpha, np.where(inside, sampled, 0).astype(np.uint8))
        self.brush = (alpha >= 128) & self.visible  # edges are smoothed when the mask is scaled
        self.x, self.y = np.floor(vx).astype(int), np.floor(vy).astype(int)
        self.frame = raw["frame"]

    def on_screen(self, screenshot: np.ndarray) -> np.ndarray:
        """The screenshot's RGB at every natural pixel (valid where `visible`)."""
        x = self.x.clip(0, screenshot.shape[1] - 1)
        y = self.y.clip(0, screenshot.shape[0] - 1)
        return screenshot[y, x, :3].astype(int)


def assert_drawn(drawn: np.ndarray, mask: np.ndarray, visible: np.ndarray, where: str) -> None:
    """`drawn` (bool per image pixel) is `mask` up to its rim: the editor shows the 1024² image
    at about 0.6 screen pixel per image pixel, so the edge may move by a pixel or two."""
    near = ndimage.binary_dilation(mask, iterations=2)
    core = ndimage.binary_erosion(mask, iterations=2)
    stray = (drawn & ~near & visible).sum() / max((drawn & visible).sum(), 1)
    missed = (core & ~drawn & visible).sum() / max((core & visible).sum(), 1)
    assert stray < 0.02 and missed < 0.02, (
        f"{where}: {stray:.1%} of the red is off the returned mask, {missed:.1%} of the mask is not red"
    )


def test_click_on_a_mitochondrion_draws_its_mask(page, label_studio, click_backend, vnc_dir, tmp_path):  # noqa: F811
    project = smart_project(label_studio, click_backend, vnc_dir, "browser click-to-mask", (SECTION,))
    # No whole-image pre-annotation: what is drawn comes from the click.
    label_studio.client().projects.update(id=project.id, show_collab_predictions=False)
    task_id = project.task_ids[SECTION]
    _, mito = project.sections[SECTION]
    # A typical click: of the good-sized mitochondria, clicked at their deepest points, the one whose
    # mask (asked through Label Studio's API first) has the median IoU, so the picture shows neither
    # the best nor the worst case; the README reports the IoU over all of them.
    objects = [o for o in ground_truth_objects(SECTION, mito) if o.area >= 2000]
    scored = sorted(
        objects,
        key=lambda o: iou(
            returned_mask(
                interactive_annotating(
                    label_studio, project.ml_backend_id, task_id, [keypoint(*o.click, mito.shape)]
                ),
                mito.shape,
            ),
            o.mask,
        ),
    )
    obj = scored[len(scored) // 2]
    row, col = obj.click

    log_in(page, label_studio)
    open_blank_task(page, label_studio, project.id, task_id)
    assert regions(page) == []
    turn_on_smart_tools(page)
    x, y = screen_point(page, row, col)

    with page.expect_response(
        lambda r: r.url.endswith(f"/api/ml/{project.ml_backend_id}/interactive-annotating"),
        timeout=LOAD_TIMEOUT_MS,
    ) as answered:
        page.mouse.click(x, y)
    response = answered.value
    assert response.ok, response.text()
    body = response.json()
    assert "errors" not in body, body
    (region,) = body["data"]["result"]
    assert region["value"]["brushlabels"] == ["Mitochondria"]
    shape = (region["original_height"], region["original_width"])
    mask = rle_to_mask(region["value"]["rle"], *shape) > 0
    assert mask[row, col], "the backend's mask holds the click"

    # Auto-accepted: the smart keypoint gives way to the brush region in the annotation.
    page.wait_for_function(
        """() => window.Htx.annotationStore.selected.regions.some(r => r.type === 'brushregion')""",
        timeout=LOAD_TIMEOUT_MS,
    )
    assert regions(page) == [{"type": "brushregion", "labels": ["Mitochondria"], "control": "tag"}]
    outliner = page.locator(".lsf-outliner-item__title")
    assert outliner.count() == 1 and outliner.first.inner_text().strip() == "Mitochondria"

    wait_for_red_brush(page)
    view = DrawnImage(page)
    assert view.shape == shape == mito.shape
    assert view.visible.mean() > 0.9, f"the image should be in view, frame {view.frame}"
    assert view.brush[row, col], "the brush layer is red at the click"
    assert_drawn(view.brush, mask, view.visible, "brush layer")
    screenshot = take_screenshot(page, tmp_path, "click-to-mask.png")
    rgb = view.on_screen(screenshot)
    reddish = (rgb[..., 0] - rgb[..., 1] > 60) & (rgb[..., 0] - rgb[..., 2] > 60)
    assert_drawn(reddish, mask, view.visible, "screen")
    layer_iou = iou(view.brush[view.visible], mask[view.visible])
    print(
        f"\nbrowser click at pixel ({row}, {col}): mask of {mask.sum()} px, IoU {iou(mask, obj.mask):.3f}"
        f" with the clicked mitochondrion ({obj.area} px); brush layer vs mask IoU {layer_iou:.3f}"
    )
