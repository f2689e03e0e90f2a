"""High-frequency statistics of the input image: an extra OOD "layer" that sees pixels directly.

Small L∞ perturbations (FGSM / PGD at a few grey levels) barely move a ViT's pooled token
features, but they add a dense, colourful high-frequency pattern that camera JPEGs of faces do not
have: aligned face crops are smooth, and their chroma is smoother still (JPEG 4:2:0 subsampling,
demosaicing). This module measures exactly that, with fixed filters (no weights), so it exports to
ONNX with the rest of the model and is differentiable for adaptive attacks.

For a model input ``x`` (B, 3, H, W) in [-1, 1]:

1. opponent channels: luminance ``Y = (R + G + B) / 3`` and chroma ``R - G`` and ``B - (R + G) / 2``;
2. three high-pass residuals of each: ``c - box3x3(c)`` (edge-replicated border), and the
   horizontal and vertical first differences;
3. residual energy per ``block`` x ``block`` cell: ``E = mean(r²)`` (``avg_pool2d``, cells that
   do not fit are dropped);
4. per (residual, channel): the mean and the standard deviation over cells of ``log(E + δ)``, and
   ``log(mean(E) + δ)``.

That is 3 residuals x 3 channels x 3 statistics = 27 numbers, ordered residual-major, then
channel, then statistic. ``δ = 1e-6`` (input units², below the 8-bit rounding noise of 5e-6)
keeps the log finite on flat or grey images.

The detector treats this layer one-sidedly (``facerec.ood.mahalanobis``, ``floor``): only *more*
high-frequency energy than genuine faces counts, so grey photos (zero chroma) and small, upsampled
faces (little detail) are not flagged by it — poor captures are the quality score's business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESIDUALS = ("box3", "dx", "dy")
CHANNELS = ("Y", "R-G", "B-RG")
STATISTICS = ("mean_log", "std_log", "log_mean")
PIXEL_STATS_DIM = len(RESIDUALS) * len(CHANNELS) * len(STATISTICS)


def pixel_stats_names() -> list[str]:
    """One name per output column, e.g. ``dx/R-G/mean_log``."""
    return [f"{r}/{c}/{s}" for r in RESIDUALS for c in CHANNELS for s in STATISTICS]


def opponent_channels(x: Tensor) -> Tensor:
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.cat([(r + g + b) / 3.0, r - g, b - (r + g) / 2.0], dim=1)


def residuals(c: Tensor) -> list[Tensor]:
    box = F.avg_pool2d(F.pad(c, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return [c - box, c[..., :, 1:] - c[..., :, :-1], c[..., 1:, :] - c[..., :-1, :]]


def pixel_stats(x: Tensor, block: int = 8, delta: float = 1e-6) -> Tensor:
    """(B, 27) statistics of ``x`` (B, 3, H, W) in model-input units; computed in float32."""
    c = opponent_channels(x.float())
    cols = []
    for r in residuals(c):
        energy = F.avg_pool2d(r * r, block, stride=block).flatten(2)  # (B, 3, cells)
        log_e = torch.log(energy + delta)
        mean = log_e.mean(dim=2)
        # Population std (divide by the cell count): the same formula in numpy tests and ONNX.
        std = torch.sqrt(((log_e - mean[..., None]) ** 2).mean(dim=2))
        log_mean = torch.log(energy.mean(dim=2) + delta)
        cols.append(torch.stack([mean, std, log_mean], dim=2).flatten(1))  # (B, 3 channels * 3)
    return torch.cat(cols, dim=1)


class PixelStats(nn.Module):
    """``pixel_stats`` as a module (no parameters, nothing in the state dict)."""

    dim = PIXEL_STATS_DIM

    def __init__(self, block: int = 8, delta: float = 1e-6) -> None:
        super().__init__()
        self.block = block
        self.delta = delta

    def forward(self, x: Tensor) -> Tensor:
        return pixel_stats(x, self.block, self.delta)
