"""Reading the gallery routes' requests (multipart files or base64 JSON, as the rest of the API) and
writing their answers.

Every check that can refuse a request runs before any image work or store write: field names,
image counts and sizes, names, metadata limits (``check_person_metadata``). The bodies themselves
are in ``service.routes.gallery_schemas``; ``service.routes.gallery_openapi`` documents both
encodings in the OpenAPI schema.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError
from starlette.datastructures import UploadFile

from facerec.gallery import (
    Enrollment,
    GalleryManager,
    GalleryRecord,
    MetadataError,
    MetadataLimits,
    ThresholdRequired,
    check_metadata,
)
from facerec.gallery.store import check_name
from service.errors import ApiError, validation_error
from service.galleries import Identified
from service.inputs import b64_image, form_text, image_too_large, parse_json
from service.routes.gallery_schemas import (
    MAX_IMAGES_PER_REQUEST,
    BatchEnrollJSON,
    CandidateOut,
    EnrollResponse,
    GalleryOut,
    ImageOutcome,
    OperatingPointOut,
    PersonEnrollJSON,
    PersonOut,
    ReasonOut,
    SamplesJSON,
    SearchJSON,
    SearchResponse,
)
from service.schemas import ImageReport

log = logging.getLogger("service")


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
        raise validation_error(exc, "the JSON body does not match the API schema") from None


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


def json_field(value: str | None, field: str):
    if value is None or value == "":
        return None
    return parse_json(value, field)


def decode_images(images: list[str], max_bytes: int, prefix: str = "images") -> list[bytes]:
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise ApiError(422, "validation_error", f"at most {MAX_IMAGES_PER_REQUEST} images per request")
    return [b64_image(f"{prefix}[{i}]", text, max_bytes) for i, text in enumerate(images)]


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


async def batch_input(request: Request, max_bytes: int, limits: MetadataLimits
                      ) -> tuple[BatchEnrollJSON, list[list[bytes]]]:
    """The batch enrollment body and each person's decoded images, every person checked first."""
    body = await json_body(request, BatchEnrollJSON)
    if sum(len(p.images) for p in body.persons) > MAX_IMAGES_PER_REQUEST:
        raise ApiError(422, "validation_error", f"at most {MAX_IMAGES_PER_REQUEST} images per request")
    for i, p in enumerate(body.persons):
        if (p.person_id is None) == (p.name is None):
            raise ApiError(
                422,
                "validation_error",
                f"persons[{i}]: give either `name` (new person) or `person_id` (existing person)",
                {"index": i},
            )
        if p.person_id is not None:
            if p.metadata is not None:  # it would be dropped: metadata is set when a person is created
                raise ApiError(
                    422, "validation_error",
                    f"persons[{i}].metadata: metadata goes with `name` (a new person); change an existing "
                    f"person's metadata with PATCH /v1/galleries/{{gallery_id}}/persons/{{person_id}}",
                    {"index": i, "field": f"persons[{i}].metadata"},
                )
        else:
            checked_name(p.name, f"persons[{i}].name")
        check_person_metadata(p.metadata, limits, f"persons[{i}].metadata")
    decoded = [decode_images(p.images, max_bytes, f"persons[{i}].images") for i, p in enumerate(body.persons)]
    return body, decoded


async def search_input(request: Request, max_bytes: int) -> tuple[bytes | None, SearchJSON]:
    """The image to search for (None: the JSON body gives an embedding) and the search parameters
    (multipart or JSON)."""
    image = None
    if body_kind(request) == "multipart":
        form = await read_form(request, 1)
        try:
            check_fields(form, {"image", "top_k", "threshold", "fpir"})
            raw = {k: form_text(form, k) for k in ("top_k", "threshold", "fpir")}
            image = (await read_files(form, "image", 1, max_bytes))[0]
        finally:
            await form.close()
        try:
            body = SearchJSON.model_validate(  # form fields are text: converted, not strict
                {"image": "x", **{k: v for k, v in raw.items() if v not in (None, "")}}, strict=False
            )
        except ValidationError as exc:
            raise validation_error(exc, "invalid search parameters") from None
    else:
        body = await json_body(request, SearchJSON)
        if body.image is not None:
            image = b64_image("image", body.image, max_bytes)
    if body.threshold is not None and body.fpir is not None:
        raise ApiError(422, "validation_error", "give `threshold` or `fpir`, not both")
    return image, body


# ============================================================================ answers
def gallery_out(manager: GalleryManager, record: GalleryRecord) -> GalleryOut:
    config = manager.config(record)
    usable = record.contract_id == manager.contract.contract_id
    point = None
    if usable:
        try:
            point = OperatingPointOut(**manager.decision(record).to_dict())
        except (ThresholdRequired, ValueError):
            point = None
    return GalleryOut(
        id=record.id,
        name=record.name,
        contract_id=record.contract_id,
        embedding_size=record.embedding_size,
        model_name=record.model_name,
        created_at=record.created_at,
        persons=record.persons,
        samples=record.samples,
        policy=config.policy,
        target_fpir=config.target_fpir,
        match_threshold=config.match_threshold,
        usable=usable,
        operating_point=point,
    )


def person_out(p) -> PersonOut:
    metadata, error = p.metadata, getattr(p, "metadata_error", None)
    if error is None and not returnable(metadata):  # the store checked it; this is the last guard
        log.warning("gallery %s: person %s has metadata the response encoder refuses", p.gallery_id, p.id)
        metadata, error = {}, "metadata: stored value cannot be returned as JSON"
    return PersonOut(id=p.id, name=p.name, metadata=metadata, created_at=p.created_at, samples=p.samples,
                     metadata_error=error)


def enroll_response(enrollment: Enrollment) -> EnrollResponse:
    results = [
        ImageOutcome(
            index=i,
            status=o.status,
            reasons=[ReasonOut(**r.to_dict()) for r in o.refusals],
            sample_id=o.sample_id,
            measurements=o.measurements,
            duplicate_of=o.duplicate_of,
            error=None if o.error is None else {"code": o.error[0], "message": o.error[1]},
        )
        for i, o in enumerate(enrollment.outcomes)
    ]
    return EnrollResponse(
        person=None if enrollment.person is None else person_out(enrollment.person),
        created=enrollment.created,
        enrolled=enrollment.enrolled,
        refused=sum(o.status != "enrolled" for o in enrollment.outcomes),
        results=results,
    )


def refused_error(response: EnrollResponse) -> ApiError:
    """422 ``enrollment_refused``: no photo of the request was accepted; the details say why."""
    codes = sorted(
        {r.code.value for x in response.results for r in x.reasons}
        | {x.error["code"] for x in response.results if x.error}
    )
    return ApiError(
        422,
        "enrollment_refused",
        f"no image was accepted ({', '.join(codes)}); see details.results",
        {"results": [r.model_dump(mode="json") for r in response.results]},
    )


def search_response(found: Identified, contract_id: str, image: ImageReport | None) -> SearchResponse:
    candidates = [
        CandidateOut(person_id=c.person_id, name=person.name, similarity=c.similarity, sample_id=c.sample_id)
        for c, person in found.candidates
    ]
    return SearchResponse(
        decision=found.decision,
        person=None if found.person is None else person_out(found.person),
        similarity=candidates[0].similarity if candidates else None,
        threshold=found.operating_point.threshold,
        operating_point=OperatingPointOut(**found.operating_point.to_dict()),
        candidates=candidates,
        contract_id=contract_id,
        image=image,
    )
