"""The face pipeline: bytes -> safe decode -> detect -> align -> (micro-)batch -> model -> per-face results.

Every way an input can be the caller's fault ends in a :class:`PipelineError` subclass with a stable
``code`` (``decode_error``, ``no_face``, ``too_many_faces``), which the service maps to a 4xx; anything
else is a server error. Faces are ordered largest first; more faces than ``max_faces`` is refused
(a crowd photo is not a verification input, and each face costs a model call).

Per face the result holds the box, landmarks and detection score, the L2-normalised embedding and
the raw embedding norm, quality (the model's quality output, or for a model without one the
``quality_fallback`` measure of :mod:`facerec.runtime.quality`) and an OOD score. OOD scoring is
pluggable: ``ood_scorer(outputs) -> one value per face``, where ``outputs`` holds the model's
``feature_<k>`` arrays (N, C_k), the raw ``embedding`` (N, D) and the face detector's confidence
``det_score`` (N,) (a scorer's ``layer_outputs`` names the outputs it needs; an imported model's
detector reads the embedding alone); the Mahalanobis detector of
``facerec.ood`` is one such callable. A scorer with a ``contract_id`` attribute is checked against
the model's contract, so statistics fitted on another model are refused. A detector that scores a
list of per-layer features (``facerec.ood.MahalanobisDetector.score``) plugs in through
:class:`FeatureListScorer`.

Large images cost a bounded amount of work: the detector sees a copy no larger than
``detect_max_side`` (boxes and landmarks are mapped back to the full-resolution image), a JPEG far
above that size is decoded reduced straight from its DCT, and the aligned crops come from the
resolution that holds the face at no less than the crop's scale (the full one when the reduced
decode would lose detail), shrunk with area interpolation first when the face is much larger than
the crop (``aligned_crop``).

``process`` runs synchronously on the backend (offline use, benchmarks); ``process_async`` decodes and
detects in a thread pool and sends the crops through a :class:`MicroBatcher` shared by all requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facerec.bundle import ood_layer_outputs
from facerec.contract import ARCFACE_TEMPLATE_112, ContractMismatchError, require_same_contract

OodScorer = Callable[[dict[str, np.ndarray]], Sequence[Any]]
# (raw embeddings (N, D), detector scores (N,)) -> raw quality (N,): a model without a quality output
QualityFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# The longest side the face detector sees (a larger image is detected on a shrunken copy). MTCNN's
# cost grows with the pixels it scans: 0.07 s at 640 px, 0.3 s at 1600, 0.54 s at 2048 and ~9 s
# at 6000 (one CPU core, onnxruntime). Its smallest face is 20 px of what it sees, so at 1600 a
# face is found down to 1/80 of the longer side: 50 px in a 12 MP phone photo (4032 x 3024), 75 px
# in a 36 MP one; smaller faces hold less than the 112-pixel crop needs anyway. Below 1600 px
# (every usual verification photo) nothing changes.
DETECT_MAX_SIDE = 1600
DEFAULT_FACE_DETECTOR = "mtcnn"  # what a pipeline built without a detector locates faces with


log = logging.getLogger("facerec.pipeline")

class FeatureListScorer:
    """Adapts ``detector.score([feature_0, feature_1, ...], det_scores) -> (N,)`` to the pipeline's
    interface. ``face_detector``: the family name of the pipeline's face detector; an OOD detector
    whose detection layer was calibrated on another detector's confidences gets none (its neutral
    value), since scores of different detectors are not on one scale."""

    def __init__(self, detector, face_detector: str | None = None) -> None:
        self.detector = detector
        self.contract_id = getattr(detector, "contract_id", None) or None
        # The outputs its layers were fitted on (``facerec fit-ood`` records them: the feature_k outputs,
        # or the embedding of a graph without any); None for a detector made before they were recorded.
        self.layer_outputs: list[str] | None = (getattr(detector, "meta", None) or {}).get("layer_outputs")
        layer = getattr(detector, "detection", None)
        self.use_det_scores = layer is not None and face_detector is not None and layer.detector == face_detector
        if layer is not None and face_detector is not None and not self.use_det_scores:
            log.warning(
                "the OOD detector's confidence layer was calibrated on %r, the service detects faces "
                "with %r: that layer is left neutral (refit with `facerec fit-ood` for this detector)",
                layer.detector,
                face_detector,
            )

    def __call__(self, outputs: dict[str, np.ndarray]) -> Sequence[Any]:
        features = [outputs[n] for n in self.layer_outputs or ood_layer_outputs(outputs)]
        if self.use_det_scores:
            return np.asarray(self.detector.score(features, outputs.get("det_score")))
        return np.asarray(self.detector.score(features))


class PipelineError(Exception):
    """An input problem the caller can fix; ``code`` is stable, the message is for humans."""

    code = "pipeline_error"


class DecodeError(PipelineError):
    code = "decode_error"


class NoFaceError(PipelineError):
    code = "no_face"


class TooManyFacesError(PipelineError):
    code = "too_many_faces"

    def __init__(self, found: int, limit: int) -> None:
        super().__init__(f"{found} faces found, more than the limit of {limit} per image")
        self.found = found
        self.limit = limit


@dataclass
class Face:
    box: np.ndarray  # (4,) x1, y1, x2, y2 in pixels of the decoded image
    landmarks: np.ndarray  # (5, 2) x, y: eyes, nose tip, mouth corners (viewer's left first)
    det_score: float
    embedding: np.ndarray  # (D,) float32, unit length
    embedding_norm: float  # the raw embedding's norm (carries quality information for some models)
    quality: float | None = None
    ood: Any = None
    features: dict[str, np.ndarray] | None = None
    crop: np.ndarray | None = None  # the aligned (S, S, 3) uint8 crop, with keep_crops=True

    def to_dict(self) -> dict:
        return {
            "box": [float(v) for v in self.box],
            "landmarks": [[float(x), float(y)] for x, y in self.landmarks],
            "det_score": float(self.det_score),
            "embedding_norm": float(self.embedding_norm),
            "quality": None if self.quality is None else float(self.quality),
        }


@dataclass
class ImageResult:
    faces: list[Face]  # largest first
    faces_found: int
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Located:
    shape: tuple[int, int]
    detections: list  # facerec.data.detect.Detection, largest first, the ones to embed
    crops: np.ndarray  # (k, S, S, 3) uint8
    faces_found: int


def _area(d) -> float:
    return d.width * d.height


def _crop_scale(landmarks: np.ndarray, size: int) -> float:
    """Crop pixels per image pixel of the alignment for these landmarks."""
    from facerec.data.align import estimate_norm

    return float(np.sqrt(abs(np.linalg.det(estimate_norm(landmarks, size)[:, :2]))))


@dataclass
class _Decoded:
    image: np.ndarray  # RGB uint8, possibly a reduced decode
    shape: tuple[int, int]  # (h, w) of the full-resolution image: what boxes refer to
    full: Callable[[], np.ndarray] | None = None  # decodes the full resolution (None: image is it)

    @property
    def scale(self) -> tuple[float, float]:
        """(fx, fy): full-resolution coordinates = coordinates in ``image`` x (fx, fy)."""
        return self.shape[1] / self.image.shape[1], self.shape[0] / self.image.shape[0]


def _decode(data, max_pixels: int | None, max_bytes: int | None, max_side: int | None = None) -> _Decoded:
    """Decode ``data``; a JPEG far larger than ``max_side`` is decoded reduced (1/2, 1/4, 1/8: still
    at least ``max_side`` on its longer side), with a way back to full resolution for the crops."""
    from facerec.data.image_io import (
        DEFAULT_MAX_BYTES,
        DEFAULT_MAX_PIXELS,
        ImageDecodeError,
        inspect_image,
        load_image,
    )
    from facerec.data.image_headers import jpeg_orientation

    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 3 or data.shape[2] != 3:
            raise DecodeError(f"an image array must be RGB uint8 (H, W, 3), got {data.dtype} {data.shape}")
        return _Decoded(data, data.shape[:2])
    if isinstance(data, str):
        # A string is refused rather than read as a path: request data must never name server files.
        raise TypeError("pass image bytes, an RGB array or a pathlib.Path, not a str")
    if not isinstance(data, (bytes, bytearray, memoryview, os.PathLike)):
        raise TypeError(f"cannot decode a {type(data).__name__}")
    limits = {"max_pixels": max_pixels or DEFAULT_MAX_PIXELS, "max_bytes": max_bytes or DEFAULT_MAX_BYTES}
    try:
        if isinstance(data, os.PathLike):
            image = load_image(Path(data), **limits)
            return _Decoded(image, image.shape[:2])
        header = inspect_image(data, limits["max_pixels"])
        side = max(header.width, header.height)
        reduce = 1
        while max_side and header.format == "JPEG" and reduce < 8 and side / (2 * reduce) >= max_side:
            reduce *= 2
        image = load_image(data, reduce=reduce, header=header, **limits)  # read once
    except ImageDecodeError as err:
        raise DecodeError(str(err)) from err
    if reduce == 1:
        return _Decoded(image, image.shape[:2])
    h, w = header.height, header.width
    # libjpeg's scaled decode gives ceil(side / reduce); OpenCV then applies the EXIF orientation,
    # which may turn it by 90 degrees. Which happened is read from the shape when the two
    # outcomes differ, else (a near-square image: ceil(w/r) == ceil(h/r)) from the EXIF tag.
    upright = (-(-h // reduce), -(-w // reduce))
    if upright[0] == upright[1]:
        turned = jpeg_orientation(bytes(data)) >= 5
    else:
        turned = image.shape[:2] != upright
    if turned:
        h, w = w, h

    def full() -> np.ndarray:
        try:
            return load_image(data, header=header, **limits)
        except ImageDecodeError as err:
            raise DecodeError(str(err)) from err

    return _Decoded(image, (h, w), full)


def aligned_crop(image: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """``norm_crop``, anti-aliased: a face over twice the crop's resolution is first shrunk (area
    interpolation, only the part of the image the crop covers) to the crop's scale; a bilinear warp
    straight from a 3000-pixel face to 112 would sample every 27th pixel and alias."""
    import cv2

    from facerec.data.align import estimate_norm, norm_crop

    m = estimate_norm(landmarks, size)
    scale = _crop_scale(landmarks, size)
    if scale >= 0.5:
        return norm_crop(image, landmarks, size)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    back = corners @ cv2.invertAffineTransform(m).T  # the crop's corners in the image
    h, w = image.shape[:2]
    x0, y0 = (max(0, int(np.floor(v)) - 2) for v in back.min(axis=0))
    x1, y1 = min(w, int(np.ceil(back[:, 0].max())) + 2), min(h, int(np.ceil(back[:, 1].max())) + 2)
    if x1 - x0 < 2 or y1 - y0 < 2:  # the crop lies (almost) outside the image: nothing to shrink
        return norm_crop(image, landmarks, size)
    region = image[y0:y1, x0:x1]
    rw, rh = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    small = cv2.resize(region, (rw, rh), interpolation=cv2.INTER_AREA)
    f = np.array([rw / (x1 - x0), rh / (y1 - y0)])
    # Pixel centres: source x lands at (x + 0.5) * f - 0.5 in the resized region.
    return norm_crop(small, (np.asarray(landmarks, np.float64) - [x0, y0] + 0.5) * f - 0.5, size)


class FacePipeline:
    def __init__(
        self,
        backend,
        detector=None,
        batcher=None,
        ood_scorer: OodScorer | None = None,
        quality_fallback: QualityFn | None = None,
        max_faces: int = 10,
        min_face_size: float = 20.0,
        min_det_score: float = 0.0,
        pad_retry: bool = True,
        max_pixels: int | None = None,
        max_bytes: int | None = None,
        detect_max_side: int | None = DETECT_MAX_SIDE,
        keep_crops: bool = False,
        keep_features: bool = False,
        executor: Executor | None = None,
    ) -> None:
        contract = backend.contract
        if contract.alignment != ARCFACE_TEMPLATE_112:
            raise ContractMismatchError(
                f"the model expects alignment {contract.alignment!r}; this pipeline aligns to "
                f"{ARCFACE_TEMPLATE_112!r}"
            )
        if ood_scorer is not None:
            needed = getattr(ood_scorer, "layer_outputs", None)
            missing = [n for n in needed if n not in backend.output_names] if needed else []
            if missing or (not needed and not any(n.startswith("feature_") for n in backend.output_names)):
                raise ValueError(f"the OOD scorer reads outputs {missing or 'feature_*'} the model does not have")
            scorer_contract = getattr(ood_scorer, "contract_id", None)
            if scorer_contract is not None:
                require_same_contract(contract.contract_id, scorer_contract, "the OOD detector")
        if quality_fallback is not None:
            if "quality" in backend.output_names:
                raise ValueError("the model has its own quality output; a quality fallback is for models without")
            fallback_contract = getattr(quality_fallback, "contract_id", None)
            if fallback_contract is not None:
                require_same_contract(contract.contract_id, fallback_contract, "the quality measure")
        self.backend = backend
        self.contract = contract
        self.batcher = batcher
        self.ood_scorer = ood_scorer
        self.quality_fallback = quality_fallback
        self.max_faces = max_faces
        self.min_face_size = min_face_size
        self.min_det_score = min_det_score
        self.pad_retry = pad_retry
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.detect_max_side = detect_max_side
        self.keep_crops = keep_crops
        self.keep_features = keep_features
        self.executor = executor
        self._detector = detector

    @property
    def detector(self):
        if self._detector is None:
            from facerec.data.detect import create_detector

            # The onnxruntime MTCNN: ~10x faster than its torch twin on a CPU for photo-sized images.
            self._detector = create_detector(DEFAULT_FACE_DETECTOR, backend="onnx", device="cpu")
        return self._detector

    # ------------------------------------------------------------------ stages
    def locate(self, data, all_faces: bool = False) -> _Located:
        """Decode, detect and align; raises DecodeError / NoFaceError / TooManyFacesError."""
        from facerec.data.detect import detect_faces, map_detection

        decoded = _decode(data, self.max_pixels, self.max_bytes, self.detect_max_side)
        fx, fy = decoded.scale
        found = detect_faces(
            self.detector, decoded.image, "all", self.min_face_size / max(fx, fy), self.min_det_score,
            pad_retry=self.pad_retry, max_side=self.detect_max_side,
        )
        if not found:
            raise NoFaceError("no face found in the image")
        if len(found) > self.max_faces:
            raise TooManyFacesError(len(found), self.max_faces)
        found = sorted(found, key=_area, reverse=True)
        chosen = [map_detection(d, fx, fy) for d in (found if all_faces else found[:1])]
        size = self.contract.input_size
        crops, full = [], None
        for d in chosen:
            # From the reduced decode when it holds the face at no less than the crop's
            # resolution; else from the full-resolution image (decoded once, on demand).
            if decoded.full is None or _crop_scale(d.landmarks, size) * max(fx, fy) <= 1.0:
                on_reduced = (d.landmarks + 0.5) / np.float32([fx, fy]) - 0.5
                crops.append(aligned_crop(decoded.image, on_reduced, size))
            else:
                full = decoded.full() if full is None else full
                crops.append(aligned_crop(full, d.landmarks, size))
        return _Located(decoded.shape, chosen, np.stack(crops), len(found))

    def _assemble(self, located: _Located, outputs: dict[str, np.ndarray]) -> ImageResult:
        raw = outputs["embedding"].astype(np.float32)
        norms = np.linalg.norm(raw, axis=1)
        unit = raw / np.maximum(norms, 1e-12)[:, None]
        scores: Sequence[Any] = [None] * len(raw)
        features = {n: v for n, v in outputs.items() if n.startswith("feature_")}
        det_scores = np.array([d.score for d in located.detections], np.float64)
        if self.ood_scorer is not None:
            scores = self.ood_scorer({**features, "embedding": raw, "det_score": det_scores})
            if len(scores) != len(raw):
                raise RuntimeError(f"the OOD scorer returned {len(scores)} scores for {len(raw)} faces")
        quality = outputs.get("quality")
        if quality is None and self.quality_fallback is not None:
            quality = self.quality_fallback(raw, det_scores)
        faces = [
            Face(
                box=np.asarray(d.box, np.float32),
                landmarks=np.asarray(d.landmarks, np.float32),
                det_score=float(d.score),
                embedding=unit[i],
                embedding_norm=float(norms[i]),
                quality=None if quality is None else float(quality[i]),
                ood=scores[i],
                features={n: v[i] for n, v in features.items()} if self.keep_features else None,
                crop=located.crops[i] if self.keep_crops else None,
            )
            for i, d in enumerate(located.detections)
        ]
        h, w = located.shape
        return ImageResult(faces, located.faces_found, int(w), int(h))

    # ------------------------------------------------------------------ entry points
    def process(self, data, all_faces: bool = False) -> ImageResult:
        """Synchronous: the backend is called directly (no batcher)."""
        located = self.locate(data, all_faces)
        return self._assemble(located, self.backend.run(located.crops))

    async def process_async(
        self, data, all_faces: bool = False, executor: Executor | None = None
    ) -> ImageResult:
        """Decode/detect/align in a thread (of ``executor``, default the pipeline's), then the model
        through the shared batcher (or, without one, the backend in a thread). Overloaded from the
        batcher propagates to the caller."""
        loop = asyncio.get_running_loop()
        located = await loop.run_in_executor(executor or self.executor, self.locate, data, all_faces)
        if self.batcher is not None:
            outputs = await self.batcher.run(located.crops)
        else:
            outputs = await loop.run_in_executor(self.executor, self.backend.run, located.crops)
        return self._assemble(located, outputs)
