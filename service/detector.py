"""Which face detector the service runs (``FACEREC_DETECTOR``), on which device and runtime.

- ``mtcnn`` (default): the shipped MTCNN. On a CPU its networks run in onnxruntime (about ten times
  faster than its torch twin there, for photo-sized images); when the service's device is CUDA they
  run in torch on that GPU, where the CPU detector would be the limit of the whole service.
- ``scrfd``: an insightface SCRFD model the operator supplies (``FACEREC_DETECTOR_MODEL``: a folder
  with ``det_*.onnx`` or the file); facerec ships no SCRFD weights. It runs in onnxruntime on the
  service's device; a CUDA device needs onnxruntime-gpu, and without it the start fails (the strict
  device policy: nothing falls back to the CPU silently).

``plan_detector`` is the choice alone (pure, tested on any machine); ``build_detector`` builds it and
turns every way that can fail into one :class:`DetectorUnavailableError` naming the setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from facerec.runtime.device import DeviceChoice


class DetectorUnavailableError(RuntimeError):
    """The configured face detector cannot be built; the message says which setting and why."""


@dataclass(frozen=True)
class DetectorPlan:
    name: str  # "mtcnn" | "scrfd": the family (the OOD detector's confidence layer reads one family's)
    backend: str  # what runs its networks: "onnx" (onnxruntime) or "torch"
    device: str  # "cpu" | "cuda:N"
    model_dir: Path | None = None

    def describe(self) -> dict:
        runtime = "onnxruntime" if self.backend == "onnx" else self.backend
        return {"name": self.name, "backend": runtime, "device": self.device}


def plan_detector(settings, device: DeviceChoice) -> DetectorPlan:
    """The detector for ``settings.detector`` on the service's resolved ``device``."""
    if settings.detector == "scrfd":
        return DetectorPlan("scrfd", "onnx", device.torch_device, settings.detector_model)
    if device.is_cuda:
        return DetectorPlan("mtcnn", "torch", device.torch_device)
    return DetectorPlan("mtcnn", "onnx", "cpu")


def build_detector(plan: DetectorPlan):
    from facerec.data.detect import create_detector

    try:
        return create_detector(plan.name, device=plan.device, backend=plan.backend,
                               model_dir=None if plan.model_dir is None else str(plan.model_dir))
    except (OSError, RuntimeError, ValueError) as err:  # missing file, no CUDA provider, not an SCRFD
        where = f" ({plan.model_dir})" if plan.model_dir is not None else ""
        raise DetectorUnavailableError(
            f"FACEREC_DETECTOR={plan.name} on {plan.device}{where} cannot be used: {err}") from None
