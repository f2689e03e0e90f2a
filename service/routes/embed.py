"""POST /v1/embed: the embedding of the largest face, with the contract id it is comparable under."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.auth import ApiKey
from service.inputs import read_images, request_body_doc
from service.routes.common import ERROR_RESPONSES, EngineDep, image_report
from service.schemas import EmbedResponse, ImageJSON

router = APIRouter(prefix="/v1", tags=["embedding"])
FIELDS = ("image",)


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_doc(ImageJSON, FIELDS),
    summary="Embedding of the largest face",
    description="Multipart file `image` or JSON `{\"image\": \"<base64>\"}`. The embedding is unit "
    "length: the cosine similarity of two embeddings is their dot product, meaningful only when "
    "their `contract_id`s are equal.",
)
async def embed(request: Request, engine: EngineDep, _: ApiKey) -> EmbedResponse:
    parsed = await read_images(request, FIELDS, ImageJSON, engine.settings.max_image_bytes)
    async with engine.admit():
        results = await engine.process_many(parsed.images)
    result = results["image"]
    face = result.faces[0]
    report = image_report(engine, result)
    return EmbedResponse(
        **report.model_dump(), embedding=[float(v) for v in face.embedding],
        embedding_norm=float(face.embedding_norm), contract_id=engine.backend.contract.contract_id,
    )
