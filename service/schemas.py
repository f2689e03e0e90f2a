"""Request and response models (the names are the client contract of issue 6; keep them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.inputs import B64_PATTERN

# ----------------------------------------------------------------------------- requests (JSON form)
_B64 = "the image file (JPEG, PNG, GIF, BMP, WebP, TIFF), base64 encoded; a data: URI prefix is accepted"


class _Strict(BaseModel):
    # Unknown fields are an error: a misspelt field name must not be silently ignored. Types are
    # strict: JSON `true` is not a threshold, "0.5" is not a number (the schema says number).
    model_config = ConfigDict(extra="forbid", strict=True)


# minLength in the schema only: an empty string gets the same `empty_image` answer as an empty file.
B64Image = Annotated[str, Field(description=_B64, json_schema_extra={"minLength": 1, "pattern": B64_PATTERN})]


ALIGNED = ("the image is already a crop of the model's input size (112x112 for ArcFace models) on the "
           "template of the model's alignment (ArcFace 5-point, or the one /v1/models names as "
           "contract.alignment), as the service cuts them: detection is skipped and the whole image is "
           "the face; an image of any other size is refused with 422 `not_aligned`")
FACE_INDEX = ("which face of image_{side} to compare: its index in /v1/detect's order (0 = largest); "
              "default: the largest face. More than the faces found: 422 `face_index_out_of_range`")
EMBEDDING_IN = ("an embedding as /v1/embed returns it (any length-{n} vector of finite numbers; it is "
                "normalised to unit length), instead of an image; needs `contract_id`")
CONTRACT_IN = ("the `contract_id` that came with the embedding(s) (/v1/embed, /v1/detect): a vector of "
               "another model is refused with 422 `contract_mismatch`")
# 8192: far above any face model's embedding size; the exact length is the model's (422 otherwise).
EmbeddingIn = Annotated[list[float], Field(min_length=1, max_length=8192)]


def _one_of(body: BaseModel, image: str, embedding: str) -> None:
    if (getattr(body, image) is None) == (getattr(body, embedding) is None):
        raise ValueError(f"give `{image}` or `{embedding}` (exactly one)")


class VerifyJSON(_Strict):
    # The schema states what the validator below checks (the validator's message says it in words).
    model_config = ConfigDict(json_schema_extra={
        "allOf": [{"oneOf": [{"required": ["image_a"]}, {"required": ["embedding_a"]}]},
                  {"oneOf": [{"required": ["image_b"]}, {"required": ["embedding_b"]}]}],
        "dependentRequired": {"embedding_a": ["contract_id"], "embedding_b": ["contract_id"]},
    })
    image_a: B64Image | None = None
    image_b: B64Image | None = None
    embedding_a: EmbeddingIn | None = Field(None, description=EMBEDDING_IN.format(n="D"))
    embedding_b: EmbeddingIn | None = Field(None, description=EMBEDDING_IN.format(n="D"))
    contract_id: str | None = Field(None, max_length=64, description=CONTRACT_IN)
    threshold: float | None = Field(None, ge=-1.0, le=1.0,
                                    description="cosine threshold for this request (default: the model's)")
    face_a: int | None = Field(None, ge=0, description=FACE_INDEX.format(side="a"))
    face_b: int | None = Field(None, ge=0, description=FACE_INDEX.format(side="b"))
    aligned: bool = Field(False, description=ALIGNED + " (applies to both images)")

    @model_validator(mode="after")
    def _sides(self) -> VerifyJSON:
        _one_of(self, "image_a", "embedding_a")
        _one_of(self, "image_b", "embedding_b")
        embeddings = self.embedding_a is not None or self.embedding_b is not None
        if embeddings and self.contract_id is None:
            raise ValueError("`contract_id` is required with `embedding_a` / `embedding_b`")
        for side in "ab":
            if getattr(self, f"face_{side}") is not None and getattr(self, f"image_{side}") is None:
                raise ValueError(f"`face_{side}` picks a face of `image_{side}`; there is no image_{side}")
            if getattr(self, f"face_{side}") is not None and self.aligned:
                raise ValueError(f"`face_{side}` and `aligned` exclude each other: an aligned image is one face")
        return self


class ImageJSON(_Strict):
    image: B64Image


class AlignableImageJSON(ImageJSON):
    aligned: bool = Field(False, description=ALIGNED)


class DetectJSON(ImageJSON):
    embeddings: bool = Field(False, description="also return each face's unit-length embedding")


class BatchJSON(_Strict):
    images: list[B64Image] = Field(..., min_length=1, description="the images, base64 encoded; at most "
                                   "FACEREC_MAX_BATCH_IMAGES (default 32), more: 413 `too_many_images`")
    aligned: bool = Field(False, description=ALIGNED + " (applies to every image)")


# ----------------------------------------------------------------------------- responses
NOT_LIVENESS = ("This is NOT presentation-attack (liveness) detection: a printed photo, a screen "
                "replay or a mask of a real face is a real face to it and is not flagged.")


class FaceBox(BaseModel):
    box: list[float] = Field(..., description="x1, y1, x2, y2 in pixels of the decoded, EXIF-rotated image")
    landmarks: list[list[float]] = Field(
        ..., description="5 points (x, y): eyes, nose tip, mouth corners, the viewer's left first")
    score: float | None = Field(..., description="face detection score, 0-1; null when detection was "
                                "skipped (an `aligned` input: box and landmarks are then the template's)")


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
                                 "(null when the detector has no calibrated threshold). " + NOT_LIVENESS)


class FaceReport(BaseModel):
    face: FaceBox
    quality: Quality | None = Field(..., description="null for a model without a quality head whose "
                                    "folder has no quality measure (`facerec fit-quality`)")
    ood: Ood | None = Field(..., description="null when the service runs without an OOD detector")


class ImageReport(FaceReport):
    faces_found: int = Field(..., description="faces detected; the largest one is reported (1 for an "
                             "`aligned` input)")


class VerifiedImage(ImageReport):
    face_index: int = Field(..., description="the face compared: its index in /v1/detect's order "
                            "(largest first)")
    face_rule: Literal["largest", "index", "aligned"] = Field(
        ..., description="how it was chosen: `largest` (no `face_a`/`face_b` given), `index` (the "
        "request's), `aligned` (the image is the face)")


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
    image_a: VerifiedImage | None = Field(..., description="the face of image_a (null when side a was "
                                          "given as `embedding_a`)")
    image_b: VerifiedImage | None = Field(..., description="the face of image_b (null when side b was "
                                          "given as `embedding_b`)")


class EmbedResponse(ImageReport):
    embedding: list[float] = Field(..., description="L2-normalised embedding of the largest face")
    embedding_norm: float = Field(..., description="norm of the raw embedding before normalisation")
    contract_id: str = Field(..., description="embedding contract id: only embeddings with equal ids "
                             "are comparable")


class DetectedFace(FaceReport):
    embedding: list[float] | None = Field(
        None, description="L2-normalised embedding of this face (with `embeddings: true`; else null)")


class DetectResponse(BaseModel):
    faces_found: int
    faces: list[DetectedFace] = Field(..., description="every face (up to the limit), largest first; "
                                      "a face's position here is its index for /v1/verify's face_a/face_b")
    contract_id: str = Field(..., description="embedding contract id of the embeddings (compare only "
                             "embeddings with equal ids)")


class ErrorBody(BaseModel):
    code: str
    message: str
    details: object | None = None


class BatchEntryError(BaseModel):
    error: ErrorBody = Field(..., description="why this entry has no embedding (the codes of the "
                             "single-image routes: decode_error, no_face, not_aligned, ...)")


class EmbedBatchResponse(BaseModel):
    results: list[EmbedResponse | BatchEntryError] = Field(
        ..., description="one entry per input image, in order: the fields of /v1/embed, or `error`")
    contract_id: str = Field(..., description="embedding contract id of every embedding here")


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
