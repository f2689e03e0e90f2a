"""From the face pipeline's result to enrollment evidence, for the service and for offline runs.

:func:`evidence_of` turns one :class:`~facerec.runtime.ImageResult` (made with ``all_faces=True``,
so the other faces' boxes are known) into :class:`~facerec.gallery.policy.FaceEvidence`; the
service's routes and the offline tools (``facerec calibrate-openset``, ``benchmarks/openset_eval.py``)
use the same function, so the gate judged offline is the gate that runs.

:class:`OfflineModel` loads a model folder the way the service does (fp32 ONNX on the CPU, its
quality percentile mapping, its OOD detector) and :func:`measure` runs it over image files, keeping
per image what the gate and the search need, in arrays that can be cached as ``.npz``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facerec.gallery.policy import FaceEvidence

MAX_OTHER_FACES = 9


def evidence_of(
    result, quality_score: Callable[[float], float | None] | None = None, ood_threshold: float | None = None
) -> FaceEvidence:
    """Evidence of the largest face of ``result``; ``quality_score`` maps raw quality to 0-100."""
    face = result.faces[0]
    ood_score = None if face.ood is None else float(face.ood)
    flagged = None if ood_score is None or ood_threshold is None else bool(ood_score < ood_threshold)
    return FaceEvidence(
        embedding=np.asarray(face.embedding, np.float32),
        det_score=float(face.det_score),
        box=tuple(float(v) for v in face.box),
        landmarks=np.asarray(face.landmarks, np.float64),
        other_boxes=[tuple(float(v) for v in f.box) for f in result.faces[1:]],
        quality_score=None if face.quality is None or quality_score is None else quality_score(face.quality),
        quality_raw=face.quality,
        ood_score=ood_score,
        ood_flagged=flagged,
        faces_found=int(result.faces_found),
    )


class OfflineModel:
    """A model folder loaded as the service loads it, on the CPU."""

    def __init__(self, model_dir: str | Path, ood: bool = True, threads: int | None = 1) -> None:
        from facerec.bundle import BundleError, ModelBundle
        from facerec.runtime import FacePipeline, FeatureListScorer, OnnxRuntimeBackend

        self.bundle = ModelBundle(model_dir)
        try:
            graph = self.bundle.graph("fp32")
        except BundleError as err:
            raise SystemExit(str(err)) from None
        self.folder = self.bundle.folder
        self.backend = OnnxRuntimeBackend(graph, device="cpu", threads=threads)
        self.contract = self.backend.contract
        self.calibration = self.bundle.calibration()
        self.detector = None
        scorer = None
        self.ood_threshold = None
        if ood and self.bundle.ood_path.exists():
            from facerec import ood as ood_mod

            det = ood_mod.load(self.bundle.ood_path, self.contract)
            scorer = FeatureListScorer(det)
            self.ood_threshold = det.threshold
        from facerec.data.detect import create_detector

        detector = create_detector("mtcnn", backend="onnx", device="cpu", threads=threads or 1)
        self.pipeline = FacePipeline(self.backend, detector=detector, ood_scorer=scorer, max_faces=10)

    def quality_score(self, raw: float) -> float | None:
        """The service's 0-100 score: percentile of ``raw`` among the calibration faces."""
        return self.calibration.quality_score(raw)


@dataclass
class Measured:
    """Per image: whether a face was found, and the evidence arrays (NaN where none)."""

    keys: list[str]
    found: np.ndarray  # (N,) bool
    error: np.ndarray  # (N,) str: "" | no_face | too_many_faces | decode_error
    embedding: np.ndarray  # (N, D) float32
    det_score: np.ndarray
    box: np.ndarray  # (N, 4)
    landmarks: np.ndarray  # (N, 5, 2)
    other_boxes: np.ndarray  # (N, MAX_OTHER_FACES, 4), NaN padded
    faces_found: np.ndarray  # (N,) int
    quality_raw: np.ndarray
    ood_score: np.ndarray

    def evidence(self, i: int, quality_score=None, ood_threshold: float | None = None) -> FaceEvidence:
        others = [tuple(b) for b in self.other_boxes[i] if np.all(np.isfinite(b))]
        q = None if not np.isfinite(self.quality_raw[i]) else float(self.quality_raw[i])
        o = None if not np.isfinite(self.ood_score[i]) else float(self.ood_score[i])
        return FaceEvidence(
            embedding=self.embedding[i],
            det_score=float(self.det_score[i]),
            box=tuple(self.box[i]),
            landmarks=self.landmarks[i],
            other_boxes=others,
            quality_score=None if q is None or quality_score is None else quality_score(q),
            quality_raw=q,
            ood_score=o,
            ood_flagged=None if o is None or ood_threshold is None else bool(o < ood_threshold),
            faces_found=int(self.faces_found[i]),
        )

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            keys=np.asarray(self.keys),
            **{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "keys"},
        )

    @classmethod
    def load(cls, path: str | Path) -> Measured:
        with np.load(path) as z:
            return cls(
                keys=[str(k) for k in z["keys"]], **{k: z[k] for k in cls.__dataclass_fields__ if k != "keys"}
            )


def measure(
    model: OfflineModel, paths: Sequence[Path], keys: Sequence[str], progress: bool = True
) -> Measured:
    from facerec.runtime import PipelineError

    n, d = len(paths), model.contract.embedding_size
    m = Measured(
        list(keys),
        np.zeros(n, bool),
        np.full(n, "", dtype=object),
        np.full((n, d), np.nan, np.float32),
        np.full(n, np.nan),
        np.full((n, 4), np.nan),
        np.full((n, 5, 2), np.nan),
        np.full((n, MAX_OTHER_FACES, 4), np.nan),
        np.zeros(n, np.int64),
        np.full(n, np.nan),
        np.full(n, np.nan),
    )
    for i, path in enumerate(tqdm(paths, desc="pipeline", unit="img", disable=not progress)):
        try:
            result = model.pipeline.process(Path(path), all_faces=True)
        except PipelineError as exc:
            m.error[i] = exc.code
            continue
        ev = evidence_of(result)
        m.found[i] = True
        m.embedding[i], m.det_score[i], m.box[i], m.landmarks[i] = (
            ev.embedding,
            ev.det_score,
            ev.box,
            ev.landmarks,
        )
        for j, b in enumerate(ev.other_boxes[:MAX_OTHER_FACES]):
            m.other_boxes[i, j] = b
        m.faces_found[i] = ev.faces_found
        m.quality_raw[i] = np.nan if ev.quality_raw is None else ev.quality_raw
        m.ood_score[i] = np.nan if ev.ood_score is None else ev.ood_score
    m.error = m.error.astype(str)
    return m
