"""IResNet ("improved" ResNet, insightface's IR design) for 112x112 aligned faces.

Layout (written from the ArcFace paper / insightface description, not copied):
stem conv3x3(64)-BN-PReLU at full resolution, four stages of pre-activation-style IBasicBlocks
that each halve the resolution (112 -> 56 -> 28 -> 14 -> 7), then the "output layer" BN2d -
dropout - flatten - FC(512*7*7 -> D) - BN1d(D). Keeping the 7x7 map in the FC (instead of global
pooling) preserves the spatial layout that aligned faces share; it is why the FC holds ~25 M of
iresnet50's ~43.6 M parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from facerec.models.output import FaceOutput
from facerec.models.registry import register_model

# insightface uses BN eps 1e-5 in the blocks and 1e-5 for the final BN1d.
_BN_EPS = 1e-5
_STAGE_WIDTHS = (64, 128, 256, 512)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, plus identity or conv1x1-BN shortcut.

    The stride sits on the *second* conv so the first conv still sees the full-resolution map.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=_BN_EPS)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=_BN_EPS),
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet backbone returning a :class:`FaceOutput` (no quality head)."""

    input_size = 112
    has_quality = False

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.stem = nn.Sequential(
            _conv3x3(3, _STAGE_WIDTHS[0]),
            nn.BatchNorm2d(_STAGE_WIDTHS[0], eps=_BN_EPS),
            nn.PReLU(_STAGE_WIDTHS[0]),
        )
        stages = []
        in_ch = _STAGE_WIDTHS[0]
        for width, depth in zip(_STAGE_WIDTHS, layers):
            blocks = [IBasicBlock(in_ch, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.ModuleList(stages)

        final_hw = self.input_size // 16  # four stride-2 stages: 112 -> 7
        self.bn2 = nn.BatchNorm2d(in_ch, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * final_hw * final_hw, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)
        # Features for the OOD detector: pooled stem output, then each stage's output.
        self.feature_dims = [_STAGE_WIDTHS[0], *_STAGE_WIDTHS]
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init, not insightface's N(0, 0.1): in training BN hides the difference, but a
                # fresh model in eval mode (running stats 0/1) would otherwise overflow to inf by
                # iresnet100, which breaks smoke tests and export parity checks of untrained models.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as the identity, which helps very deep nets early on.
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)
        # As in insightface: the embedding BN's scale stays 1, so only its shift is learned and the
        # network cannot shrink the embedding norm through it.
        self.features.weight.requires_grad_(False)

    def forward(self, x: Tensor, return_features: bool = False) -> FaceOutput:
        x = self.stem(x)
        pooled: list[Tensor] = []
        if return_features:
            pooled.append(x.mean(dim=(2, 3)))
        for stage in self.stages:
            x = stage(x)
            if return_features:
                pooled.append(x.mean(dim=(2, 3)))
        x = self.bn2(x)
        x = self.dropout(x)
        # flatten() follows the logical (C, H, W) order, so channels_last inputs give the same FC input.
        x = torch.flatten(x, 1)
        embedding = self.features(self.fc(x))
        return FaceOutput(embedding=embedding, quality=None, features=pooled if return_features else None)


@register_model
def iresnet18(**overrides) -> IResNet:
    return IResNet(layers=(2, 2, 2, 2), **overrides)


@register_model
def iresnet34(**overrides) -> IResNet:
    return IResNet(layers=(3, 4, 6, 3), **overrides)


@register_model
def iresnet50(**overrides) -> IResNet:
    return IResNet(layers=(3, 4, 14, 3), **overrides)


@register_model
def iresnet100(**overrides) -> IResNet:
    return IResNet(layers=(3, 13, 30, 3), **overrides)
