"""Inference runtime: device policy, backends (onnxruntime, torch), micro-batcher, face pipeline.

See docs/export_runtime.md. Nothing here imports torch at import time, so an onnxruntime-only
server starts without it (the torch backend imports it when built).
"""

# First: OpenCV reads its own pixel ceiling once, when it loads (see facerec.data.image_io).
import facerec.data.image_io  # noqa: F401, I001

from facerec.runtime.backends import Backend, OnnxRuntimeBackend, TorchBackend, load_backend, to_model_input
from facerec.runtime.batcher import BatcherClosed, BatchInfo, MicroBatcher, Overloaded
from facerec.runtime.device import (
    DEVICE_ENV,
    DeviceChoice,
    DeviceUnavailableError,
    GpuProbe,
    probe_gpu,
    resolve_device,
)
from facerec.runtime.pipeline import (
    DEFAULT_FACE_DETECTOR,
    DecodeError,
    Face,
    FaceIndexError,
    FeatureListScorer,
    FacePipeline,
    ImageResult,
    NoFaceError,
    NotAlignedError,
    PipelineError,
    TooManyFacesError,
)

__all__ = [
    "DEFAULT_FACE_DETECTOR",
    "DEVICE_ENV",
    "Backend",
    "BatchInfo",
    "BatcherClosed",
    "DecodeError",
    "DeviceChoice",
    "DeviceUnavailableError",
    "Face",
    "FaceIndexError",
    "FeatureListScorer",
    "FacePipeline",
    "GpuProbe",
    "ImageResult",
    "MicroBatcher",
    "NoFaceError",
    "NotAlignedError",
    "OnnxRuntimeBackend",
    "Overloaded",
    "PipelineError",
    "TooManyFacesError",
    "TorchBackend",
    "load_backend",
    "probe_gpu",
    "resolve_device",
    "to_model_input",
]
