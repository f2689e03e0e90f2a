"""Request and response models (the names are the client contract of issue 6; keep them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.inputs import B64_PATTERN

# ----------------------------------------------------------------------------- requests (JSON form)
_B64 = "the image file (JPEG, PNG, GIF, BMP, WebP, TIFF), base64 encoded; a data: URI prefix is accepted"


class _Strict(BaseModel):
    # Unknown fields are an error: a misspelt field name must not be silently ignored. Types are
    # strict: JSON `true` is not a threshold, "0.5" is not a number (the schema says number).
    model_config = ConfigDict(extra="forbid", strict=True)


# minLength in the schema only: an empty string gets the same `empty_image` answer as an empty file.
B64Image = Annotated[str, Field(description=_B64, json_schema_extra={"minLength": 1, "pattern": B64_PATTERN})]


class VerifyJSON(_Strict):
    image_a: B64Image
    image_b: B64Image
    threshold: float | None = Field(None, ge=-1.0, le=1.0,
                                    description="cosine threshold for this request (default: the model's)")


class ImageJSON(_Strict):
    image: B64Image


# ----------------------------------------------------------------------------- responses
class FaceBox(BaseModel):
    box: list[float] = Field(..., description="x1, y1, x2, y2 in pixels of the decoded, EXIF-rotated image")
    landmarks: list[list[float]] = Field(
        ..., description="5 points (x, y): eyes, nose tip, mouth corners, the viewer's left first")
    score: float = Field(..., description="face detection score, 0-1")


class Quality(BaseModel):
    score: float | None = Field(
        ..., description="0-100: percentile of `raw` among the calibration faces (validation split); "
        "null when the model carries no calibration mapping")
    raw: float = Field(..., description="the raw quality measure named by `method`")
    method: Literal["quality_head", "embedding_norm", "crfiqa_head", "detector_score"] = Field(
        ..., description="where the quality comes from: the model's own quality output (`quality_head`), "
        "or for a model without one the measure `facerec fit-quality` chose on validation by EDC: the raw "
        "embedding's norm, a CR-FIQA-style head on the embedding, or the face detector's confidence")


class Ood(BaseModel):
    score: float = Field(..., description="Mahalanobis detector's combined score; higher = more like a "
                         "genuine face photo")
    threshold: float | None = Field(..., description="scores below it are flagged")
    flagged: bool | None = Field(..., description="out-of-distribution or adversarial suspect "
                                 "(null when the detector has no calibrated threshold)")


class FaceReport(BaseModel):
    face: FaceBox
    quality: Quality | None = Field(..., description="null for a model without a quality head whose "
                                    "folder has no quality measure (`facerec fit-quality`)")
    ood: Ood | None = Field(..., description="null when the service runs without an OOD detector")


class ImageReport(FaceReport):
    faces_found: int = Field(..., description="faces detected; the largest one is reported")


class OperatingPoint(BaseModel):
    far: float | None = Field(..., description="false accept rate the threshold was calibrated for")
    calibrated_on: str | None = Field(..., description="data the threshold was calibrated on")
    source: Literal["model", "setting", "request"] = Field(
        ..., description="where the threshold came from: the model's metadata, FACEREC_VERIFY_THRESHOLD "
        "or this request")


class VerifyResponse(BaseModel):
    similarity: float = Field(..., description="cosine similarity of the two faces' embeddings, -1..1")
    threshold: float
    match: bool = Field(..., description="similarity >= threshold")
    decision: Literal["match", "no_match"]
    operating_point: OperatingPoint
    contract_id: str
    image_a: ImageReport
    image_b: ImageReport


class EmbedResponse(ImageReport):
    embedding: list[float] = Field(..., description="L2-normalised embedding of the largest face")
    embedding_norm: float = Field(..., description="norm of the raw embedding before normalisation")
    contract_id: str = Field(..., description="embedding contract id: only embeddings with equal ids "
                             "are comparable")


class DetectResponse(BaseModel):
    faces_found: int
    faces: list[FaceReport] = Field(..., description="every face (up to the limit), largest first")


class ErrorBody(BaseModel):
    code: str
    message: str
    details: object | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str


class Liveness(BaseModel):
    status: Literal["alive"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, bool]
    detail: str | None = None


class ModelsResponse(BaseModel):
    model: dict = Field(..., description="backend, device, provider(s), precision, contract, versions")
    contract: dict
    contract_id: str
    device: dict = Field(..., description="FACEREC_DEVICE as requested and the device in use")
    providers: list[str]
    verification: dict
    quality: dict = Field(..., description="`method` (see Quality.method; null: no quality), `head` (the "
                          "model has a quality output), the percentile mapping, and for a fitted measure how "
                          "it was chosen")
    ood: dict | None = Field(..., description="the OOD detector (`facerec fit-ood`): variant, layers and the model "
                             "outputs they read (`layer_outputs`: feature_k, or the embedding of an imported "
                             "model), threshold; null without one")
    detector: dict
    limits: dict
