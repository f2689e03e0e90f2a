"""POST /v1/detect: every face of one photo (up to the limit), largest first."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.auth import ApiKey
from service.errors import from_exception
from service.inputs import read_images, request_body_doc
from service.routes.common import ERROR_RESPONSES, EngineDep, face_report
from service.schemas import DetectResponse, ImageJSON

router = APIRouter(prefix="/v1", tags=["detection"])
FIELDS = ("image",)


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_doc(ImageJSON, FIELDS),
    summary="All faces of a photo",
    description="Multipart file `image` or JSON `{\"image\": \"<base64>\"}`. Each face has its box, "
    "landmarks, detection score, quality and OOD score; more faces than the limit is a 422.",
)
async def detect(request: Request, engine: EngineDep, _: ApiKey) -> DetectResponse:
    parsed = await read_images(request, FIELDS, ImageJSON, engine.settings.max_image_bytes)
    async with engine.admit():
        try:
            result = await engine.process(parsed.images["image"], all_faces=True)
        except Exception as exc:  # noqa: BLE001 - mapped to an API error, or re-raised as is
            raise from_exception(exc, "image") or exc
    return DetectResponse(faces_found=result.faces_found, faces=[face_report(engine, f) for f in result.faces])
