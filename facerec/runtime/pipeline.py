"""The face pipeline: bytes -> safe decode -> detect -> align -> (micro-)batch -> model -> per-face results.

Every way an input can be the caller's fault ends in a :class:`PipelineError` subclass with a stable
``code`` (``decode_error``, ``no_face``, ``too_many_faces``, ``face_index_out_of_range``,
``not_aligned``; :mod:`facerec.runtime.errors`), which the service maps to a 4xx; anything else is a
server error. Faces are ordered largest first; more faces than ``max_faces`` is refused (a crowd
photo is not a verification input, and each face costs a model call). One image gives the largest
face, the ``index``-th largest, or all of them; an image that is already the model's aligned crop
(``aligned``) skips detection.

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
the crop (``aligned_crop``; decoding and cropping live in :mod:`facerec.runtime.imaging`).

``process`` runs synchronously on the backend (offline use, benchmarks); ``process_async`` decodes and
detects in a thread pool and sends the crops through a :class:`MicroBatcher` shared by all requests;
``embed_async`` sends the faces of several located images as one submission (a batch request).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facerec.bundle import ood_layer_outputs
from facerec.contract import ContractMismatchError, require_same_contract
from facerec.runtime.errors import (  # noqa: F401 - re-exported: the pipeline's errors
    DecodeError,
    FaceIndexError,
    NoFaceError,
    NotAlignedError,
    PipelineError,
    TooManyFacesError,
)
from facerec.runtime.imaging import _crop_scale, _decode, aligned_crop  # noqa: F401 - re-exported

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
        from facerec.data.align import ALIGNMENTS, alignment_template

        if contract.alignment not in ALIGNMENTS:
            raise ContractMismatchError(
                f"the model expects alignment {contract.alignment!r}; this pipeline aligns to "
                f"{', '.join(sorted(ALIGNMENTS))}"
            )
        try:
            alignment_template(contract.alignment, contract.input_size)
        except ValueError as err:
            raise ContractMismatchError(f"the model's input size does not fit its alignment: {err}") from None
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
    def locate(self, data, all_faces: bool = False, index: int | None = None, aligned: bool = False) -> _Located:
        """Decode, detect and align; raises DecodeError / NoFaceError / TooManyFacesError.

        One face is kept: the largest, or the ``index``-th largest (FaceIndexError when there are
        not that many); ``all_faces`` keeps every one. ``aligned``: the image is already the
        model's crop (``locate_aligned``)."""
        from facerec.data.detect import detect_faces, map_detection

        if aligned:
            return self.locate_aligned(data)
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
        if index is not None and not 0 <= index < len(found):
            raise FaceIndexError(index, len(found))
        chosen = [map_detection(d, fx, fy) for d in (found if all_faces else found[index or 0:][:1])]
        size, alignment = self.contract.input_size, self.contract.alignment
        crops, full = [], None
        for d in chosen:
            # From the reduced decode when it holds the face at no less than the crop's
            # resolution; else from the full-resolution image (decoded once, on demand).
            if decoded.full is None or _crop_scale(d.landmarks, size, alignment) * max(fx, fy) <= 1.0:
                on_reduced = (d.landmarks + 0.5) / np.float32([fx, fy]) - 0.5
                crops.append(aligned_crop(decoded.image, on_reduced, size, alignment))
            else:
                full = decoded.full() if full is None else full
                crops.append(aligned_crop(full, d.landmarks, size, alignment))
        return _Located(decoded.shape, chosen, np.stack(crops), len(found))

    def locate_aligned(self, data) -> _Located:
        """An image that is already the model's crop (S x S on the template of the model's
        alignment): detection is skipped; its face is the whole image, with the template's
        landmarks and no detection score (NaN: the OOD detector's confidence layer treats it as
        not available)."""
        from facerec.data.align import alignment_template
        from facerec.data.detection import Detection

        decoded = _decode(data, self.max_pixels, self.max_bytes)
        size = self.contract.input_size
        h, w = decoded.image.shape[:2]
        if (h, w) != (size, size):
            raise NotAlignedError(
                f"an aligned input must be a {size}x{size} crop on the {self.contract.alignment} template, "
                f"got {w}x{h}; "
                "send the photo without `aligned` to have the face found and aligned")
        face = Detection(box=np.array([0, 0, size, size], np.float32), score=float("nan"),
                         landmarks=alignment_template(self.contract.alignment, size).astype(np.float32))
        return _Located((h, w), [face], decoded.image[None].copy(), 1)

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
                # None where the measure has no value: the detector score of an aligned input (NaN)
                quality=None if quality is None or not np.isfinite(quality[i]) else float(quality[i]),
                ood=scores[i],
                features={n: v[i] for n, v in features.items()} if self.keep_features else None,
                crop=located.crops[i] if self.keep_crops else None,
            )
            for i, d in enumerate(located.detections)
        ]
        h, w = located.shape
        return ImageResult(faces, located.faces_found, int(w), int(h))

    # ------------------------------------------------------------------ entry points
    def process(self, data, all_faces: bool = False, index: int | None = None, aligned: bool = False) -> ImageResult:
        """Synchronous: the backend is called directly (no batcher)."""
        located = self.locate(data, all_faces, index, aligned)
        return self._assemble(located, self.backend.run(located.crops))

    async def process_async(
        self, data, all_faces: bool = False, executor: Executor | None = None, index: int | None = None,
        aligned: bool = False,
    ) -> ImageResult:
        """Decode/detect/align in a thread (of ``executor``, default the pipeline's), then the model
        through the shared batcher (or, without one, the backend in a thread). Overloaded from the
        batcher propagates to the caller."""
        located = await self.locate_async(data, all_faces, executor, index, aligned)
        return (await self.embed_async([located]))[0]

    async def locate_async(self, data, all_faces: bool = False, executor: Executor | None = None,
                           index: int | None = None, aligned: bool = False) -> _Located:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor or self.executor, self.locate, data, all_faces, index, aligned)

    async def embed_async(self, located: Sequence[_Located]) -> list[ImageResult]:
        """The faces of several located images through the model in one submission (the batcher runs
        them together, up to its batch size), each image's results assembled on its own."""
        crops = np.concatenate([item.crops for item in located])
        if self.batcher is not None:
            outputs = await self.batcher.run(crops)
        else:
            outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self.backend.run, crops)
        results, start = [], 0
        for item in located:
            stop = start + len(item.crops)
            results.append(self._assemble(item, {n: v[start:stop] for n, v in outputs.items()}))
            start = stop
        return results
