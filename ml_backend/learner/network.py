"""The 2D U-Net: small enough for CPU inference, with MC dropout and an embedding.

Dropout can stay active at inference for Monte-Carlo sampling (BALD), and the
bottleneck is exposed as an embedding (k-means, core-set). The intensity window the
network was trained with is a buffer, so it travels inside every checkpoint and every
caller (serving, scoring, whole volumes, evaluation) normalises images alike.
"""

from __future__ import annotations

import copy
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters; stored in every checkpoint."""

    n_classes: int = 2
    in_channels: int = 1
    base_channels: int = 8
    depth: int = 5
    dropout: float = 0.1

    @property
    def size_multiple(self) -> int:
        """Input height/width must be a multiple of this (one halving per level)."""
        return 2**self.depth

    def to_dict(self) -> dict:
        return asdict(self)


def default_device() -> torch.device:
    """CUDA when the machine has it, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_name() -> str:
    """The processor's model name, for benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class MCDropout2d(nn.Dropout2d):
    """Channel dropout that can be kept on in eval mode for Monte-Carlo sampling."""

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self.always_on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(x, self.p, self.training or self.always_on)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections; returns logits (N, C, H, W).

    BatchNorm folds into the convolutions at inference on CPU (GroupNorm cost a
    third of the forward pass); fine-tuning batches of a few patches still hold
    tens of thousands of pixels per channel, enough for stable statistics.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.encoders = nn.ModuleList()
        cin = config.in_channels
        for w in widths[:-1]:
            self.encoders.append(_conv_block(cin, w))
            cin = w
        self.bottleneck = _conv_block(widths[-2], widths[-1])
        self.bottleneck_dropout = MCDropout2d(config.dropout)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.decoder_dropouts = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1], strict=True):
            self.upsamplers.append(nn.ConvTranspose2d(w_low, w, 2, stride=2))
            self.decoders.append(_conv_block(2 * w, w))
            self.decoder_dropouts.append(MCDropout2d(config.dropout))
        self.head = nn.Conv2d(widths[0], config.n_classes, 1)
        # (lo, hi) of the input intensities; (0, 0) until training sets it (per-image percentiles).
        self.register_buffer("intensity", torch.zeros(2, dtype=torch.float64))

    @property
    def intensity_window(self) -> tuple[float, float] | None:
        """The training data's intensity window, or None for a network never trained."""
        lo, hi = (float(v) for v in self.intensity)
        return (lo, hi) if hi > lo else None

    def set_intensity_window(self, window: tuple[float, float] | None) -> None:
        if window is not None and not window[1] > window[0]:
            raise ValueError(f"an intensity window needs lo < hi, got {window}")
        self.intensity.copy_(torch.tensor(window or (0.0, 0.0)))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # Checkpoints written before the window was stored normalised each image on its own.
        state_dict.setdefault(prefix + "intensity", torch.zeros(2, dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_mc_dropout(self, enabled: bool) -> None:
        """Keep dropout active in eval mode (for Monte-Carlo samples)."""
        for module in self.modules():
            if isinstance(module, MCDropout2d):
                module.always_on = enabled

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        return self.bottleneck(x), skips

    def forward(
        self, x: torch.Tensor, return_embedding: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        bottom, skips = self._encode(x)
        x = self.bottleneck_dropout(bottom)
        for up, decoder, dropout, skip in zip(
            self.upsamplers, self.decoders, self.decoder_dropouts, reversed(skips), strict=True
        ):
            x = dropout(decoder(torch.cat([up(x), skip], dim=1)))
        logits = self.head(x)
        if return_embedding:
            return logits, bottom.mean(dim=(2, 3))
        return logits

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck features averaged over space: (N, base_channels * 2**depth)."""
        return self._encode(x)[0].mean(dim=(2, 3))


def build_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A freshly initialised network; the seed makes the initial model reproducible."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = UNet(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return net.eval()


def fuse_for_inference(net: UNet) -> UNet:
    """A copy with each BatchNorm folded into its convolution (~10 % faster on CPU).

    Only for serving: the folded network computes the same function in eval mode
    (to float rounding) but can no longer be trained.
    """
    fused = copy.deepcopy(net).eval()
    for module in fused.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
    return fused
