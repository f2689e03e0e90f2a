"""The enrollment gate: which photos are good enough to stand for a person in a gallery.

A gallery holds a :class:`EnrollmentPolicy` (stored with it, changeable per gallery). Every image
offered for enrollment is measured (:class:`FaceEvidence`: detector score, face size, head pose,
other faces, quality percentile, OOD flag) and :func:`assess` returns the reasons it is refused,
each with a stable :class:`Reason` code and a message for people. The duplicate check
(``duplicate_of_other_person``) needs the gallery's contents and threshold, so it is made by
:class:`facerec.gallery.service.GalleryService`; ``no_face`` comes from the detector itself.

A low detector score is reported as ``low_quality`` (the message says which measure failed): the
codes are the issue's fixed list, and both mean "this photo is too poor to stand for the person".

A check whose measurement is missing (a model without a quality head or without an OOD detector)
is skipped, and the evidence says so (``None``): the gate never invents a value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from facerec.data.pose import estimate_pose


class Reason(str, Enum):
    """Stable reason codes of a refused sample (part of the API: never rename one)."""

    NO_FACE = "no_face"
    MULTIPLE_FACES = "multiple_faces"
    FACE_TOO_SMALL = "face_too_small"
    LOW_QUALITY = "low_quality"
    EXTREME_POSE = "extreme_pose"
    OOD_FLAGGED = "ood_flagged"
    DUPLICATE_OF_OTHER_PERSON = "duplicate_of_other_person"


def _integral(value):
    # JSON Schema counts 19.0 as an integer; strict mode would not. Booleans and strings stay refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An integer as JSON Schema defines it (19 or 19.0), in a strict model.
JsonInt = Annotated[int, BeforeValidator(_integral)]


class EnrollmentPolicy(BaseModel):
    """Per-gallery thresholds of the enrollment gate; ``None`` switches a check off."""

    # strict: a JSON `true` is not a threshold of 1.0 (the API schema says number)
    model_config = ConfigDict(extra="forbid", strict=True)

    min_quality: float | None = Field(
        10.0,
        ge=0.0,
        le=100.0,
        description="lowest quality score (0-100: percentile among the validation faces) accepted",
    )
    min_detection_score: float | None = Field(0.9, ge=0.0, le=1.0, description="lowest detector score")
    min_face_size: float | None = Field(
        40.0, ge=0.0, le=10_000.0, description="shortest side of the face box, in pixels of the photo"
    )
    max_yaw: float | None = Field(45.0, ge=0.0, le=90.0, description="largest |yaw|, degrees")
    max_pitch: float | None = Field(40.0, ge=0.0, le=90.0, description="largest |pitch|, degrees")
    max_faces: JsonInt = Field(
        1,
        ge=1,
        le=100,
        description="most faces of comparable size in one photo (more: whose face is meant is unclear)",
    )
    other_face_ratio: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="a further face counts when its box side is at least this fraction of the largest's",
    )
    reject_ood: bool = Field(True, description="refuse photos the OOD detector flags")
    reject_duplicates: bool = Field(
        True, description="refuse a photo that matches another enrolled person above the match threshold"
    )


@dataclass
class FaceEvidence:
    """What was measured on one photo offered for enrollment (the largest face is the subject)."""

    embedding: np.ndarray = field(repr=False)  # (D,) unit length; never printed
    det_score: float
    box: tuple[float, float, float, float]
    landmarks: np.ndarray = field(repr=False)  # (5, 2)
    other_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    quality_score: float | None = None  # 0-100 percentile; None: the model has no mapping
    quality_raw: float | None = None
    ood_score: float | None = None
    ood_flagged: bool | None = None  # None: no detector, or one without a threshold
    faces_found: int = 1

    @property
    def face_size(self) -> float:
        x1, y1, x2, y2 = self.box
        return float(min(x2 - x1, y2 - y1))

    def pose(self) -> tuple[float, float]:
        p = estimate_pose(self.landmarks)
        return p.yaw, p.pitch

    def measurements(self) -> dict:
        yaw, pitch = self.pose()
        return {
            "det_score": float(self.det_score),
            "face_size": self.face_size,
            "faces_found": self.faces_found,
            "yaw": round(yaw, 2),
            "pitch": round(pitch, 2),
            "quality_score": None if self.quality_score is None else float(self.quality_score),
            "ood_flagged": self.ood_flagged,
        }


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    message: str

    def to_dict(self) -> dict:
        return {"code": self.reason.value, "message": self.message}


def comparable_faces(evidence: FaceEvidence, ratio: float) -> int:
    """Faces whose box side is at least ``ratio`` times the largest's (the largest included)."""
    side = evidence.face_size
    others = sum(1 for b in evidence.other_boxes if min(b[2] - b[0], b[3] - b[1]) >= ratio * side)
    return 1 + others


def assess(policy: EnrollmentPolicy, evidence: FaceEvidence) -> list[Refusal]:
    """Every reason this photo is refused under ``policy`` (empty: accepted), in a fixed order."""
    out: list[Refusal] = []
    n = comparable_faces(evidence, policy.other_face_ratio)
    if n > policy.max_faces:
        out.append(
            Refusal(
                Reason.MULTIPLE_FACES,
                f"{n} faces of comparable size in the photo (at most {policy.max_faces}): "
                "send a photo of the person alone",
            )
        )
    if policy.min_face_size is not None and evidence.face_size < policy.min_face_size:
        out.append(
            Refusal(
                Reason.FACE_TOO_SMALL,
                f"the face is {evidence.face_size:.0f} px (shorter side of "
                f"its box); this gallery needs at least {policy.min_face_size:g} px",
            )
        )
    if policy.min_detection_score is not None and evidence.det_score < policy.min_detection_score:
        out.append(
            Refusal(
                Reason.LOW_QUALITY,
                f"detector score {evidence.det_score:.3f} is below "
                f"{policy.min_detection_score:g}: the face is unclear or partly hidden",
            )
        )
    yaw, pitch = evidence.pose()
    if (policy.max_yaw is not None and abs(yaw) > policy.max_yaw) or (
        policy.max_pitch is not None and abs(pitch) > policy.max_pitch
    ):
        limits = ", ".join(
            f"{name} {v:g}"
            for name, v in (("yaw", policy.max_yaw), ("pitch", policy.max_pitch))
            if v is not None
        )
        out.append(
            Refusal(
                Reason.EXTREME_POSE,
                f"head turned too far (yaw {yaw:.0f}°, pitch {pitch:.0f}°; "
                f"limits {limits}): send a frontal photo",
            )
        )
    if (
        policy.min_quality is not None
        and evidence.quality_score is not None
        and evidence.quality_score < policy.min_quality
    ):
        out.append(
            Refusal(
                Reason.LOW_QUALITY,
                f"quality score {evidence.quality_score:.1f} is below this "
                f"gallery's minimum of {policy.min_quality:g} (blur, light, occlusion)",
            )
        )
    if policy.reject_ood and evidence.ood_flagged:
        out.append(
            Refusal(
                Reason.OOD_FLAGGED,
                "the image does not look like a genuine face photo to the "
                "out-of-distribution detector (drawing, screen, mask, manipulated image?)",
            )
        )
    return out
