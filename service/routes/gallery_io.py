"""Request and response bodies of the gallery routes, and reading them from a request.

The image routes read their bodies themselves (multipart files or base64 JSON, as the rest of the
API); ``service.routes.gallery_openapi`` documents both encodings in the OpenAPI schema.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic_core import PydanticSerializationError
from starlette.datastructures import UploadFile

from facerec.gallery import EnrollmentPolicy, MetadataError, MetadataLimits, Reason, check_metadata
from facerec.gallery.metadata import DEFAULT_LIMITS
from facerec.gallery.policy import JsonInt
from facerec.gallery.store import ID_PATTERN, MAX_NAME, NAME_PATTERN, check_name
from service.errors import ApiError, _validation_details
from service.inputs import B64_PATTERN, _b64, image_too_large, parse_json
from service.schemas import ImageReport

MAX_IMAGES_PER_REQUEST = 32
_B64 = "image file (JPEG, PNG, WebP, ...), base64 encoded; a data: URI prefix is accepted"


# Vendor extensions marking the schema parts that depend on the running service; ``openapi_for``
# replaces the defaults there with the settings and the model's calibration.
FPIR_MARK = {"x-facerec": "fpir"}
# A search names a threshold or an FPIR, not both (null counts as absent).
BOTH_THRESHOLD_AND_FPIR = {"required": ["threshold", "fpir"],
                           "properties": {"threshold": {"type": "number"}, "fpir": {"type": "number"}}}
METADATA_MARK = {"x-facerec": "metadata"}


# ============================================================================ schemas
class _Strict(BaseModel):
    # Unknown fields are an error, and types are strict: a JSON `true` is not the number 1, "0.5"
    # is not a number (the schema says so; multipart text is converted with strict=False).
    model_config = ConfigDict(extra="forbid", strict=True)


Name = Annotated[
    str,
    Field(min_length=1, max_length=MAX_NAME, json_schema_extra={"pattern": NAME_PATTERN},
          description="no control characters or line separators; surrounding spaces are dropped"),
]
Id = Annotated[str, Field(pattern=ID_PATTERN, description="32 hexadecimal digits")]
_LIMITS = DEFAULT_LIMITS
def metadata_text(limits: MetadataLimits) -> str:
    return (
        "a JSON object the client owns, returned as given. Limits (FACEREC_METADATA_MAX_*): "
        f"{limits.max_bytes} bytes as compact UTF-8 JSON, {limits.max_keys} keys per object, "
        f"{limits.max_depth} levels of nesting (the object itself is level 1), "
        f"{limits.max_string} characters per key or string, no NaN or Infinity; beyond them 422 "
        "`invalid_metadata`"
    )


Metadata = Annotated[
    dict[str, Any],
    Field(
        description=metadata_text(_LIMITS),
        json_schema_extra={"maxProperties": _LIMITS.max_keys,
                           "propertyNames": {"maxLength": _LIMITS.max_string}, **METADATA_MARK},
    ),
]
B64Image = Annotated[str, Field(description=_B64, json_schema_extra={"minLength": 1, "pattern": B64_PATTERN})]
Images = Annotated[list[B64Image], Field(min_length=1, max_length=MAX_IMAGES_PER_REQUEST)]


def _no_default(schema: dict) -> None:
    # Absent means unchanged; the None default is no value a client may send for a non-nullable field.
    schema.pop("default", None)


def _patch_of(model: type[BaseModel]) -> type[BaseModel]:
    """``model`` with every field optional (absent: unchanged), same types and bounds."""
    fields = {
        name: (Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation,
               Field(None, description=f.description, json_schema_extra=_no_default))
        for name, f in model.model_fields.items()
    }
    return create_model(f"{model.__name__}Patch", __base__=_Strict, **fields)


EnrollmentPolicyPatch = _patch_of(EnrollmentPolicy)


class GalleryCreate(_Strict):
    name: Name
    policy: EnrollmentPolicy | None = Field(
        None, description="enrollment gate (default: the standard policy)"
    )
    target_fpir: float | None = Field(
        None, gt=0, lt=1, description="FPIR of the match threshold (default: the calibration's, 0.01)",
        json_schema_extra=FPIR_MARK,
    )
    match_threshold: float | None = Field(None, ge=-1, le=1, description="fixed threshold instead")


class GalleryUpdate(_Strict):
    name: Name | None = None
    policy: EnrollmentPolicyPatch | None = Field(None, description="policy fields to change")
    target_fpir: float | None = Field(None, gt=0, lt=1, json_schema_extra=FPIR_MARK)
    match_threshold: float | None = Field(None, ge=-1, le=1, description="null: use the calibrated one")


class OperatingPointOut(BaseModel):
    threshold: float
    source: Literal["model", "gallery", "request"]
    fpir: float | None = Field(..., description="false-positive identification rate it was calibrated for")
    calibrated_on: str | None
    gallery_size: int = Field(..., description="samples in the gallery")
    calibrated_gallery_size: int | None = Field(..., description="gallery size of the calibration used")
    beyond_calibration: bool = Field(..., description="the gallery is larger than any calibrated size")
    calibration_method: Literal["searches", "pairs"] | None = Field(
        ..., description="validation searches at this size, or impostor pairs extrapolated to it"
    )


class GalleryOut(BaseModel):
    id: str
    name: str
    contract_id: str
    embedding_size: int
    model_name: str
    created_at: str
    persons: int
    samples: int
    policy: EnrollmentPolicy
    target_fpir: float
    match_threshold: float | None
    usable: bool = Field(..., description="false when the service runs another model than the gallery's")
    operating_point: OperatingPointOut | None = Field(..., description="the match threshold now in force")


class GalleryList(BaseModel):
    galleries: list[GalleryOut]


class SampleOut(BaseModel):
    id: str
    created_at: str
    info: dict = Field(..., description="measurements at enrollment (detector score, size, pose, quality)")


class PersonOut(BaseModel):
    id: str
    name: str
    metadata: dict
    created_at: str
    samples: int
    metadata_error: str | None = Field(
        None, description="why `metadata` is {}: the stored value cannot be returned (written by an "
        "older version without the metadata limits); replace it with PATCH")


class PersonDetail(PersonOut):
    sample_list: list[SampleOut]


class PersonList(BaseModel):
    persons: list[PersonOut]
    total: int
    limit: int
    offset: int


class PersonUpdate(_Strict):
    name: Name | None = None
    metadata: Metadata | None = Field(None, description="replaces the stored metadata")


class ReasonOut(BaseModel):
    code: Reason
    message: str


class ImageOutcome(BaseModel):
    index: int
    status: Literal["enrolled", "refused", "error"]
    reasons: list[ReasonOut] = Field(default_factory=list, description="why it was refused")
    sample_id: str | None = None
    measurements: dict | None = None
    duplicate_of: dict | None = None
    error: dict | None = Field(None, description="{code, message} when the image itself is unusable")


class EnrollResponse(BaseModel):
    person: PersonOut | None
    created: bool
    enrolled: int
    refused: int
    results: list[ImageOutcome]


class PersonEnrollJSON(_Strict):
    name: Name
    metadata: Metadata | None = None
    images: Images


class SamplesJSON(_Strict):
    images: Images


class BatchPerson(_Strict):
    # Exactly one of name (a new person) and person_id (an existing one): said in the schema too.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["name"], "properties": {"name": {"type": "string"}, "person_id": {"type": "null"}}},
        {"required": ["person_id"], "properties": {"person_id": {"type": "string"}, "name": {"type": "null"},
                                                   "metadata": {"type": "null"}}},
    ]})
    name: Name | None = Field(None, description="a new person")
    person_id: Id | None = Field(None, description="add to this person instead of creating one")
    metadata: Metadata | None = Field(None, description="a new person's metadata (with `name` only: "
                                      "PATCH an existing person to change its metadata)")
    images: Images


class BatchEnrollJSON(_Strict):
    persons: list[BatchPerson] = Field(
        ..., min_length=1, max_length=MAX_IMAGES_PER_REQUEST,
        description=f"at most {MAX_IMAGES_PER_REQUEST} images in all persons together")


class BatchEnrollResponse(BaseModel):
    persons: list[EnrollResponse]


class SearchJSON(_Strict):
    image: B64Image
    model_config = ConfigDict(json_schema_extra={"not": BOTH_THRESHOLD_AND_FPIR})

    top_k: JsonInt = Field(5, ge=1, le=50)
    threshold: float | None = Field(None, ge=-1, le=1, description="cosine threshold for this request")
    fpir: float | None = Field(None, gt=0, lt=1, description="calibrated FPIR to use for this request",
                               json_schema_extra=FPIR_MARK)


class CandidateOut(BaseModel):
    person_id: str
    name: str
    similarity: float = Field(..., description="cosine of the person's best-matching sample, -1..1")
    sample_id: str


class SearchResponse(BaseModel):
    decision: Literal["match", "unknown"]
    person: PersonOut | None = Field(..., description="the matched person (decision match)")
    similarity: float | None = Field(..., description="best candidate's similarity (null: empty gallery)")
    threshold: float
    operating_point: OperatingPointOut
    candidates: list[CandidateOut] = Field(..., description="top-k persons, best first")
    contract_id: str
    image: ImageReport


# ============================================================================ request bodies
async def read_form(request: Request, max_files: int):
    try:
        return await request.form(max_files=max_files, max_fields=8, max_part_size=64 * 1024)
    except ApiError:  # the body passed the size limit while it was read (chunked upload): 413
        raise
    except Exception as exc:  # noqa: BLE001 - parse errors are the client's
        raise ApiError(422, "invalid_multipart", f"malformed multipart body ({exc})") from None


async def json_body(request: Request, model: type[BaseModel]):
    body = await request.body()
    payload = parse_json(body) if body.strip() else None
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise ApiError(
            422,
            "validation_error",
            "the JSON body does not match the API schema",
            _validation_details(exc.errors(include_input=False)),
        ) from None


def body_kind(request: Request) -> str:
    ct = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ct == "multipart/form-data":
        return "multipart"
    if ct == "application/json" or ct.endswith("+json"):
        return "json"
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send multipart/form-data or application/json (got {ct or 'no Content-Type'})",
    )


async def read_files(form, field: str, limit: int, max_bytes: int) -> list[bytes]:
    parts = form.getlist(field)
    if not parts:
        raise ApiError(422, "validation_error", f"missing file field {field!r}", {"field": field})
    if len(parts) > limit:
        raise ApiError(422, "validation_error", f"at most {limit} images per request", {"field": field})
    out = []
    for part in parts:
        if not isinstance(part, UploadFile):
            raise ApiError(422, "validation_error", f"{field!r} must be a file part", {"field": field})
        data = await part.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise image_too_large(field, max_bytes)
        if not data:
            raise ApiError(422, "empty_image", f"{field}: empty file", {"field": field})
        out.append(data)
    return out


def check_fields(form, allowed: set[str]) -> None:
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise ApiError(
            422,
            "validation_error",
            f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}",
            {"unknown": unknown},
        )


def form_text(form, field: str) -> str | None:
    value = form.get(field)
    if isinstance(value, UploadFile):
        raise ApiError(422, "validation_error", f"{field} must be a text field", {"field": field})
    return value


def json_field(value: str | None, field: str):
    if value is None or value == "":
        return None
    return parse_json(value, field)


def decode_images(images: list[str], max_bytes: int, prefix: str = "images") -> list[bytes]:
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise ApiError(422, "validation_error", f"at most {MAX_IMAGES_PER_REQUEST} images per request")
    return [_b64(f"{prefix}[{i}]", text, max_bytes) for i, text in enumerate(images)]


def checked_name(name: str | None, field: str) -> str:
    """The person's name as the store will keep it, or 422 before any image work."""
    if name is None or not name.strip():
        raise ApiError(422, "validation_error", f"{field}: a new person needs a name", {"field": field})
    try:
        return check_name(name, field)
    except ValueError as exc:
        raise ApiError(422, "validation_error", str(exc), {"field": field}) from None


