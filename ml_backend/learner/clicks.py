"""Click-to-mask: a U-Net that reads the image and the annotator's clicks, returns one object.

The network is the segmentation U-Net with two more input planes, the positive and the
negative clicks as Gaussian bumps (`sdk.prompts.click_maps`), trained to output the clicked
object only (DeepGrow-style, `click_training`). It looks at a window around the prompt,
normalised on its own (a window around an object looks alike in any volume), at the image's
own pixel size first; when the object runs out of the window the window doubles and is
shrunk back to the network's size, so large objects cost no more than small ones. Default
weights, trained on the synthetic generator by `emloop-train-clicks`, ship in the package
(`click_checkpoints`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ml_backend.learner.inference import normalize_image, pad_to_multiple, to_grey
from ml_backend.learner.network import UNet, UNetConfig
from sdk.prompts import Prompt, click_maps, object_at_clicks, prompt_window, shift_prompt

CLICK_NETWORK = UNetConfig(n_classes=2, in_channels=3, base_channels=8, depth=5, dropout=0.0)
CLICK_WINDOW = 256  # network pixels around the prompt
MAX_WINDOW = 4096  # image pixels: the largest window a prompt grows to
# The object's size in pixels is unknown (any microscope, any pixel size): the prompt is seen at
# three zooms, and the most confident of their combinations wins (`segment_prompt`).
SCALES = (1.0, 0.5, 0.25)


def prompt_input(window: np.ndarray, prompt: Prompt) -> np.ndarray:
    """(3, H, W) float32 network input: the window normalised by its own percentiles, and the
    click maps (prompt in the window's coordinates; a box alone clicks at its centre)."""
    image = normalize_image(window)
    return np.concatenate([image[None], click_maps(image.shape, [*prompt.positives, *prompt.negatives])])


def _resize(array: np.ndarray, shape: tuple[int, int], mode: str) -> np.ndarray:
    if array.shape[-2:] == shape:
        return array
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=shape, mode=mode, **kwargs)[0, 0].numpy()


@torch.no_grad()
def object_probability(net: UNet, window: np.ndarray, prompt: Prompt) -> np.ndarray:
    """(H, W) probability that each pixel of `window` belongs to the prompted object."""
    x = torch.from_numpy(prompt_input(window, prompt))[None]
    x, h, w = pad_to_multiple(x, net.config.size_multiple)
    device = next(net.parameters()).device
    net.eval()
    logits = net(x.to(device).contiguous(memory_format=torch.channels_last))
    return torch.softmax(logits.float(), dim=1)[0, 1, :h, :w].cpu().numpy()


def segment_prompt(
    net: UNet,
    image: np.ndarray,
    prompt: Prompt,
    *,
    window: int = CLICK_WINDOW,
    max_window: int = MAX_WINDOW,
    scales: tuple[float, ...] = SCALES,
) -> np.ndarray:
    """Bool (H, W) mask of the object the prompt points at.

    Each zoom sees a window of `window` / zoom image pixels shrunk to `window`. The candidates
    are the finest zoom's probabilities, then their maximum with each coarser zoom's in turn;
    the candidate whose object (`sdk.prompts.object_at_clicks`: the clicked pieces, negative
    clicks applied) has the highest mean probability wins, unless its own window cuts it (a
    coarser one sees more). When the winner runs out of the largest window, every window doubles.
    """
    grey = to_grey(np.asarray(image))
    base = window
    while True:
        frame = prompt_window(prompt, grey.shape, int(base / min(scales)))
        local = shift_prompt(prompt, frame[0], frame[1])
        prob = np.zeros((frame[2] - frame[0], frame[3] - frame[1]), np.float32)
        best, mask = -1.0, np.zeros(prob.shape, bool)
        zooms = sorted(scales, reverse=True)
        for i, zoom in enumerate(zooms):
            box = prompt_window(prompt, grey.shape, int(base / zoom))
            np.maximum(prob, _zoomed_probability(net, grey, prompt, box, window, frame), out=prob)
            candidate = object_at_clicks(prob > 0.5, local)
            if i + 1 < len(zooms) and _runs_out(_inside(candidate, box, frame), box, grey.shape):
                continue  # cut by its own window: a coarser zoom sees more of the object
            if candidate.any() and float(prob[candidate].mean()) > best:
                best, mask = float(prob[candidate].mean()), candidate
        if not _runs_out(mask, frame, grey.shape) or 2 * base / min(scales) > max_window:
            break
        base *= 2
    full = np.zeros(grey.shape, bool)
    full[frame[0] : frame[2], frame[1] : frame[3]] = mask
    return full


def _zoomed_probability(
    net: UNet,
    grey: np.ndarray,
    prompt: Prompt,
    box: tuple[int, int, int, int],
    window: int,
    frame: tuple[int, int, int, int],
) -> np.ndarray:
    """The object probability seen in `box` (image coordinates) shrunk to at most `window`²,
    returned in the coordinates of `frame` (0 outside the box)."""
    y0, x0, y1, x1 = box
    crop = grey[y0:y1, x0:x1].astype(np.float32)
    scale = min(1.0, window / max(crop.shape))
    small = (max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale)))
    seen = object_probability(net, _resize(crop, small, "bilinear"), shift_prompt(prompt, y0, x0, scale))
    out = np.zeros((frame[2] - frame[0], frame[3] - frame[1]), np.float32)
    out[y0 - frame[0] : y1 - frame[0], x0 - frame[1] : x1 - frame[1]] = _resize(seen, crop.shape, "bilinear")
    return out


def _inside(mask: np.ndarray, box: tuple[int, int, int, int], frame: tuple[int, int, int, int]) -> np.ndarray:
    """The part of `mask` (in `frame`'s coordinates) inside `box` (image coordinates)."""
    return mask[box[0] - frame[0] : box[2] - frame[0], box[1] - frame[1] : box[3] - frame[1]]


def _runs_out(mask: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, ...]) -> bool:
    """Whether the object touches a side of the window that is not a side of the image."""
    y0, x0, y1, x1 = box
    return bool(
        (y0 > 0 and mask[0].any())
        or (x0 > 0 and mask[:, 0].any())
        or (y1 < shape[0] and mask[-1].any())
        or (x1 < shape[1] and mask[:, -1].any())
    )
