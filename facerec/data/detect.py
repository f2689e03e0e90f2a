"""Building a face detector by name, and the face-selection policies shared by every detector.

A detector takes an RGB uint8 image (H, W, 3) and returns every face it finds as a
``Detection`` (:mod:`facerec.data.detection`). Which of several faces to keep (largest, most
central, all) and the minimum size and score are policies applied on top, so that any detector
(MTCNN, a user's SCRFD) gets them. The detectors are registered factories, like models and
margins: importing this module imports the shipped ones (``mtcnn``, ``mtcnn_onnx``, ``scrfd``),
which register themselves.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

# The shipped detectors register themselves on import (torch and onnxruntime load lazily).
from facerec.data import mtcnn, mtcnn_onnx, scrfd  # noqa: F401
from facerec.data.detection import (
    DETECTORS,
    Detection,
    FaceDetector,
    list_detectors,
    register_detector,
)

__all__ = [
    "DEFAULT_PAD_ATTEMPTS",
    "Detection",
    "FaceDetector",
    "SelectPolicy",
    "bounded_copy",
    "create_detector",
    "detect_faces",
    "detector_name",
    "list_detectors",
    "map_detection",
    "pad_image",
    "register_detector",
    "select_faces",
]

SelectPolicy = Literal["largest", "central", "all"]


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


# ------------------------------------------------------------------------ factory and retry
def detector_name(detector) -> str:
    """A face detector's family name ("mtcnn", "scrfd", or the class name of a custom one): the OOD
    detector's confidence layer is fitted on one detector's scores and only reads that one's."""
    return str(getattr(detector, "name", type(detector).__name__)).lower()


def create_detector(
    name: str = "mtcnn",
    device: str = "cpu",
    backend: str = "torch",
    model_dir: str | None = None,
    **kw,
) -> FaceDetector:
    """Build a detector.

    - ``"mtcnn"``: the shipped MTCNN. ``backend="torch"`` runs the nets with torch on ``device``;
      ``backend="onnx"`` with onnxruntime (torch-free; ``model_dir`` holds/receives the three
      ONNX files, default: the shipped ones). Keywords: ``min_face_size`` (20), ``thresholds``
      ((0.6, 0.7, 0.7)), ``factor`` (0.709), ``batch_size`` (512), ``threads`` (onnx: intra-op
      threads per session, default 1, fastest for photo-sized images; torch: if given, calls
      ``torch.set_num_threads``, which is process-wide), ``weights_path`` (torch only; default
      ``model_dir/mtcnn.npz`` if that exists, else the shipped weights).
    - ``"scrfd"``: an insightface SCRFD model; ``model_dir`` is a folder with ``det_*.onnx`` or
      the file. Always onnxruntime, whatever ``backend`` says. Keywords: ``input_size`` (640),
      ``score_threshold`` (0.5), ``nms_threshold`` (0.4), ``threads`` (0 = all cores).
    """
    return DETECTORS.create(name.lower(), device=device, backend=backend, model_dir=model_dir, **kw)


def pad_image(
    image: np.ndarray, fraction: float = 0.25, mode: str = "replicate"
) -> tuple[np.ndarray, int, int]:
    """Add a border of ``fraction`` of the width / height on every side; returns the padded image
    and the (x, y) offset of the original in it. "constant" pads with mid grey, "replicate"
    repeats the edge pixels."""
    import cv2

    h, w = image.shape[:2]
    px, py = int(round(w * fraction)), int(round(h * fraction))
    if mode == "replicate":
        padded = cv2.copyMakeBorder(image, py, py, px, px, cv2.BORDER_REPLICATE)
    elif mode == "constant":
        padded = cv2.copyMakeBorder(image, py, py, px, px, cv2.BORDER_CONSTANT, value=(127, 127, 127))
    else:
        raise ValueError(f"unknown pad mode {mode!r}; use 'constant' or 'replicate'")
    return padded, px, py


# Tried in order when nothing is found. On 150 random Yale B crops (faces filling the frame):
# no padding finds 42, replicate-25% 86, replicate-50% 79, grey-50% 61, these two together 91;
# the misses left are mostly near-black illumination conditions.
DEFAULT_PAD_ATTEMPTS: tuple[tuple[str, float], ...] = (("replicate", 0.25), ("constant", 0.5))


def map_detection(d: Detection, fx: float, fy: float, shift: tuple[float, float] = (0.0, 0.0)) -> Detection:
    """``d`` from one image's pixel coordinates to another's: moved by ``-shift`` (a padding), then
    scaled by (fx, fy) about pixel centres (x -> (x + 0.5) * fx - 0.5, as cv2.resize maps them)."""
    f = np.array([fx, fy], dtype=np.float64)
    s = np.asarray(shift, dtype=np.float64)
    box = (np.asarray(d.box, np.float64).reshape(2, 2) - s + 0.5) * f - 0.5
    return Detection(
        box=box.reshape(4).astype(np.float32),
        score=d.score,
        landmarks=((np.asarray(d.landmarks, np.float64) - s + 0.5) * f - 0.5).astype(np.float32),
    )


def bounded_copy(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float, float]:
    """``image`` shrunk (area interpolation) so that its longer side is at most ``max_side``, and
    the factors (fx, fy) that map its coordinates back (``map_detection``)."""
    import cv2

    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image, 1.0, 1.0
    s = max_side / max(h, w)
    ws, hs = max(1, round(w * s)), max(1, round(h * s))
    small = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_AREA)
    return small, w / ws, h / hs


def detect_faces(
    detector: FaceDetector,
    image: np.ndarray,
    policy: SelectPolicy = "largest",
    min_size: float = 0.0,
    min_score: float = 0.0,
    pad_retry: bool = True,
    pad_attempts: tuple[tuple[str, float], ...] = DEFAULT_PAD_ATTEMPTS,
    max_side: int | None = None,
) -> list[Detection]:
    """Detect, then apply the policy; if nothing survives and ``pad_retry``, detect again on
    padded copies (``pad_attempts``: (mode, fraction) pairs, see ``pad_image``) until a face is
    kept. Tight crops (a face filling the frame, e.g. Yale B) defeat detectors trained on faces
    with context; the border gives it back. Boxes and landmarks found on a padded copy are
    shifted back to the original's coordinates and may extend beyond it (kept, so that an
    aligner sees the true face geometry). The policy and filters always judge faces in the
    original's frame (its centre, its shape).

    ``max_side``: the detector sees a copy no larger than this (every attempt, padded ones
    included), and what it finds is mapped back to ``image``'s full-resolution coordinates. A
    detector's cost grows with the pixels it scans (MTCNN: 0.3 s at 1600 px, ~10 s at 6000 px),
    its smallest face does not: the price is that faces below ``detector min size x side /
    max_side`` original pixels are not found."""
    base, fx, fy = bounded_copy(image, max_side)

    def attempt(view: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> list[Detection]:
        small, gx, gy = bounded_copy(view, max_side)
        # view -> (minus the padding) base -> image
        found = [map_detection(map_detection(d, gx, gy), fx, fy, shift) for d in detector.detect(small)]
        return select_faces(found, image.shape, policy, min_size, min_score)

    found = attempt(base)
    if found or not pad_retry:
        return found
    for mode, fraction in pad_attempts:
        padded, px, py = pad_image(base, fraction, mode)
        found = attempt(padded, (px, py))
        if found:
            return found
    return []