def metadata_limits(settings) -> MetadataLimits:
    return MetadataLimits(
        max_bytes=settings.metadata_max_bytes,
        max_keys=settings.metadata_max_keys,
        max_depth=settings.metadata_max_depth,
        max_string=settings.metadata_max_string,
    )


# The encoder of the responses (FastAPI serialises response models through pydantic's JSON mode).
_ENCODER = TypeAdapter(dict[str, Any])


def returnable(metadata: dict) -> bool:
    """Whether ``metadata`` comes back unchanged through the response encoder."""
    try:
        return json.loads(_ENCODER.dump_json(metadata)) == metadata
    except (PydanticSerializationError, ValueError, RecursionError):
        return False


def check_person_metadata(value, limits: MetadataLimits, field: str = "metadata") -> dict | None:
    """``value`` (None: not given) when it is within ``limits`` and returnable, else 422
    ``invalid_metadata`` naming the offending path and the limit. Runs before anything is stored:
    what is stored is returned by every later listing and search."""
    if value is None:
        return None
    try:
        check_metadata(value, limits, field)
    except MetadataError as exc:
        raise ApiError(422, exc.code, str(exc), exc.details()) from None
    if not returnable(value):
        raise ApiError(422, "invalid_metadata", f"{field}: cannot be returned as JSON", {"field": field})
    return value


async def enroll_input(
    request: Request, max_bytes: int, named: bool, limits: MetadataLimits
) -> tuple[list[bytes], str | None, dict | None]:
    if body_kind(request) == "multipart":
        form = await read_form(request, MAX_IMAGES_PER_REQUEST)
        try:
            # metadata belongs to a new person: adding samples to an existing one takes none (it was
            # accepted and silently dropped; PATCH the person to change it)
            check_fields(form, {"images"} | ({"name", "metadata"} if named else set()))
            name = form_text(form, "name") if named else None
            metadata = json_field(form_text(form, "metadata"), "metadata") if named else None
            images = await read_files(form, "images", MAX_IMAGES_PER_REQUEST, max_bytes)
        finally:
            await form.close()
    else:
        body = await json_body(request, PersonEnrollJSON if named else SamplesJSON)
        name, metadata = getattr(body, "name", None), getattr(body, "metadata", None)
        images = decode_images(body.images, max_bytes)
    metadata = check_person_metadata(metadata, limits)
    if named:
        name = checked_name(name, "name")
    return images, name, metadata
