"""The detector protocol and the face-selection policies shared by every detector.

A detector takes an RGB uint8 image (H, W, 3) and returns every face it finds as a
``Detection``. Which of several faces to keep (largest, most central, all) and the minimum size
and score are policies applied on top, so that any detector (MTCNN, a user's SCRFD) gets them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

SelectPolicy = Literal["largest", "central", "all"]


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


def select_faces(
    detections: list[Detection],
    image_shape: tuple[int, ...],
    policy: SelectPolicy = "largest",
    min_size: float = 0.0,
    min_score: float = 0.0,
) -> list[Detection]:
    """Filter by size and score, then keep one face (largest / most central) or all of them."""
    kept = [d for d in detections if d.size >= min_size and d.score >= min_score]
    if policy == "all" or not kept:
        return kept
    if policy == "largest":
        return [max(kept, key=lambda d: d.width * d.height)]
    if policy == "central":
        h, w = image_shape[:2]
        centre = np.array([w / 2.0, h / 2.0])

        def distance(d: Detection) -> float:
            c = np.array([(d.box[0] + d.box[2]) / 2.0, (d.box[1] + d.box[3]) / 2.0])
            return float(np.linalg.norm(c - centre))

        return [min(kept, key=distance)]
    raise ValueError(f"unknown face policy {policy!r}; use 'largest', 'central' or 'all'")
