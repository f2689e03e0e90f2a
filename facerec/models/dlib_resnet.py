"""dlib's face-recognition ResNet as a registry model, and models that run two networks on a canvas.

:class:`DlibResNet` is the architecture of ``dlib_face_recognition_resnet_model_v1.dat`` (dlib's
``anet_type``), built from its fixed layout with empty weights: ``facerec.teachers.dlib_port`` fills it
from dlib's file, and a torch artefact (``facerec.export.torch_artifact``) from its state dict, so a
served model needs neither dlib nor the file. It takes a 150 x 150 RGB chip in 0..255 and gives dlib's
raw 128-d descriptor. Layout (``examples/dnn_face_recognition_ex.cpp``, ``dnn/layers.h``): con 7x7/2
(32), affine, relu, max-pool 3x3/2, residual stages of 32 (3 blocks), 64 (down + 3), 128 (down + 2),
256 (down + 2), 256 (down), global average pool, a 256 -> 128 linear map without bias. A stride-2
convolution or pool does not pad; ``affine`` is a per-channel ``gamma * x + beta``; ``add_prev`` adds a
block's output and its shortcut as if the smaller were zero-padded at the end of each axis.

Registered models (facerec's input convention: (N, 3, S, S) RGB, (x - 127.5) / 127.5):

- ``dlib_resnet_v1``: the descriptor as a :class:`FaceOutput` embedding, on the 150 px chip;
- ``canvas_pair``: a recognizer and another model's quality token on one input, each on its own crop
  of a registered canvas (``facerec.data.align.CANVASES``): the torch twin of the graph that
  ``facerec import --quality-from`` writes (``facerec.export.attach_quality``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facerec.models.output import FaceOutput
from facerec.models.registry import create_model, register_model

CHIP_SIZE = 150
EMBEDDING_SIZE = 128
#: dlib's input_rgb_image_sized means (R, G, B); the chip is (pixel - mean) / 256.
INPUT_MEANS = (122.78199768066406, 117.0009994506836, 104.2979965209961)
STEM_CHANNELS = 32
#: (output channels, downsampling) of each residual block, input to output.
BLOCKS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2 + ((256, True),)
)


def _out(size: int, kernel: int, stride: int, pad: int) -> int:
    """Rows (= columns) out of a square conv or pool: dlib's 1 + (n + 2 pad - k) // stride."""
    return 1 + (size + 2 * pad - kernel) // stride


def _pad_to(t: Tensor, pads: tuple[int, ...]) -> Tensor:
    return F.pad(t, pads) if any(pads) else t


class Affine(nn.Module):
    """dlib's inference-time batch norm: ``gamma * x + beta`` per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma + self.beta


class Block(nn.Module):
    """relu(BN(con(relu(BN(con(x))))) + shortcut), shortcut = x or its 2x2 average."""

    def __init__(self, channels: int, out_channels: int, down: bool, size: int) -> None:
        super().__init__()
        stride, pad = (2, 0) if down else (1, 1)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, stride, pad, bias=True)
        self.bn1 = Affine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=True)
        self.bn2 = Affine(out_channels)
        self.down = down
        # Shapes are fixed by the 150 x 150 input, so the pads of add_prev are constants (and the
        # ONNX graph has no shape arithmetic).
        body = (out_channels, _out(_out(size, 3, stride, pad), 3, 1, 1))
        short = (channels, (size - 2) // 2 + 1 if down else size)
        self.out_shape = (max(body[0], short[0]), max(body[1], short[1]))
        c, n = self.out_shape
        self.pad_body = (0, n - body[1], 0, n - body[1], 0, c - body[0])
        self.pad_short = (0, n - short[1], 0, n - short[1], 0, c - short[0])

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_pad_to(y, self.pad_body) + _pad_to(shortcut, self.pad_short))


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: (N, 3, 150, 150) RGB in 0..255 -> (N, 128) descriptor."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(INPUT_MEANS, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, STEM_CHANNELS, 7, 2, 0, bias=True)
        self.stem_bn = Affine(STEM_CHANNELS)
        self.pool = nn.MaxPool2d(3, 2, 0)
        size = _out(_out(CHIP_SIZE, 7, 2, 0), 3, 2, 0)
        channels, blocks = STEM_CHANNELS, []
        for out_channels, down in BLOCKS:
            blocks.append(Block(channels, out_channels, down, size))
            channels, size = blocks[-1].out_shape
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, EMBEDDING_SIZE, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.mean) / 256.0
        x = self.pool(F.relu(self.stem_bn(self.stem(x))))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


class DlibFace(nn.Module):
    """:class:`DlibResNet` behind facerec's input convention and output type."""

    has_quality = False
    feature_dims: list[int] = []
    input_size = CHIP_SIZE

    def __init__(self) -> None:
        super().__init__()
        self.net = DlibResNet()
        self.embedding_size = EMBEDDING_SIZE

    def forward(self, x: Tensor, return_features: bool = False) -> FaceOutput:
        return FaceOutput(self.net(x * 127.5 + 127.5), None, [] if return_features else None)


