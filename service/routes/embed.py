"""POST /v1/embed: the embedding of the largest face (or of an aligned crop), with the contract id it
is comparable under."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.auth import ApiKey
from service.inputs import read_images, request_body_doc
from service.routes.common import ERROR_RESPONSES, EngineDep, embed_response
from service.schemas import AlignableImageJSON, EmbedResponse

router = APIRouter(prefix="/v1", tags=["embedding"])
FIELDS = ("image",)
OPTIONS = ("aligned",)


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_doc(AlignableImageJSON, FIELDS, OPTIONS),
    summary="Embedding of the largest face",
    description="Multipart file `image` (optional form field `aligned`) or JSON `{\"image\": "
    "\"<base64>\"}`. The embedding is unit length: the cosine similarity of two embeddings is their "
    "dot product, meaningful only when their `contract_id`s are equal. With `aligned` the image is "
    "already the 112x112 ArcFace-template crop and detection is skipped.",
)
async def embed(request: Request, engine: EngineDep, _: ApiKey) -> EmbedResponse:
    parsed = await read_images(request, FIELDS, AlignableImageJSON, engine.settings.max_image_bytes, OPTIONS)
    async with engine.admit():
        results = await engine.process_many(parsed.images, aligned=parsed.body.aligned)
    return embed_response(engine, results["image"])
