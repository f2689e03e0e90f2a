"""What a face detector is and gives, and the registry of detectors.

A detector takes an RGB uint8 image (H, W, 3) and returns every face it finds as a
:class:`Detection`. Each implementation (``mtcnn.py``, ``scrfd.py``) registers its factory here
with :func:`register_detector`; :func:`facerec.data.detect.create_detector` builds one by name.
This module imports no implementation, so the implementations import it without a circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from facerec.registry import Registry


@dataclass
class Detection:
    """One face: box (x1, y1, x2, y2) in pixels, detector score in [0, 1], five landmarks.

    Landmarks are (5, 2) float32 (x, y) in the ArcFace order: left eye, right eye, nose tip, left
    mouth corner, right mouth corner, "left" meaning on the viewer's left.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def size(self) -> float:
        """The shorter side of the box, the number a minimum face size is compared with."""
        return min(self.width, self.height)


@runtime_checkable
class FaceDetector(Protocol):
    def detect(self, image: np.ndarray) -> list[Detection]:
        """All faces in an RGB uint8 (H, W, 3) image, highest score first."""
        ...


DETECTORS: Registry[FaceDetector] = Registry("detector")

# A detector factory: ``fn(device, backend, model_dir, **options) -> FaceDetector``; the name it is
# registered under is the detector's name in ``create_detector``.
register_detector = DETECTORS.register


def list_detectors() -> list[str]:
    return DETECTORS.names()
