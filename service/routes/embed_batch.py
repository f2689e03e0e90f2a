"""POST /v1/embed/batch: the embeddings of many photos in one request.

One entry per input image, in order: the fields of /v1/embed, or ``{"error": {"code", "message"}}``
for an image that is the caller's problem (not base64, empty, too large, not an image, no face, not
aligned, ...) without failing the others. The faces of all good images go to the model as one
submission, so the micro-batcher runs them together. More images than ``FACEREC_MAX_BATCH_IMAGES``
is a 413 before any image is looked at; overload (429) and shutdown (503) fail the whole request,
as they are nobody's input.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.auth import ApiKey
from service.errors import ApiError, from_exception
from service.inputs import b64_image, form_options, image_too_large, request_body_doc
from service.routes.common import ERROR_RESPONSES, EngineDep, embed_response
from service.routes.gallery_io import body_kind, check_fields, json_body
from service.schemas import BatchEntryError, BatchJSON, EmbedBatchResponse, ErrorBody

router = APIRouter(prefix="/v1", tags=["embedding"])
OPTIONS = ("aligned",)
_DOC = request_body_doc(BatchJSON, ("images",), OPTIONS)
_DOC["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["images"] = {
    "type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
    "description": "the image files: repeat the part once per image"}


def too_many(limit: int, count: int | None = None) -> ApiError:
    counted = f"{count} images" if count is not None else "more images"
    return ApiError(413, "too_many_images", f"{counted} than the limit of {limit} per batch "
                    "(FACEREC_MAX_BATCH_IMAGES): split the batch", {"limit": limit, "count": count})


async def _part_bytes(part, index: int, max_bytes: int) -> bytes | ApiError:
    """One file part's bytes, or the entry's error (empty, too large)."""
    field = f"images[{index}]"
    data = await part.read(max_bytes + 1)
    if len(data) > max_bytes:
        return image_too_large(field, max_bytes)
    if not data:
        return ApiError(422, "empty_image", f"{field}: empty file", {"field": field})
    return data


async def batch_input(request: Request, limit: int, max_bytes: int) -> tuple[list, bool]:
    """(each image's bytes or its ApiError, aligned)."""
    if body_kind(request) == "json":
        body = await json_body(request, BatchJSON)
        if len(body.images) > limit:
            raise too_many(limit, len(body.images))
        entries = []
        for i, text in enumerate(body.images):
            try:
                entries.append(b64_image(f"images[{i}]", text, max_bytes))
            except ApiError as err:
                entries.append(err)
        return entries, body.aligned
    try:
        form = await request.form(max_files=limit, max_fields=4, max_part_size=64 * 1024)
    except ApiError:  # the body passed the size limit while it was read: 413
        raise
    except HTTPException as exc:  # starlette's own parse errors
        if str(exc.detail).startswith("Too many files"):
            raise too_many(limit) from None
        raise ApiError(422, "invalid_multipart", f"malformed multipart body ({exc.detail})") from None
    except Exception as exc:  # noqa: BLE001 - parse errors are the client's
        raise ApiError(422, "invalid_multipart", f"malformed multipart body ({exc})") from None
    try:
        check_fields(form, {"images", *OPTIONS})
        parts = form.getlist("images")
        if not parts:
            raise ApiError(422, "validation_error", "missing file field 'images'", {"field": "images"})
        if any(not isinstance(p, UploadFile) for p in parts):
            raise ApiError(422, "validation_error", "'images' must be file parts", {"field": "images"})
        options = form_options(form, {"images": [""]}, BatchJSON, OPTIONS)
        return [await _part_bytes(p, i, max_bytes) for i, p in enumerate(parts)], options.aligned
    finally:
        await form.close()


@router.post(
    "/embed/batch",
    response_model=EmbedBatchResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_DOC,
    summary="Embeddings of many photos",
    description="Multipart with the file part `images` repeated once per photo (optional form field "
    "`aligned`), or JSON `{\"images\": [\"<base64>\", ...]}`. `results` has one entry per image in "
    "order: the fields of /v1/embed (the largest face), or `error` (`code`, `message`) for an image "
    "that cannot be used; one bad image does not fail the others. At most FACEREC_MAX_BATCH_IMAGES "
    "images (default 32); more is a 413 `too_many_images`.",
)
async def embed_batch(request: Request, engine: EngineDep, _: ApiKey) -> EmbedBatchResponse:
    s = engine.settings
    # A batch's faces are queued at once: never more than the queue holds.
    limit = min(s.max_batch_images, s.max_pending)
    entries, aligned = await batch_input(request, limit, s.max_image_bytes)
    async with engine.admit():
        outcomes = await engine.process_batch(entries, aligned)
    results = []
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            err = from_exception(outcome, f"images[{i}]")  # process_batch returns input faults only
            details = err.details if isinstance(err.details, dict) else {}
            results.append(BatchEntryError(error=ErrorBody(code=err.code, message=err.message,
                                                           details={**details, "index": i})))
        else:
            results.append(embed_response(engine, outcome))
    return EmbedBatchResponse(results=results, contract_id=engine.backend.contract.contract_id)