@register_model(trainable=False)
def dlib_resnet_v1() -> DlibFace:
    """dlib's ResNet face descriptor on its 150 px chip (weights: ``facerec.teachers.dlib_port``)."""
    return DlibFace()


class CanvasPair(nn.Module):
    """A recognizer's embedding and feature taps, and another model's quality, on one input.

    With a ``canvas`` id the input is that canvas: the recognizer reads its exact window (a slice),
    the quality model its crop through the fixed bilinear grid of
    :meth:`facerec.data.align.Canvas.secondary_grid` (zeros outside), as the ONNX graph does. Without
    one both read the input as it is."""

    has_quality = True

    def __init__(self, recognizer: nn.Module, quality_model: nn.Module, canvas: str | None) -> None:
        super().__init__()
        if not getattr(quality_model, "has_quality", False):
            raise ValueError("the quality model has no quality output")
        self.recognizer, self.quality_model = recognizer, quality_model
        self.feature_dims = list(getattr(recognizer, "feature_dims", []))
        self.embedding_size = getattr(recognizer, "embedding_size", None)
        self.window: tuple[int, int, int] | None = None
        self.input_size = getattr(recognizer, "input_size", 112)
        if canvas is not None:
            import numpy as np

            from facerec.data.align import CANVASES

            layout = CANVASES[canvas]
            (ox, oy), s = layout.offset, layout.primary_size
            self.window = (ox, oy, s)
            self.input_size = layout.size
            grid = torch.from_numpy(np.ascontiguousarray(layout.secondary_grid()[None]))
            self.register_buffer("grid", grid, persistent=False)  # rebuilt from the canvas id

    def forward(self, x: Tensor, return_features: bool = False) -> FaceOutput:
        rec_in, qual_in = x, x
        if self.window is not None:
            ox, oy, s = self.window
            rec_in = x[:, :, oy:oy + s, ox:ox + s]
            grid = self.grid.to(x.dtype).expand(x.shape[0], -1, -1, -1)
            qual_in = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = self.recognizer(rec_in, return_features=return_features)
        quality = self.quality_model(qual_in).quality
        return FaceOutput(out.embedding, quality, out.features)


@register_model(trainable=False)
def canvas_pair(recognizer: str = "dlib_resnet_v1", recognizer_overrides: dict | None = None,
                quality: str = "vit_tiny_fiqa", quality_overrides: dict | None = None,
                canvas: str | None = "dlib-chip-5pt-150-canvas-192-v1") -> CanvasPair:
    """Two registry models on one input: ``recognizer``'s embedding, ``quality``'s quality token."""
    return CanvasPair(create_model(recognizer, **(recognizer_overrides or {})),
                      create_model(quality, **(quality_overrides or {})), canvas)
