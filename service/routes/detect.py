"""POST /v1/detect: every face of one photo (up to the limit), largest first, optionally with each
face's embedding."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.auth import ApiKey
from service.errors import from_exception
from service.inputs import read_images, request_body_doc
from service.routes.common import ERROR_RESPONSES, EngineDep, face_report
from service.schemas import DetectedFace, DetectJSON, DetectResponse

router = APIRouter(prefix="/v1", tags=["detection"])
FIELDS = ("image",)
OPTIONS = ("embeddings",)


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_doc(DetectJSON, FIELDS, OPTIONS),
    summary="All faces of a photo",
    description="Multipart file `image` (optional form field `embeddings`) or JSON `{\"image\": "
    "\"<base64>\", \"embeddings\": true}`. Each face has its box, landmarks, detection score, quality "
    "and OOD score, and with `embeddings` its unit-length embedding; more faces than the limit is a "
    "422. The order (largest first) is the one `face_a`/`face_b` of /v1/verify index.",
)
async def detect(request: Request, engine: EngineDep, _: ApiKey) -> DetectResponse:
    parsed = await read_images(request, FIELDS, DetectJSON, engine.settings.max_image_bytes, OPTIONS)
    async with engine.admit():
        try:
            result = await engine.process(parsed.images["image"], all_faces=True)
        except Exception as exc:  # noqa: BLE001 - mapped to an API error, or re-raised as is
            raise from_exception(exc, "image") or exc
    with_embeddings = parsed.body.embeddings
    faces = [
        DetectedFace(**face_report(engine, f).model_dump(),
                     embedding=[float(v) for v in f.embedding] if with_embeddings else None)
        for f in result.faces
    ]
    return DetectResponse(faces_found=result.faces_found, faces=faces,
                          contract_id=engine.backend.contract.contract_id)
