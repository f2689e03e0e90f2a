"""Does an exported ONNX graph compute what the torch model computes? Checked on every export.

Inputs are random uint8 "images" normalised exactly like the runtime does, so the check covers the
value range real crops have. Embeddings and OOD features are compared by per-row cosine (their scale
is irrelevant to every consumer); quality, a scalar regressed by the model, by absolute difference
relative to its spread.

fp32 graphs must match the fp32 torch model to cosine >= 0.9999. fp16 graphs are compared with the
fp32 torch model (cosine >= 0.999) and, when a CUDA GPU is present, with torch autocast-fp16 on it,
which is what the torch GPU backend serves; without a GPU that second comparison is skipped and the
report says so. Any failure raises :class:`ParityError` with the full report.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facerec.models.export_wrapper import ExportWrapper

FP32_COSINE = 0.9999
FP16_COSINE = 0.999
# Quality: |onnx - torch| <= tol * max(1, spread of the torch values), spread = max - min.
FP32_QUALITY_TOL = 1e-3
FP16_QUALITY_TOL = 2e-2


class ParityError(AssertionError):
    """The exported graph does not reproduce the torch model; the export must not be used."""


@dataclass
class Comparison:
    reference: str  # "torch-fp32" | "torch-autocast-fp16-cuda"
    output: str
    metric: str  # "min_cosine" | "max_abs_diff"
    value: float
    limit: float

    @property
    def passed(self) -> bool:
        ok = self.value >= self.limit if self.metric == "min_cosine" else self.value <= self.limit
        return bool(ok and np.isfinite(self.value))


@dataclass
class ParityReport:
    path: str
    precision: str
    batch_sizes: tuple[int, ...]
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "precision": self.precision,
            "batch_sizes": list(self.batch_sizes),
            "passed": self.passed,
            "comparisons": [{**c.__dict__, "passed": c.passed} for c in self.comparisons],
            "notes": self.notes,
        }

    def summary(self) -> str:
        lines = [f"parity {'PASSED' if self.passed else 'FAILED'} for {self.path} ({self.precision})"]
        for c in self.comparisons:
            op = ">=" if c.metric == "min_cosine" else "<="
            mark = "ok " if c.passed else "BAD"
            lines.append(
                f"  {mark} {c.output:<11} vs {c.reference}: {c.metric} {c.value:.6g} (need {op} {c.limit})"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def random_faces(batch: int, size: int = 112, seed: int = 0) -> np.ndarray:
    """uint8 (N, size, size, 3): smooth random colour fields plus noise, a crude stand-in for crops."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (batch, 8, 8, 3)).astype(np.float32)
    smooth = np.stack([_resize(c, size) for c in coarse])
    noisy = smooth + rng.normal(0.0, 20.0, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)


def normalise(faces_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW in [-1, 1]: (x - 127.5) / 127.5, the insightface convention."""
    x = faces_uint8.astype(np.float32).transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x - 127.5) / 127.5, dtype=np.float32)


def row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest per-row cosine of two batches (nan if any is not finite)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = num / np.maximum(den, 1e-30)
    return float(np.min(cos)) if np.all(np.isfinite(cos)) else float("nan")


def _torch_outputs(
    model: nn.Module, x: np.ndarray, names: list[str], autocast_cuda: bool
) -> dict[str, np.ndarray]:
    if autocast_cuda:
        model = copy.deepcopy(model).cuda()  # a copy: the caller's model stays where it was
    wrapper = ExportWrapper(model, return_features=any(n.startswith("feature_") for n in names)).eval()
    device = next(model.parameters()).device
    ctx = torch.autocast("cuda", dtype=torch.float16) if autocast_cuda else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        outs = wrapper(torch.from_numpy(x).to(device))
    return {n: o.float().cpu().numpy() for n, o in zip(wrapper.output_names, outs)}


def _compare(
    report: ParityReport, reference: str, ours: dict, ref: dict, cos_min: float, q_tol: float
) -> None:
    for name, value in ours.items():
        if name not in ref:
            raise ParityError(f"{report.path}: output {name!r} has no torch counterpart")
        if value.shape != ref[name].shape:
            report.comparisons.append(Comparison(reference, name, "shape", float("nan"), 0.0))
            continue
        if name == "quality":
            spread = max(1.0, float(ref[name].max() - ref[name].min()))
            diff = float(np.max(np.abs(value - ref[name]))) / spread
            report.comparisons.append(Comparison(reference, name, "max_abs_diff", diff, q_tol))
        else:
            report.comparisons.append(
                Comparison(reference, name, "min_cosine", row_cosine(value, ref[name]), cos_min)
            )


def _merge(results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    precision: str = "fp32",
    batch_sizes: tuple[int, ...] = (1, 5),
    seed: int = 0,
    raise_on_failure: bool = True,
    input_name: str | None = None,
) -> ParityReport:
    """Run the graph (onnxruntime CPU) and the torch model on the same inputs and compare.

    Several batch sizes are run because a graph specialised to the tracing batch fails only on the
    others. The torch model must be in eval mode; it is not modified.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # fp16 graphs on CPU log a warning per node it cannot constant-fold
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    input_name = input_name or session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    report = ParityReport(str(onnx_path), precision, tuple(batch_sizes))
    size = int(model.input_size)
    inputs = [normalise(random_faces(b, size, seed + i)) for i, b in enumerate(batch_sizes)]
    ours = _merge([dict(zip(names, session.run(None, {input_name: x}))) for x in inputs])
    model.eval()
    ref = _merge([_torch_outputs(model, x, names, autocast_cuda=False) for x in inputs])
    if precision == "fp32":
        _compare(report, "torch-fp32", ours, ref, FP32_COSINE, FP32_QUALITY_TOL)
    elif precision == "fp16":
        _compare(report, "torch-fp32", ours, ref, FP16_COSINE, FP16_QUALITY_TOL)
        if torch.cuda.is_available():
            amp = _merge([_torch_outputs(model, x, names, autocast_cuda=True) for x in inputs])
            _compare(report, "torch-autocast-fp16-cuda", ours, amp, FP16_COSINE, FP16_QUALITY_TOL)
        else:
            report.notes.append(
                "no CUDA GPU here: the comparison with torch autocast-fp16 on the GPU was skipped; "
                "the fp16 graph was checked against fp32 torch only"
            )
    else:
        raise ValueError(f"unknown precision {precision!r}; use 'fp32' or 'fp16'")
    if raise_on_failure and not report.passed:
        raise ParityError(report.summary())
    return report
