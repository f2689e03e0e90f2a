"""MobileFaceNet (Chen et al., 2018) for 112x112 faces: a ~1.2 M-parameter backbone for CPU serving.

Layout from the paper's Table 1 (written from the paper, not from any released code):
conv3x3/2 (64) -> depthwise conv3x3 (64) -> inverted-residual bottlenecks
(t, c, n, s) = (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)
-> conv1x1 (512) -> global depthwise conv 7x7 (GDC, linear) -> linear conv1x1 to the embedding.
PReLU everywhere a non-linearity is used. GDC replaces global average pooling so each position of
the 7x7 map gets its own learned weight: face crops are aligned, and the centre matters more
than the corners.

We emit a 512-d embedding (the paper uses 128) so galleries and heads are interchangeable with the
IResNet/ViT models; ``embedding_size=128`` restores the paper's size.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from facerec.models.output import FaceOutput
from facerec.models.registry import register_model

# (expansion t, out channels c, repeats n, first stride s), from the MobileFaceNet paper.
_BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class ConvBN(nn.Sequential):
    """conv -> BN, optionally followed by PReLU (linear when ``act=False``)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True,
        padding: int | None = None,
    ) -> None:
        pad = kernel // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act:
            layers.append(nn.PReLU(out_ch))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: expand 1x1 -> depthwise 3x3 (stride) -> linear project 1x1."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.body = nn.Sequential(
            ConvBN(in_ch, hidden, 1),
            ConvBN(hidden, hidden, 3, stride=stride, groups=hidden),
            ConvBN(hidden, out_ch, 1, act=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


class MobileFaceNet(nn.Module):
    input_size = 112
    has_quality = False

    def __init__(self, embedding_size: int = 512, width: float = 1.0, downsample: int = 1) -> None:
        """``downsample`` > 1 average-pools the 112x112 input by that factor first: the same
        network at a lower resolution (about downsample**2 times cheaper), for CPU-sized
        experiments. The model's input stays 112x112, so data, export and service are unchanged."""
        super().__init__()
        if downsample not in (1, 2):
            raise ValueError(f"downsample must be 1 or 2, got {downsample}")
        self.embedding_size = embedding_size
        self.downsample = downsample

        def ch(c: int) -> int:
            return max(8, int(round(c * width / 8)) * 8)

        stem_ch = ch(64)
        self.stem = nn.Sequential(
            ConvBN(3, stem_ch, 3, stride=2),  # 112 -> 56
            ConvBN(stem_ch, stem_ch, 3, groups=stem_ch),
        )
        # Group the bottlenecks into stages that end at each resolution change, for the OOD taps.
        stages: list[nn.Module] = []
        in_ch = stem_ch
        for t, c, n, s in _BOTTLENECKS:
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(in_ch, ch(c), stride=s if i == 0 else 1, expansion=t))
                in_ch = ch(c)
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        expand_ch = ch(512)
        self.conv_expand = ConvBN(in_ch, expand_ch, 1)
        final_hw = self.input_size // downsample
        for _ in range(4):  # the four stride-2 3x3 convolutions (padding 1)
            final_hw = (final_hw - 1) // 2 + 1  # 112 -> 7; 56 -> 4
        # GDC: a 7x7 depthwise conv without padding turns the 7x7 map into one weighted sum per channel.
        self.gdc = ConvBN(expand_ch, expand_ch, final_hw, groups=expand_ch, act=False, padding=0)
        self.embed = nn.Conv2d(expand_ch, embedding_size, 1, bias=False)
        self.embed_bn = nn.BatchNorm1d(embedding_size)
        # Tap after the stem, after each resolution's last stage and after the 1x1 expansion.
        self._tap_stages = (0, 2, 4)
        self.feature_dims = [stem_ch] + [ch(_BOTTLENECKS[i][1]) for i in self._tap_stages] + [expand_ch]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # fan_in: PyTorch's fan_out ignores groups, which would shrink the depthwise kernels ~Cx.
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, return_features: bool = False) -> FaceOutput:
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        x = self.stem(x)
        pooled: list[Tensor] = []
        if return_features:
            pooled.append(x.mean(dim=(2, 3)))
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if return_features and i in self._tap_stages:
                pooled.append(x.mean(dim=(2, 3)))
        x = self.conv_expand(x)
        if return_features:
            pooled.append(x.mean(dim=(2, 3)))
        x = self.embed(self.gdc(x))
        embedding = self.embed_bn(x.flatten(1))
        return FaceOutput(embedding=embedding, quality=None, features=pooled if return_features else None)


@register_model
def mobilefacenet(**overrides) -> MobileFaceNet:
    return MobileFaceNet(**overrides)
