"""A tiny ONNX embedding model with insightface-zoo conventions, shared by the teacher tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

SAMPLES = Path(__file__).parent / "data" / "lfw_sample"


class TinyEmbedder(nn.Module):
    """NCHW 112x112 -> 16-d: enough structure that colour order and normalisation matter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 4, stride=4)  # 112 -> 28
        self.pool = nn.AvgPool2d(7)  # 28 -> 4
        self.fc = nn.Linear(64, 16)

    def forward(self, x):
        return self.fc(torch.relu(self.pool(self.conv(x))).flatten(1))


def export_tiny(path: Path, input_name: str = "data") -> TinyEmbedder:
    model = TinyEmbedder().eval()
    torch.onnx.export(model, torch.zeros(2, 3, 112, 112), str(path), input_names=[input_name],
                      output_names=["fc1"], dynamic_axes={input_name: {0: "n"}, "fc1": {0: "n"}}, opset_version=17,
                      dynamo=False)
    return model


def torch_embed(model: nn.Module, crops: np.ndarray, bgr: bool = False, mean=127.5, std=127.5) -> np.ndarray:
    x = torch.from_numpy(crops.astype(np.float32)).permute(0, 3, 1, 2)
    if bgr:
        x = x.flip(1)
    mean = torch.tensor(np.broadcast_to(np.asarray(mean, np.float32), (3,)).copy()).view(1, 3, 1, 1)
    std = torch.tensor(np.broadcast_to(np.asarray(std, np.float32), (3,)).copy()).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model((x - mean) / std).numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def sample_paths(limit: int | None = None) -> list[Path]:
    paths = sorted(SAMPLES.glob("*/*.jpg"))
    return paths[:limit] if limit else paths
