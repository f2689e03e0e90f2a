"""A thin wrapper that turns a backbone's FaceOutput into a plain tuple, for ONNX / torch.export.

Exporters trace tensors, not dataclasses, so the wrapper fixes the output order once:
``embedding``, then ``quality`` (only for models with a quality head), then ``feature_0 ..
feature_{K-1}`` (only with ``return_features=True``). ``output_names`` spells that order for
``torch.onnx.export(..., output_names=...)`` and for whoever reads the exported graph.

Export path: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, the default
since torch 2.9) with ``dynamic_shapes`` for the batch, at opset 18 (its native opset: asking it for
17 triggers a down-conversion that fails noisily on Reduce* nodes and leaves the model at 18 anyway).
The legacy TorchScript exporter (``dynamo=False``, opset 17, ``dynamic_axes``) also exports every
model here with identical outputs and ~10x faster, but is deprecated in torch 2.14; keep it as the
fallback.

fp16: ``HalfPrecisionIO`` runs a half-precision copy of the model behind fp32 input and outputs, so
an fp16 graph keeps the same input convention (float32, (x - 127.5) / 127.5) and callers never see a
float16 array. The weights and activations inside are float16 (LayerNormalization still accumulates in
float32 in onnxruntime); that is what halves the file and lets a GPU provider use tensor cores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class ExportWrapper(nn.Module):
    def __init__(self, model: nn.Module, return_features: bool = False) -> None:
        super().__init__()
        self.model = model
        self.return_features = return_features

    @property
    def output_names(self) -> list[str]:
        names = ["embedding"]
        if self.model.has_quality:
            names.append("quality")
        if self.return_features:
            names += [f"feature_{i}" for i in range(len(self.model.feature_dims))]
        return names

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.model(x, return_features=self.return_features)
        outputs = [out.embedding]
        if out.quality is not None:
            outputs.append(out.quality)
        if self.return_features and out.features is not None:
            outputs.extend(out.features)
        return tuple(outputs)


class HalfPrecisionIO(nn.Module):
    """float32 in -> float16 model -> float32 out (wraps an ``ExportWrapper`` of a ``.half()`` model)."""

    def __init__(self, wrapper: ExportWrapper) -> None:
        super().__init__()
        self.wrapper = wrapper

    @property
    def output_names(self) -> list[str]:
        return self.wrapper.output_names

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(o.float() for o in self.wrapper(x.half()))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    return_features: bool = False,
    opset: int | None = None,
    dynamo: bool = True,
    fp16: bool = False,
    input_name: str = "input",
) -> list[str]:
    """Export ``model`` (put in eval mode) to ONNX with a dynamic batch axis; returns output names.

    The example input has batch 2: tracing with batch 1 lets exporters specialise the batch to 1.
    ``fp16=True`` exports a half-precision deep copy (the caller's model is left untouched).
    """
    import copy

    model = model.eval()
    wrapper: nn.Module = ExportWrapper(model, return_features=return_features).eval()
    if fp16:
        wrapper = HalfPrecisionIO(ExportWrapper(copy.deepcopy(model).half(), return_features)).eval()
    size = model.input_size
    example = torch.zeros(2, 3, size, size)
    names = wrapper.output_names
    dynamic_axes = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    kwargs: dict = dict(
        input_names=[input_name],
        output_names=names,
        opset_version=opset or (18 if dynamo else 17),
        dynamic_axes=dynamic_axes,
        dynamo=dynamo,
    )
    if dynamo:
        # The dynamo exporter prefers dynamic_shapes; dynamic_axes would be converted with a warning.
        kwargs.pop("dynamic_axes")
        kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
        kwargs["external_data"] = False  # one self-contained file (models here are < 2 GB)
        kwargs["verbose"] = False
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), str(path), **kwargs)
    return names
