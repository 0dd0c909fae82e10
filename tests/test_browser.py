"""Issue 7: what the annotator sees, checked in a real browser.

A REAL Label Studio 1.23 with the backend's predictions (or ``scripts/prioritize.py
--heatmaps``), and headless Chromium driven by Playwright: log in, open a task in the
labeling editor and check that

- the prediction is loaded as the pre-annotation: its brush region is listed with its
  label in the outliner and drawn where the model's mask is, both in the brush layer
  (Konva canvas pixels) and in what is on screen (a screenshot);
- with ``docs/label-config-uncertainty.xml`` the heat map of the pixel-wise uncertainty
  is shown beside the image, pixel for pixel the PNG that the script attached.

Screenshots are saved under the test's tmp dir and, with ``EMLOOP_SCREENSHOTS=<dir>``
(e.g. ``docs/screenshots``), also there. Needs the ``playwright`` package and a Chromium
(``/usr/bin/chromium``, or ``EMLOOP_CHROMIUM``); Playwright's own browser download is not
used.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from devtools.processes import REPO_ROOT
from ml_backend.learner.network import UNetConfig, build_unet
from ml_backend.learner.training import TrainConfig, fine_tune
from sdk.brush import rle_to_mask
from sdk.synthetic import synthetic_em

from .conftest import unavailable
from .helpers import BRUSH_CONFIG, publish, run_prioritize, write_images

pytestmark = [pytest.mark.integration, pytest.mark.browser]

UNCERTAINTY_CONFIG_PATH = REPO_ROOT / "docs" / "label-config-uncertainty.xml"
VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOAD_TIMEOUT_MS = 120_000  # the labeling editor's bundle is large and the machine may be busy
SCREENSHOT_MAX_BYTES = 300_000


# -- browser ---------------------------------------------------------------------------------------------
def chromium_executable() -> str | None:
    given = os.environ.get("EMLOOP_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium Playwright can drive; checked before Label Studio is started."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("the playwright package is not installed: pip install 'playwright>=1.40'")
    executable = chromium_executable()
    if executable is None:
        unavailable("no Chromium found: apt-get install chromium, or set EMLOOP_CHROMIUM to its path")
    return executable


@pytest.fixture(scope="module")
def browser(chromium):
    """Headless Chromium (the system's, not a Playwright download) for the module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="emloop-chromium-") as profile:
        # A fresh user-data dir: nothing from a developer's own profile leaks in.
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport=VIEWPORT,
            device_scale_factor=1,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(LOAD_TIMEOUT_MS)
    yield page
    page.close()


def log_in(page, label_studio) -> None:
    """Label Studio's own login form (a session cookie, as an annotator gets)."""
    page.goto(f"{label_studio.url}/user/login/")
    if "/user/login" not in page.url:  # already logged in (the context is shared by the module)
        return
    page.fill("input[name=email]", label_studio.username)
    page.fill("input[name=password]", label_studio.password)
    page.click("button[type=submit], button:has-text('Log in')")
    page.wait_for_url(lambda url: "/user/login" not in url)


def open_task(page, label_studio, project_id: int, task_id: int, n_images: int) -> None:
    """The labeling editor for one task, once its images are loaded and its regions listed."""
    page.goto(f"{label_studio.url}/projects/{project_id}/data?task={task_id}")
    page.wait_for_function(
        """([taskId, nImages]) => {
            const store = window.Htx && window.Htx.annotationStore;
            if (!store || !store.selected || window.Htx.task.id !== taskId) return false;
            const images = document.querySelectorAll(
                '.lsf-main-view__annotation .lsf-object img[alt="image"]');
            return images.length === nImages
                && Array.from(images).every(i => i.complete && i.naturalWidth > 0);
        }""",
        arg=[task_id, n_images],
    )
    page.locator(".lsf-outliner-item__title").first.wait_for()


def editor_state(page) -> dict:
    """Task, predictions and the selected annotation's regions, from the editor's own store."""
    return page.evaluate(
        """() => {
            const store = window.Htx.annotationStore;
            const selected = store.selected;
            return {
                task: window.Htx.task.id,
                predictions: store.predictions.map(p => ({id: Number(p.pk), model_version: p.createdBy})),
                selected: {
                    type: selected.type,
                    parent_prediction: selected.parent_prediction ?? null,
                    regions: selected.regions.map(r => ({
                        type: r.type, labels: r.labels, hidden: r.hidden, image: r.object.name,
                    })),
                },
            };
        }"""
    )


# Where each natural pixel of the n-th <Image> is on screen, and what the brush layers hold there.
SAMPLE_JS = """
([index]) => {
    const object = document.querySelectorAll('.lsf-main-view__annotation .lsf-object')[index];
    const img = object.querySelector('img[alt="image"]');
    const frame = object.querySelector('.lsf-image').getBoundingClientRect();
    const rect = img.getBoundingClientRect();
    const [w, h] = [img.naturalWidth, img.naturalHeight];
    const layers = Array.from(object.querySelectorAll('.konvajs-content canvas'))
        .filter(c => c.width > 0 && c.height > 0 && getComputedStyle(c).display !== 'none'
                     && Number(getComputedStyle(c).opacity) > 0)
        .map(c => {
            const r = c.getBoundingClientRect();
            const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return {r, sx: c.width / r.width, sy: c.height / r.height, w: c.width, h: c.height, data};
        });
    const xs = [], ys = [], alpha = [];
    for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
            const vx = rect.x + (x + 0.5) * rect.width / w, vy = rect.y + (y + 0.5) * rect.height / h;
            xs.push(vx);
            ys.push(vy);
            if (vx < frame.left || vx >= frame.right || vy < frame.top || vy >= frame.bottom) {
                alpha.push(-1);  // scrolled or zoomed out of the frame
                continue;
            }
            let a = 0;  // the most opaque red over all layers
            for (const l of layers) {
                const cx = Math.floor((vx - l.r.x) * l.sx), cy = Math.floor((vy - l.r.y) * l.sy);
                if (cx < 0 || cy < 0 || cx >= l.w || cy >= l.h) continue;
                const i = 4 * (cy * l.w + cx), d = l.data;
                if (d[i] > 150 && d[i + 1] < 100 && d[i + 2] < 100) a = Math.max(a, d[i + 3]);
            }
            alpha.push(a);
        }
    }
    return {width: w, height: h, src: img.src.slice(0, 40), alpha, xs, ys,
            frame: [frame.left, frame.top, frame.width, frame.height]};
}
"""


class ImageView:
    """One <Image> of the editor: its natural pixels' screen positions and brush-layer pixels."""

    def __init__(self, page, index: int) -> None:
        raw = page.evaluate(SAMPLE_JS, [index])
        self.shape = (raw["height"], raw["width"])
        self.src = raw["src"]
        self.frame = raw["frame"]
        alpha = np.asarray(raw["alpha"]).reshape(self.shape)
        self.visible = alpha >= 0
        self.alpha = np.maximum(alpha, 0)  # of the brush layers' red at each pixel's centre
        self.brush = self.alpha >= 128  # edges are smoothed when the mask is scaled up
        self.x = np.floor(np.asarray(raw["xs"])).astype(int).reshape(self.shape)
        self.y = np.floor(np.asarray(raw["ys"])).astype(int).reshape(self.shape)

    def on_screen(self, screenshot: np.ndarray) -> np.ndarray:
        """The screenshot's RGB at every natural pixel of the image (only ``visible`` ones are valid)."""
        x = np.clip(self.x, 0, screenshot.shape[1] - 1)
        y = np.clip(self.y, 0, screenshot.shape[0] - 1)
        return screenshot[y, x, :3].astype(int)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def take_screenshot(page, tmp_path: Path, name: str) -> np.ndarray:
    """Screenshot of the viewport: a test artifact, and a docs image with EMLOOP_SCREENSHOTS."""
    page.mouse.move(VIEWPORT["width"] - 5, VIEWPORT["height"] - 5)  # no hover effects in the picture
    page.wait_for_timeout(300)
    png = page.screenshot(type="png")
    (tmp_path / name).write_bytes(png)
    target = os.environ.get("EMLOOP_SCREENSHOTS")
    if target:
        folder = Path(target) if Path(target).is_absolute() else REPO_ROOT / target
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(compact_png(png))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def compact_png(png: bytes) -> bytes:
    """The screenshot for the docs: dropping low bits until it is small (greys stay grey)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    for bits in (8, 7, 6, 5):
        out = io.BytesIO()
        ImageOps.posterize(image, bits).save(out, format="PNG", optimize=True)
        if out.tell() <= SCREENSHOT_MAX_BYTES:
            break
    return out.getvalue()


def wait_for_red_brush(page) -> None:
    """Until a canvas of the labeling view holds red brush pixels."""
    page.wait_for_function(
        """() => Array.from(document.querySelectorAll('.lsf-main-view__annotation .konvajs-content canvas'))
            .some(c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                         for (let i = 0; i < d.length; i += 4)
                             if (d[i + 3] > 0 && d[i] > 150 && d[i + 1] < 100) return true;
                         return false; })""",
        polling=250,
    )


def assert_pre_annotation(
    page, label_studio, task_id: int, model_version: str
) -> tuple[ImageView, np.ndarray]:
    """The task's prediction is the selected pre-annotation, listed and drawn where its mask is."""
    client = label_studio.client()
    (prediction,) = [p for p in client.predictions.list(task=task_id) if p.model_version == model_version]
    (region,) = prediction.result  # one brush region per label
    shape = (region["original_height"], region["original_width"])
    mask = rle_to_mask(region["value"]["rle"], *shape) > 0
    assert mask.mean() > 0.02, "the checkpoint should find mitochondria in this image"

    state = editor_state(page)
    assert state["task"] == task_id
    assert {"id": prediction.id, "model_version": model_version} in state["predictions"]
    selected = state["selected"]
    assert selected["type"] == "annotation" and selected["parent_prediction"] == prediction.id, (
        f"the editor should start from the prediction as a pre-annotation: {state}"
    )
    region_state = {"type": "brushregion", "labels": ["Mitochondria"], "hidden": False, "image": "em"}
    assert selected["regions"] == [region_state], "one brush region on the EM image"

    # The outliner (Regions panel) lists the region with its label.
    items = page.locator(".lsf-outliner-item")
    assert items.count() == 1
    assert items.first.locator(".lsf-outliner-item__title").inner_text().strip() == "Mitochondria"
    assert items.first.is_visible()

    # The brush layer holds the mask, at the mask's place (sampled at each image pixel's centre).
    wait_for_red_brush(page)  # drawn a frame or two after the region is listed
    view = ImageView(page, 0)
    assert view.shape == shape
    # Label Studio 1.23 sizes an image to its column but frames it 42 px narrower (the tool
    # bar), so a width-limited image loses ~21 px on each side until zoomed out.
    assert view.visible.mean() > 0.7, f"the image should be in view, frame {view.frame}"
    layer_iou = iou(view.brush[view.visible], mask[view.visible])
    assert layer_iou > 0.99, f"brush layer vs predicted mask: IoU {layer_iou:.3f}"
    return view, mask


