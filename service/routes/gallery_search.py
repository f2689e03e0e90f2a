"""POST /v1/galleries/{id}/search: who is this? Open-set 1:N search of a gallery."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request

from service.auth import ApiKey
from service.errors import from_exception
from service.routes.common import EngineDep, GalleriesDep, embedding_in, image_report
from service.routes.gallery_io import search_input, search_response
from service.routes.gallery_openapi import GALLERY_ERRORS, SEARCH_DOC
from service.routes.gallery_schemas import GalleryId, SearchResponse

router = APIRouter(prefix="/v1", tags=["galleries"])


@router.post(
    "/galleries/{gallery_id}/search",
    response_model=SearchResponse,
    responses=GALLERY_ERRORS,
    openapi_extra=SEARCH_DOC,
    summary="Who is this? Open-set 1:N search",
    description="Multipart `image` [, `top_k`, `threshold`, `fpir`] or JSON. The largest face is "
    "searched; `decision` is `match` when the best person's similarity reaches the threshold "
    "(calibrated for the gallery's FPIR and size, unless the request gives `threshold` or "
    "`fpir`), else `unknown`. JSON may give `embedding` with its `contract_id` instead of `image` "
    "(a vector of another model: 422 `contract_mismatch`).",
)
async def search(
    gallery_id: GalleryId, request: Request, engine: EngineDep, galleries: GalleriesDep, _: ApiKey
) -> SearchResponse:
    manager, _record = await galleries.gallery(gallery_id, usable=True)
    image, body = await search_input(request, engine.settings.max_image_bytes)
    if image is None:  # a search by embedding: the unit vector, as a face's embedding is
        vector = embedding_in(engine, body.embedding, body.contract_id, "embedding")
        embedding, report = (vector / np.linalg.norm(vector)).astype(np.float32), None
    else:
        async with engine.admit():
            try:
                result = await engine.process(image)
            except Exception as exc:  # noqa: BLE001 - mapped to an API error, or re-raised
                raise from_exception(exc, "image") or exc
        embedding, report = result.faces[0].embedding, image_report(engine, result)
    found = await galleries.identify(manager, gallery_id, embedding, body.top_k, body.fpir, body.threshold)
    return search_response(found, engine.backend.contract.contract_id, report)
