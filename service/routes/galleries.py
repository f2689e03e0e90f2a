"""Galleries: create, list, read, change (name, enrollment policy, threshold) and delete.

A gallery is pinned to the model in use when it is created. The service's gallery store
(``service.galleries``) does the store calls; the persons and the search of a gallery have their
own routers (``gallery_persons``, ``gallery_search``).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response

from facerec.gallery import EnrollmentPolicy, GalleryConfig
from service.auth import ApiKey
from service.routes.common import GalleriesDep
from service.routes.gallery_io import gallery_out
from service.routes.gallery_openapi import GALLERY_ERRORS as ERRORS
from service.routes.gallery_schemas import (
    GalleryCreate,
    GalleryId,
    GalleryList,
    GalleryOut,
    GalleryUpdate,
    IndexOut,
)

log = logging.getLogger("service")
router = APIRouter(prefix="/v1", tags=["galleries"])


@router.post("/galleries", status_code=201, response_model=GalleryOut, responses=ERRORS,
             summary="Create a gallery (pinned to the model in use)")
async def create_gallery(body: GalleryCreate, galleries: GalleriesDep, _: ApiKey) -> GalleryOut:
    manager = await galleries.get_manager()
    calibration = galleries.calibration
    config = GalleryConfig(
        policy=body.policy or EnrollmentPolicy(),
        target_fpir=body.target_fpir or (calibration.default_fpir if calibration else 0.01),
        match_threshold=body.match_threshold,
    )
    record = await galleries.call(manager.create, body.name, config)
    log.info("gallery %s created", record.id)
    return gallery_out(manager, record)


@router.get("/galleries", response_model=GalleryList, responses=ERRORS, summary="List galleries")
async def list_galleries(galleries: GalleriesDep, _: ApiKey) -> GalleryList:
    manager = await galleries.get_manager()
    records = await galleries.call(manager.store.list_galleries)
    return GalleryList(galleries=[gallery_out(manager, r) for r in records])


@router.get("/galleries/{gallery_id}", response_model=GalleryOut, responses=ERRORS, summary="One gallery")
async def get_gallery(gallery_id: GalleryId, galleries: GalleriesDep, _: ApiKey) -> GalleryOut:
    manager, record = await galleries.gallery(gallery_id)
    out = gallery_out(manager, record)
    out.index = IndexOut(**await galleries.call(manager.store.index_info, gallery_id, record.samples))
    return out


@router.patch("/galleries/{gallery_id}", response_model=GalleryOut, responses=ERRORS,
              summary="Rename a gallery or change its policy / threshold")
async def update_gallery(gallery_id: GalleryId, body: GalleryUpdate, galleries: GalleriesDep,
                         _: ApiKey) -> GalleryOut:
    manager, record = await galleries.gallery(gallery_id)
    config = None
    changes = body.model_dump(exclude_unset=True)
    if set(changes) - {"name"}:
        current = manager.config(record).model_dump()
        if "policy" in changes:
            current["policy"] = {**current["policy"], **(changes["policy"] or {})}
        if changes.get("target_fpir") is not None:
            current["target_fpir"] = changes["target_fpir"]
        if "match_threshold" in changes:  # null: back to the calibrated threshold
            current["match_threshold"] = changes["match_threshold"]
        config = await galleries.call(GalleryConfig.model_validate, current)
    record = await galleries.call(manager.update, gallery_id, changes.get("name"), config)
    return gallery_out(manager, record)


@router.delete("/galleries/{gallery_id}", status_code=204, responses=ERRORS,
               summary="Delete a gallery with all its persons and samples")
async def delete_gallery(gallery_id: GalleryId, galleries: GalleriesDep, _: ApiKey) -> Response:
    manager = await galleries.get_manager()
    await galleries.call(manager.store.delete_gallery, gallery_id)
    log.info("gallery %s deleted", gallery_id)
    return Response(status_code=204)