def assert_mask_on_screen(view: ImageView, screenshot: np.ndarray, mask: np.ndarray) -> None:
    """On screen (all layers composited), the mask's pixels are red over the grey EM image."""
    rgb = view.on_screen(screenshot)
    reddish = (rgb[..., 0] - rgb[..., 1] > 60) & (rgb[..., 0] - rgb[..., 2] > 60)
    screen_iou = iou(reddish[view.visible], mask[view.visible])
    assert screen_iou > 0.9, f"red on screen vs brush region: IoU {screen_iou:.3f}"


# -- test data -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser_net():
    """A small network that finds the synthetic mitochondria well and is sure of the background.

    Trained on one thread: on a busy 2-core machine that is several times faster (~10 s).
    """
    data = [synthetic_em(128, 128, seed=100 + s) for s in range(4)]
    net = build_unet(UNetConfig(n_classes=2, base_channels=8, depth=2), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fine_tune(
            net,
            [d[0] for d in data],
            [d[1] for d in data],
            TrainConfig(steps=200, patch_size=96, batch_size=4, seed=0),
        )
    finally:
        torch.set_num_threads(threads)
    return net


def new_project(label_studio, title: str, seed: int) -> tuple[int, list[int]]:
    project = label_studio.client().projects.create(title=title, label_config=BRUSH_CONFIG)
    images = write_images(label_studio.document_root / f"browser{project.id}", [(256, 256)] * 2, seed=seed)
    return project.id, label_studio.upload_files(project.id, [p for p, _ in images])


# -- tests -----------------------------------------------------------------------------------------------
def test_pre_annotation_is_listed_and_drawn(page, label_studio, backend_factory, tmp_path, browser_net):
    client = label_studio.client()
    project_id, task_ids = new_project(label_studio, "browser pre-annotation", seed=7)
    model_dir = tmp_path / "models"
    version = publish(browser_net, model_dir, project_id)
    backend = backend_factory(label_studio=label_studio, model_dir=model_dir)
    client.ml.create(project=project_id, url=backend.url, title="emloop", is_interactive=False)
    label_studio.retrieve_predictions(project_id)
    # Annotators get the prediction of the project's model version as their starting point.
    client.projects.update(id=project_id, show_collab_predictions=True, model_version=version.name)

    log_in(page, label_studio)
    open_task(page, label_studio, project_id, task_ids[0], n_images=1)
    view, mask = assert_pre_annotation(page, label_studio, task_ids[0], version.name)
    screenshot = take_screenshot(page, tmp_path, "pre-annotation.png")
    assert_mask_on_screen(view, screenshot, mask)


def test_uncertainty_map_is_shown_beside_the_image(page, label_studio, tmp_path, browser_net):
    client = label_studio.client()
    project_id, task_ids = new_project(label_studio, "browser uncertainty", seed=7)
    # Label Studio refuses direct file upload into a config with two data fields, so the
    # project gets the heat-map config after its images, as an existing project would.
    client.projects.update(id=project_id, label_config=UNCERTAINTY_CONFIG_PATH.read_text())
    model_dir = tmp_path / "models"
    publish(browser_net, model_dir, project_id)

    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    args = ["--project", str(project_id), "--strategy", "entropy", "--batch", "2", "--heatmaps"]
    proc = run_prioritize(*args, "--json", "--quiet", env={**env, "MODEL_DIR": str(model_dir)})
    assert proc.returncode == 0, proc.stderr
    ranking = json.loads(proc.stdout)
    first = ranking["ranking"][0]["task"]
    heatmap_uri = client.tasks.get(first).data["uncertainty"]
    assert heatmap_uri.startswith("data:image/png;base64,")
    heatmap = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(heatmap_uri.split(",", 1)[1]))).convert("RGB")
    )
    assert client.projects.get(project_id).show_collab_predictions

    log_in(page, label_studio)
    open_task(page, label_studio, project_id, first, n_images=2)
    em, mask = assert_pre_annotation(page, label_studio, first, ranking["priority_version"])

    # The second <Image> is the heat map: loaded from the task's data: URI (the editor hands
    # it to the <img> as a blob: URL), the very pixels of the PNG the script attached.
    pixels = page.evaluate(
        """() => {
            const img = document.querySelectorAll(
                '.lsf-main-view__annotation .lsf-object img[alt="image"]')[1];
            const canvas = document.createElement('canvas');
            [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
            const ctx = canvas.getContext('2d');
            ctx.drawImage(img, 0, 0);
            const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            let s = '';
            for (let i = 0; i < rgba.length; i += 4)
                s += String.fromCharCode(rgba[i], rgba[i + 1], rgba[i + 2]);
            return btoa(s);
        }"""
    )
    heat = ImageView(page, 1)
    assert heat.shape == heatmap.shape[:2]
    assert heat.src.startswith(("data:image/png", "blob:")), heat.src
    shown = np.frombuffer(base64.b64decode(pixels), dtype=np.uint8).reshape(heatmap.shape)
    np.testing.assert_array_equal(shown, heatmap, err_msg="the <img> should hold the heat map PNG")

    screenshot = take_screenshot(page, tmp_path, "uncertainty-map.png")
    assert_mask_on_screen(em, screenshot, mask)
    # Visible beside the image: the screen shows the heat map's colours where it is laid out.
    assert heat.visible.mean() > 0.7, f"the heat map should be in view, frame {heat.frame}"
    assert heat.x[heat.visible].min() > em.x[em.visible].max(), "the heat map should be right of the image"
    on_screen = heat.on_screen(screenshot)[heat.visible]
    error = np.abs(on_screen - heatmap[heat.visible].astype(int)).mean()
    assert error < 12, f"heat map on screen differs from the PNG by {error:.1f} grey levels on average"
