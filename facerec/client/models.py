"""The service's answers as typed results: dataclasses that mirror the service's response schemas
(``service/schemas.py``, ``service/routes/gallery_schemas.py``) field for field.

They are written out here rather than imported so that the client needs only httpx: the service's
pydantic models live next to FastAPI and the inference engine. ``tests/test_client.py`` checks every
class against the running service's OpenAPI schema, so the two cannot drift apart unnoticed.
Unknown fields in an answer (a newer service) are ignored; a missing one is an error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


# ============================================================================ faces
@dataclass(frozen=True)
class FaceBox:
    box: list[float]  # x1, y1, x2, y2 in pixels of the decoded, EXIF-rotated image
    landmarks: list[list[float]]  # 5 points (x, y): eyes, nose tip, mouth corners
    score: float | None  # detection score, 0-1; None for an `aligned` input (no detection)


@dataclass(frozen=True)
class Quality:
    score: float | None  # 0-100 percentile among the calibration faces; None: no mapping
    raw: float
    # quality_head (the model's quality token) or, for a model without one, the fallback chosen by
    # `facerec fit-quality`: embedding_norm | crfiqa_head | detector_score
    method: str = "quality_head"


@dataclass(frozen=True)
class Ood:
    """The out-of-distribution check. Not presentation-attack (liveness) detection."""

    score: float  # higher = more like a genuine face photo
    threshold: float | None
    flagged: bool | None  # None: the detector has no calibrated threshold


@dataclass(frozen=True)
class FaceReport:
    face: FaceBox
    quality: Quality | None
    ood: Ood | None


@dataclass(frozen=True)
class ImageReport(FaceReport):
    faces_found: int  # faces detected in the photo; the reported one is the largest


@dataclass(frozen=True)
class VerifiedImage(ImageReport):
    """One side of a verification. ``face_index`` / ``face_rule`` are None from a service that
    predates face choice (issue 19)."""

    face_index: int | None = None  # the compared face's index in `detect`'s order (0 = largest)
    face_rule: Literal["largest", "index", "aligned"] | None = None  # how it was chosen


@dataclass(frozen=True)
class DetectedFace(FaceReport):
    embedding: list[float] | None = None  # unit length; only when asked for (`embeddings=True`)


@dataclass(frozen=True)
class DetectResult:
    faces_found: int
    faces: list[DetectedFace]  # largest first; a face's position is its index for verify's face_a / face_b
    contract_id: str | None = None  # of the embeddings (None from a service that predates them)


# ============================================================================ verify and embed
@dataclass(frozen=True)
class OperatingPoint:
    far: float | None  # false accept rate the threshold was calibrated for
    calibrated_on: str | None
    source: Literal["model", "setting", "request"]


@dataclass(frozen=True)
class VerifyResult:
    similarity: float  # cosine, -1..1
    threshold: float
    match: bool
    decision: Literal["match", "no_match"]
    operating_point: OperatingPoint
    contract_id: str
    image_a: VerifiedImage | None  # None when side a was given as an embedding
    image_b: VerifiedImage | None


@dataclass(frozen=True)
class EmbedResult(ImageReport):
    embedding: list[float]  # unit length: the cosine of two embeddings is their dot product
    embedding_norm: float
    contract_id: str  # embeddings are comparable only when their contract ids are equal


@dataclass(frozen=True)
class ItemError:
    """One input of a batch that could not be used (the others are unaffected)."""

    code: str  # as the single-image routes: decode_error, no_face, not_aligned, ...
    message: str
    details: Any = None


@dataclass(frozen=True)
class EmbedBatchResult:
    results: list[EmbedResult | ItemError]  # one per input, in order
    contract_id: str


# ============================================================================ galleries
@dataclass(frozen=True)
class GalleryOperatingPoint:
    threshold: float
    source: Literal["model", "gallery", "request"]
    fpir: float | None  # false-positive identification rate it was calibrated for
    calibrated_on: str | None
    gallery_size: int
    calibrated_gallery_size: int | None
    beyond_calibration: bool
    calibration_method: Literal["searches", "pairs"] | None


@dataclass(frozen=True)
class GalleryIndexRecall:
    recall_at_1: float | None  # share of measuring searches whose best person is exact search's best
    queries: int
    samples: int  # samples in the index when it was measured
    how: str
    searching: str | None = None  # graph | exact (the graph measured slower than comparing every sample)
    graph_ms: float | None = None  # median time of one graph search at ef_search
    exact_ms: float | None = None  # median time of one search comparing every sample
    ef_search: int | None = None  # the ef_search it was measured at
    target: float | None = None  # the recall the index chose its ef_search for (None: a fixed ef_search)
    by_ef_search: dict[str, float] | None = None  # recall@1 at each ef_search tried


@dataclass(frozen=True)
class GalleryIndex:
    """How searches of a gallery run (docs/gallery.md, "Search at scale")."""

    kind: str  # exact | hnsw (in-process FAISS, re-ranked exactly) | pgvector_hnsw
    loaded: bool | None = None
    building: bool | None = None
    samples: int | None = None
    m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    target_recall: float | None = None  # recall@1 the index tunes its ef_search to
    pca_dims: int | None = None  # principal components the graph compares (None: all)
    storage: str | None = None  # sq8 | fp16 | flat: what the graph compares
    recall: GalleryIndexRecall | None = None


@dataclass(frozen=True)
class Gallery:
    id: str
    name: str
    contract_id: str
    embedding_size: int
    model_name: str
    created_at: str
    persons: int
    samples: int
    policy: dict[str, Any]  # the enrollment gate's thresholds
    target_fpir: float
    match_threshold: float | None
    usable: bool  # False when the service runs another model than the gallery's
    operating_point: GalleryOperatingPoint | None
    index: GalleryIndex | None = None  # in `GET` of one gallery; None in the other answers


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    metadata: dict[str, Any]
    created_at: str
    samples: int
    metadata_error: str | None = None


@dataclass(frozen=True)
class Reason:
    code: str  # the gate's reason code: no_face, multiple_faces, face_too_small, low_quality, ...
    message: str


@dataclass(frozen=True)
class ImageOutcome:
    index: int
    status: Literal["enrolled", "refused", "error"]
    reasons: list[Reason] = field(default_factory=list)
    sample_id: str | None = None
    measurements: dict[str, Any] | None = None
    duplicate_of: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {code, message} when the image itself is unusable


@dataclass(frozen=True)
class EnrollResult:
    person: Person | None
    created: bool
    enrolled: int
    refused: int
    results: list[ImageOutcome]


@dataclass(frozen=True)
class Candidate:
    person_id: str
    name: str
    similarity: float
    sample_id: str


@dataclass(frozen=True)
class SearchResult:
    decision: Literal["match", "unknown"]
    person: Person | None  # the matched person (decision "match")
    similarity: float | None  # the best candidate's; None: empty gallery
    threshold: float
    operating_point: GalleryOperatingPoint
    candidates: list[Candidate]  # best first
    contract_id: str
    image: ImageReport | None  # None when the search was by embedding


# ============================================================================ parsing
def parse(cls: type[T], data: Any) -> T:
    """``data`` (decoded JSON) as an instance of the dataclass ``cls``, nested types included."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _convert(hints[f.name], data[f.name], f"{cls.__name__}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}: the answer has no {f.name!r}")
    return cls(**values)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(options) == 1:
            return _convert(options[0], value, where)
        # EmbedResult | ItemError: the one whose required fields the object has ("error" marks a failure)
        for option in options:
            if dataclasses.is_dataclass(option) and _fits(option, value):
                return _convert(option, value, where)
        raise TypeError(f"{where}: matches none of {options}")
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_convert(item, v, where) for v in value]
    if dataclasses.is_dataclass(tp):
        if tp is ItemError and isinstance(value, dict) and "error" in value:
            value = value["error"]  # a batch entry that failed: {"error": {"code", "message"}}
        return parse(tp, value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _fits(cls: type, value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    if cls is ItemError:
        return "error" in value
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return required <= set(value)
