"""A gallery's persons: enroll (one or many photos, one or many persons per request) through the
enrollment gate, list, read, rename or replace metadata, delete persons and samples.

Photos run through the engine's pipeline (``Galleries.offer``); the gate's refusals come back per
image with reason codes, and a request none of whose photos is accepted is 422
``enrollment_refused``.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from facerec.gallery.sql_base import MAX_OFFSET
from service.auth import ApiKey
from service.routes.common import EngineDep, GalleriesDep
from service.routes.gallery_io import (
    batch_input,
    check_person_metadata,
    enroll_input,
    enroll_response,
    metadata_limits,
    person_out,
    refused_error,
)
from service.routes.gallery_openapi import BATCH_DOC, PERSON_DOC, SAMPLES_DOC
from service.routes.gallery_openapi import GALLERY_ERRORS as ERRORS
from service.routes.gallery_schemas import (
    MAX_IMAGES_PER_REQUEST,
    BatchEnrollResponse,
    EnrollResponse,
    GalleryId,
    PersonDetail,
    PersonId,
    PersonList,
    PersonOut,
    PersonUpdate,
    SampleId,
    SampleOut,
)

log = logging.getLogger("service")
router = APIRouter(prefix="/v1", tags=["galleries"])


# ============================================================================ enrollment
@router.post(
    "/galleries/{gallery_id}/persons", status_code=201, response_model=EnrollResponse, openapi_extra=PERSON_DOC,
    responses=ERRORS, summary="Enroll a new person with one or more photos",
    description="Multipart: `name`, optional `metadata` (JSON object), one or more `images` files; "
    "or JSON `{name, metadata?, images: [base64, ...]}`. Every photo passes the gallery's "
    "enrollment gate; refused ones are reported per image with reason codes. The person is "
    "created when at least one photo is accepted, else 422 `enrollment_refused`.",
)
async def create_person(
    gallery_id: GalleryId, request: Request, engine: EngineDep, galleries: GalleriesDep, _: ApiKey
) -> EnrollResponse:
    manager, _record = await galleries.gallery(gallery_id, usable=True)
    images, name, metadata = await enroll_input(
        request, engine.settings.max_image_bytes, named=True, limits=metadata_limits(galleries.settings))
    enrollment = await galleries.enroll(manager, gallery_id, await galleries.offer(images), None, name, metadata)
    response = enroll_response(enrollment)
    if enrollment.person is None:
        raise refused_error(response)
    log.info("gallery %s: person %s enrolled with %d sample(s)", gallery_id, enrollment.person.id,
             response.enrolled)
    return response


@router.post(
    "/galleries/{gallery_id}/persons/{person_id}/samples", response_model=EnrollResponse,
    openapi_extra=SAMPLES_DOC, responses=ERRORS, summary="Add photos to a person",
    description="Multipart: one or more `images` files; or JSON `{images: [base64, ...]}`. Same gate "
    "as enrollment; 422 `enrollment_refused` when none is accepted.",
)
async def add_samples(
    gallery_id: GalleryId, person_id: PersonId, request: Request, engine: EngineDep, galleries: GalleriesDep,
    _: ApiKey,
) -> EnrollResponse:
    manager, _record = await galleries.gallery(gallery_id, usable=True)
    await galleries.call(manager.store.get_person, gallery_id, person_id)
    images, _name, _meta = await enroll_input(
        request, engine.settings.max_image_bytes, named=False, limits=metadata_limits(galleries.settings))
    enrollment = await galleries.enroll(manager, gallery_id, await galleries.offer(images), person_id)
    response = enroll_response(enrollment)
    if enrollment.enrolled == 0:
        raise refused_error(response)
    return response


@router.post(
    "/galleries/{gallery_id}/enroll", response_model=BatchEnrollResponse, responses=ERRORS,
    openapi_extra=BATCH_DOC, summary="Batch enrollment: several persons, several photos each",
    description="JSON `{persons: [{name | person_id, metadata?, images: [base64, ...]}, ...]}` (at "
    f"most {MAX_IMAGES_PER_REQUEST} images in all). Persons are enrolled in order; each gets its "
    "own report (a person none of whose photos passes is not created).",
)
async def batch_enroll(
    gallery_id: GalleryId, request: Request, engine: EngineDep, galleries: GalleriesDep, _: ApiKey
) -> BatchEnrollResponse:
    manager, _record = await galleries.gallery(gallery_id, usable=True)
    body, decoded = await batch_input(request, engine.settings.max_image_bytes,
                                      metadata_limits(galleries.settings))
    offered = await galleries.offer([b for images in decoded for b in images])
    out, start = [], 0
    for p, images in zip(body.persons, decoded):
        mine, start = offered[start : start + len(images)], start + len(images)
        enrollment = await galleries.enroll(manager, gallery_id, mine, p.person_id, p.name, p.metadata)
        out.append(enroll_response(enrollment))
    return BatchEnrollResponse(persons=out)


# ============================================================================ persons and samples
@router.get("/galleries/{gallery_id}/persons", response_model=PersonList, responses=ERRORS,
            summary="List a gallery's persons")
async def list_persons(
    gallery_id: GalleryId,
    galleries: GalleriesDep,
    _: ApiKey,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> PersonList:
    manager, record = await galleries.gallery(gallery_id)
    persons = await galleries.call(manager.store.list_persons, gallery_id, limit, offset)
    return PersonList(persons=[person_out(p) for p in persons], total=record.persons, limit=limit, offset=offset)


@router.get("/galleries/{gallery_id}/persons/{person_id}", response_model=PersonDetail, responses=ERRORS,
            summary="One person with its samples")
async def get_person(gallery_id: GalleryId, person_id: PersonId, galleries: GalleriesDep,
                     _: ApiKey) -> PersonDetail:
    manager = await galleries.get_manager()
    person = await galleries.call(manager.store.get_person, gallery_id, person_id)
    samples = await galleries.call(manager.store.list_samples, gallery_id, person_id)
    return PersonDetail(**person_out(person).model_dump(),
                        sample_list=[SampleOut(id=s.id, created_at=s.created_at, info=s.info) for s in samples])


@router.patch("/galleries/{gallery_id}/persons/{person_id}", response_model=PersonOut, responses=ERRORS,
              summary="Rename a person or replace its metadata")
async def update_person(gallery_id: GalleryId, person_id: PersonId, body: PersonUpdate, galleries: GalleriesDep,
                        _: ApiKey) -> PersonOut:
    check_person_metadata(body.metadata, metadata_limits(galleries.settings))
    manager = await galleries.get_manager()
    person = await galleries.call(manager.store.update_person, gallery_id, person_id, body.name, body.metadata)
    return person_out(person)


@router.delete("/galleries/{gallery_id}/persons/{person_id}", status_code=204, responses=ERRORS,
               summary="Delete a person and all its samples")
async def delete_person(gallery_id: GalleryId, person_id: PersonId, galleries: GalleriesDep,
                        _: ApiKey) -> Response:
    manager = await galleries.get_manager()
    await galleries.call(manager.store.delete_person, gallery_id, person_id)
    log.info("gallery %s: person %s deleted", gallery_id, person_id)
    return Response(status_code=204)


@router.delete("/galleries/{gallery_id}/persons/{person_id}/samples/{sample_id}", status_code=204,
               responses=ERRORS, summary="Delete one sample of a person")
async def delete_sample(gallery_id: GalleryId, person_id: PersonId, sample_id: SampleId, galleries: GalleriesDep,
                        _: ApiKey) -> Response:
    manager = await galleries.get_manager()
    await galleries.call(manager.store.delete_sample, gallery_id, person_id, sample_id)
    return Response(status_code=204)
