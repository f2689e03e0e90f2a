"""POST /v1/quality: face box, quality and OOD score of the largest face of one photo (or of an
aligned crop)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.auth import ApiKey
from service.inputs import read_images, request_body_doc
from service.routes.common import ERROR_RESPONSES, EngineDep, image_report
from service.schemas import AlignableImageJSON, ImageReport

router = APIRouter(prefix="/v1", tags=["quality"])
FIELDS = ("image",)
OPTIONS = ("aligned",)


@router.post(
    "/quality",
    response_model=ImageReport,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_doc(AlignableImageJSON, FIELDS, OPTIONS),
    summary="Quality of the largest face",
    description="Multipart file `image` (optional form field `aligned`) or JSON `{\"image\": "
    "\"<base64>\"}`. `quality.score` is the percentile (0-100) of the raw quality among the model's "
    "calibration faces. With `aligned` the image is already the 112x112 ArcFace-template crop and "
    "detection is skipped.",
)
async def quality(request: Request, engine: EngineDep, _: ApiKey) -> ImageReport:
    parsed = await read_images(request, FIELDS, AlignableImageJSON, engine.settings.max_image_bytes, OPTIONS)
    async with engine.admit():
        results = await engine.process_many(parsed.images, aligned=parsed.body.aligned)
    return image_report(engine, results["image"])
