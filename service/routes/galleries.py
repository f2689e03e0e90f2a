"""Galleries: create/list/delete, enroll persons (one or many photos, one or many persons per
request) through the enrollment gate, rename/delete persons and samples, and open-set search.

The logic lives in :mod:`facerec.gallery`; this module turns requests into pipeline runs and
:class:`~facerec.gallery.policy.FaceEvidence`, and results and errors into the API's JSON. Store
calls block (SQLite, PostgreSQL), so they run in the thread pool. The store is opened at start for
pgvector (a wrong DSN stops the start) and at the first gallery request for SQLite (a service that
never uses galleries creates no file). Embeddings are never logged and never returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError

from facerec.gallery import (
    EnrollmentPolicy,
    GalleryConfig,
    GalleryManager,
    NotFound,
    Offered,
    Reason,
    Refusal,
    ThresholdRequired,
)
from facerec.gallery.measure import evidence_of
from facerec.gallery.sql_base import MAX_OFFSET
from facerec.runtime import DecodeError, NoFaceError, TooManyFacesError
from service.auth import ApiKey
from service.errors import ApiError, _validation_details, from_exception
from service.inputs import _b64
from service.routes.common import ERROR_RESPONSES, EngineDep, image_report
from service.routes.gallery_io import (
    MAX_IMAGES_PER_REQUEST,
    BatchEnrollJSON,
    BatchEnrollResponse,
    CandidateOut,
    EnrollResponse,
    GalleryCreate,
    GalleryList,
    GalleryOut,
    GalleryUpdate,
    ImageOutcome,
    OperatingPointOut,
    PersonDetail,
    PersonList,
    PersonOut,
    PersonUpdate,
    ReasonOut,
    SampleOut,
    SearchJSON,
    SearchResponse,
    body_kind,
    check_fields,
    check_person_metadata,
    checked_name,
    decode_images,
    enroll_input,
    form_text,
    json_body,
    metadata_limits,
    read_files,
    read_form,
    returnable,
)
from service.routes.gallery_openapi import BATCH_DOC, PERSON_DOC, SAMPLES_DOC, SEARCH_DOC
from service.routes.gallery_state import (
    Galleries,
    GalleryId,
    PersonId,
    SampleId,
    checked_id,
    lifespan,
    manager_of,
    store_call,
)

log = logging.getLogger("service")


router = APIRouter(prefix="/v1", tags=["galleries"], lifespan=lifespan)


# ============================================================================ helpers
def _gallery_out(manager: GalleryManager, record) -> GalleryOut:
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


def _person_out(p) -> PersonOut:
    metadata, error = p.metadata, getattr(p, "metadata_error", None)
    if error is None and not returnable(metadata):  # the store checked it; this is the last guard
        log.warning("gallery %s: person %s has metadata the response encoder refuses", p.gallery_id, p.id)
        metadata, error = {}, "metadata: stored value cannot be returned as JSON"
    return PersonOut(id=p.id, name=p.name, metadata=metadata, created_at=p.created_at, samples=p.samples,
                     metadata_error=error)


async def _offer(engine, images: list[bytes]) -> list[Offered]:
    """Every image through the pipeline (all faces, to count them); per-image input faults become
    refusals or errors, overload and shutdown fail the request."""
    quality = engine.calibration.quality_score if engine.calibration.quality_percentiles is not None else None
    ood_threshold = engine.ood.threshold if engine.ood is not None else None
    async with engine.admit():
        results = await asyncio.gather(
            *(engine.process(b, all_faces=True) for b in images), return_exceptions=True
        )
    offered = []
    for result in results:
        if isinstance(result, NoFaceError):
            offered.append(Offered(refusals=[Refusal(Reason.NO_FACE, "no face found in the image")]))
        elif isinstance(result, TooManyFacesError):
            offered.append(Offered(refusals=[Refusal(Reason.MULTIPLE_FACES, str(result))]))
        elif isinstance(result, DecodeError):
            offered.append(Offered(error=(result.code, str(result))))
        elif isinstance(result, BaseException):
            raise from_exception(result) or result
        else:
            offered.append(Offered(evidence=evidence_of(result, quality, ood_threshold)))
    return offered


def _enroll_response(request: Request, enrollment) -> EnrollResponse:
    results = []
    metrics = getattr(request.app.state, "metrics", None)
    for i, o in enumerate(enrollment.outcomes):
        results.append(
            ImageOutcome(
                index=i,
                status=o.status,
                reasons=[ReasonOut(**r.to_dict()) for r in o.refusals],
                sample_id=o.sample_id,
                measurements=o.measurements,
                duplicate_of=o.duplicate_of,
                error=None if o.error is None else {"code": o.error[0], "message": o.error[1]},
            )
        )
        if metrics is not None and hasattr(metrics, "gallery_samples"):
            metrics.gallery_samples.labels(outcome=o.status).inc()
            for r in o.refusals:
                metrics.gallery_refusals.labels(reason=r.reason.value).inc()
    enrolled = enrollment.enrolled
    return EnrollResponse(
        person=None if enrollment.person is None else _person_out(enrollment.person),
        created=enrollment.created,
        enrolled=enrolled,
        refused=sum(o.status != "enrolled" for o in enrollment.outcomes),
        results=results,
    )


def _refused_error(response: EnrollResponse) -> ApiError:
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


# ============================================================================ gallery routes
ERRORS = {s: ERROR_RESPONSES[s] for s in (401, 413, 415, 422, 429, 503)}
ERRORS.update(
    {
        404: {"model": ERROR_RESPONSES[401]["model"], "description": "no such gallery / person / sample"},
        409: {
            "model": ERROR_RESPONSES[401]["model"],
            "description": "name taken, or the gallery was built with another model (contract_mismatch)",
        },
    }
)


@router.post(
    "/galleries",
    status_code=201,
    response_model=GalleryOut,
    responses=ERRORS,
    summary="Create a gallery (pinned to the model in use)",
)
async def create_gallery(body: GalleryCreate, state: Galleries, _: ApiKey) -> GalleryOut:
    manager = await manager_of(state)
    config = GalleryConfig(
        policy=body.policy or EnrollmentPolicy(),
        target_fpir=body.target_fpir or (state.calibration.default_fpir if state.calibration else 0.01),
        match_threshold=body.match_threshold,
    )
    record = await store_call(manager.create, body.name, config)
    log.info("gallery %s created", record.id)
    return _gallery_out(manager, record)


@router.get("/galleries", response_model=GalleryList, responses=ERRORS, summary="List galleries")
async def list_galleries(state: Galleries, _: ApiKey) -> GalleryList:
    manager = await manager_of(state)
    records = await store_call(manager.store.list_galleries)
    return GalleryList(galleries=[_gallery_out(manager, r) for r in records])


@router.get("/galleries/{gallery_id}", response_model=GalleryOut, responses=ERRORS, summary="One gallery")
async def get_gallery(gallery_id: GalleryId, state: Galleries, _: ApiKey) -> GalleryOut:
    manager = await manager_of(state)
    return _gallery_out(manager, await store_call(manager.store.get_gallery, checked_id(gallery_id, "gallery")))


@router.patch(
    "/galleries/{gallery_id}",
    response_model=GalleryOut,
    responses=ERRORS,
    summary="Rename a gallery or change its policy / threshold",
)
async def update_gallery(gallery_id: GalleryId, body: GalleryUpdate, state: Galleries, _: ApiKey) -> GalleryOut:
    manager = await manager_of(state)
    record = await store_call(manager.store.get_gallery, checked_id(gallery_id, "gallery"))
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
        config = await store_call(GalleryConfig.model_validate, current)
    record = await store_call(manager.update, gallery_id, changes.get("name"), config)
    return _gallery_out(manager, record)


@router.delete(
    "/galleries/{gallery_id}",
    status_code=204,
    responses=ERRORS,
    summary="Delete a gallery with all its persons and samples",
)
async def delete_gallery(gallery_id: GalleryId, state: Galleries, _: ApiKey) -> Response:
    manager = await manager_of(state)
    await store_call(manager.store.delete_gallery, checked_id(gallery_id, "gallery"))
    log.info("gallery %s deleted", gallery_id)
    return Response(status_code=204)


# ============================================================================ persons
@router.post(
    "/galleries/{gallery_id}/persons",
    status_code=201,
    response_model=EnrollResponse,
    openapi_extra=PERSON_DOC,
    responses=ERRORS,
    summary="Enroll a new person with one or more photos",
    description="Multipart: `name`, optional `metadata` (JSON object), one or more `images` files; "
    "or JSON `{name, metadata?, images: [base64, ...]}`. Every photo passes the gallery's "
    "enrollment gate; refused ones are reported per image with reason codes. The person is "
    "created when at least one photo is accepted, else 422 `enrollment_refused`.",
)
async def create_person(
    gallery_id: GalleryId, request: Request, engine: EngineDep, state: Galleries, _: ApiKey
) -> EnrollResponse:
    gallery_id = checked_id(gallery_id, "gallery")
    manager = await manager_of(state)
    record = await store_call(manager.store.get_gallery, gallery_id)
    await store_call(manager.require_contract, record)  # before any image work
    images, name, metadata = await enroll_input(
        request, engine.settings.max_image_bytes, named=True, limits=metadata_limits(state.settings)
    )
    offered = await _offer(engine, images)
    enrollment = await store_call(manager.enroll, gallery_id, offered, None, name, metadata or {})
    response = _enroll_response(request, enrollment)
    if enrollment.person is None:
        raise _refused_error(response)
    log.info(
        "gallery %s: person %s enrolled with %d sample(s)",
        gallery_id,
        enrollment.person.id,
        response.enrolled,
    )
    return response


@router.post(
    "/galleries/{gallery_id}/persons/{person_id}/samples",
    response_model=EnrollResponse,
    openapi_extra=SAMPLES_DOC,
    responses=ERRORS,
    summary="Add photos to a person",
    description="Multipart: one or more `images` files; or JSON `{images: [base64, ...]}`. Same gate "
    "as enrollment; 422 `enrollment_refused` when none is accepted.",
)
async def add_samples(
    gallery_id: GalleryId, person_id: PersonId, request: Request, engine: EngineDep, state: Galleries, _: ApiKey
) -> EnrollResponse:
    gallery_id, person_id = checked_id(gallery_id, "gallery"), checked_id(person_id, "person")
    manager = await manager_of(state)
    record = await store_call(manager.store.get_gallery, gallery_id)
    await store_call(manager.require_contract, record)
    await store_call(manager.store.get_person, gallery_id, person_id)
    images, _name, _meta = await enroll_input(
        request, engine.settings.max_image_bytes, named=False, limits=metadata_limits(state.settings)
    )
    offered = await _offer(engine, images)
    enrollment = await store_call(manager.enroll, gallery_id, offered, person_id)
    response = _enroll_response(request, enrollment)
    if enrollment.enrolled == 0:
        raise _refused_error(response)
    return response


@router.post(
    "/galleries/{gallery_id}/enroll",
    response_model=BatchEnrollResponse,
    responses=ERRORS,
    openapi_extra=BATCH_DOC,
    summary="Batch enrollment: several persons, several photos each",
    description="JSON `{persons: [{name | person_id, metadata?, images: [base64, ...]}, ...]}` (at "
    f"most {MAX_IMAGES_PER_REQUEST} images in all). Persons are enrolled in order; each gets its "
    "own report (a person none of whose photos passes is not created).",
)
async def batch_enroll(
    gallery_id: GalleryId, request: Request, engine: EngineDep, state: Galleries, _: ApiKey
) -> BatchEnrollResponse:
    gallery_id = checked_id(gallery_id, "gallery")
    manager = await manager_of(state)
    record = await store_call(manager.store.get_gallery, gallery_id)
    await store_call(manager.require_contract, record)
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
            checked_id(p.person_id, "person")
            if p.metadata is not None:  # it would be dropped: metadata is set when a person is created
                raise ApiError(
                    422, "validation_error",
                    f"persons[{i}].metadata: metadata goes with `name` (a new person); change an existing "
                    f"person's metadata with PATCH /v1/galleries/{{gallery_id}}/persons/{{person_id}}",
                    {"index": i, "field": f"persons[{i}].metadata"},
                )
        else:
            checked_name(p.name, f"persons[{i}].name")
        check_person_metadata(p.metadata, metadata_limits(state.settings), f"persons[{i}].metadata")
    decoded = [
        decode_images(p.images, engine.settings.max_image_bytes, f"persons[{i}].images")
        for i, p in enumerate(body.persons)
    ]
    offered = await _offer(engine, [b for images in decoded for b in images])
    out, start = [], 0
    for p, images in zip(body.persons, decoded):
        mine, start = offered[start : start + len(images)], start + len(images)
        enrollment = await store_call(manager.enroll, gallery_id, mine, p.person_id, p.name, p.metadata or {})
        out.append(_enroll_response(request, enrollment))
    return BatchEnrollResponse(persons=out)


@router.get(
    "/galleries/{gallery_id}/persons",
    response_model=PersonList,
    responses=ERRORS,
    summary="List a gallery's persons",
)
async def list_persons(
    gallery_id: GalleryId,
    state: Galleries,
    _: ApiKey,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> PersonList:
    manager = await manager_of(state)
    gallery_id = checked_id(gallery_id, "gallery")
    record = await store_call(manager.store.get_gallery, gallery_id)
    persons = await store_call(manager.store.list_persons, gallery_id, limit, offset)
    return PersonList(
        persons=[_person_out(p) for p in persons], total=record.persons, limit=limit, offset=offset
    )


@router.get(
    "/galleries/{gallery_id}/persons/{person_id}",
    response_model=PersonDetail,
    responses=ERRORS,
    summary="One person with its samples",
)
async def get_person(gallery_id: GalleryId, person_id: PersonId, state: Galleries, _: ApiKey) -> PersonDetail:
    manager = await manager_of(state)
    gallery_id, person_id = checked_id(gallery_id, "gallery"), checked_id(person_id, "person")
    person = await store_call(manager.store.get_person, gallery_id, person_id)
    samples = await store_call(manager.store.list_samples, gallery_id, person_id)
    return PersonDetail(
        **_person_out(person).model_dump(),
        sample_list=[SampleOut(id=s.id, created_at=s.created_at, info=s.info) for s in samples],
    )


@router.patch(
    "/galleries/{gallery_id}/persons/{person_id}",
    response_model=PersonOut,
    responses=ERRORS,
    summary="Rename a person or replace its metadata",
)
async def update_person(
    gallery_id: GalleryId, person_id: PersonId, body: PersonUpdate, state: Galleries, _: ApiKey
) -> PersonOut:
    check_person_metadata(body.metadata, metadata_limits(state.settings))
    manager = await manager_of(state)
    person = await store_call(
        manager.store.update_person,
        checked_id(gallery_id, "gallery"),
        checked_id(person_id, "person"),
        body.name,
        body.metadata,
    )
    return _person_out(person)


@router.delete(
    "/galleries/{gallery_id}/persons/{person_id}",
    status_code=204,
    responses=ERRORS,
    summary="Delete a person and all its samples",
)
async def delete_person(gallery_id: GalleryId, person_id: PersonId, state: Galleries, _: ApiKey) -> Response:
    manager = await manager_of(state)
    await store_call(manager.store.delete_person, checked_id(gallery_id, "gallery"), checked_id(person_id, "person"))
    log.info("gallery %s: person %s deleted", gallery_id, person_id)
    return Response(status_code=204)


@router.delete(
    "/galleries/{gallery_id}/persons/{person_id}/samples/{sample_id}",
    status_code=204,
    responses=ERRORS,
    summary="Delete one sample of a person",
)
async def delete_sample(
    gallery_id: GalleryId, person_id: PersonId, sample_id: SampleId, state: Galleries, _: ApiKey
) -> Response:
    manager = await manager_of(state)
    await store_call(
        manager.store.delete_sample,
        checked_id(gallery_id, "gallery"),
        checked_id(person_id, "person"),
        checked_id(sample_id, "sample"),
    )
    return Response(status_code=204)


# ============================================================================ search


@router.post(
    "/galleries/{gallery_id}/search",
    response_model=SearchResponse,
    responses=ERRORS,
    openapi_extra=SEARCH_DOC,
    summary="Who is this? Open-set 1:N search",
    description="Multipart `image` [, `top_k`, `threshold`, `fpir`] or JSON. The largest face is "
    "searched; `decision` is `match` when the best person's similarity reaches the threshold "
    "(calibrated for the gallery's FPIR and size, unless the request gives `threshold` or "
    "`fpir`), else `unknown`.",
)
async def search(
    gallery_id: GalleryId, request: Request, engine: EngineDep, state: Galleries, _: ApiKey
) -> SearchResponse:
    gallery_id = checked_id(gallery_id, "gallery")
    manager = await manager_of(state)
    record = await store_call(manager.store.get_gallery, gallery_id)
    await store_call(manager.require_contract, record)
    if body_kind(request) == "multipart":
        form = await read_form(request, 1)
        try:
            check_fields(form, {"image", "top_k", "threshold", "fpir"})
            raw = {k: form_text(form, k) for k in ("top_k", "threshold", "fpir")}
            image = (await read_files(form, "image", 1, engine.settings.max_image_bytes))[0]
        finally:
            await form.close()
        try:
            body = SearchJSON.model_validate(  # form fields are text: converted, not strict
                {"image": "x", **{k: v for k, v in raw.items() if v not in (None, "")}}, strict=False
            )
        except ValidationError as exc:
            raise ApiError(
                422,
                "validation_error",
                "invalid search parameters",
                _validation_details(exc.errors(include_input=False)),
            ) from None
    else:
        body = await json_body(request, SearchJSON)
        image = _b64("image", body.image, engine.settings.max_image_bytes)
    if body.threshold is not None and body.fpir is not None:
        raise ApiError(422, "validation_error", "give `threshold` or `fpir`, not both")
    async with engine.admit():
        try:
            result = await engine.process(image)
        except Exception as exc:  # noqa: BLE001 - mapped to an API error, or re-raised
            raise from_exception(exc, "image") or exc
    found = await store_call(
        manager.search, gallery_id, result.faces[0].embedding, body.top_k, body.fpir, body.threshold
    )
    names = {}
    for c in found.candidates:
        with contextlib.suppress(NotFound):  # deleted between search and lookup: dropped below
            names[c.person_id] = await store_call(manager.store.get_person, gallery_id, c.person_id)
    candidates = [
        CandidateOut(
            person_id=c.person_id,
            name=names[c.person_id].name,
            similarity=c.similarity,
            sample_id=c.sample_id,
        )
        for c in found.candidates
        if c.person_id in names
    ]
    match = found.match if found.match is not None and found.match.person_id in names else None
    decision = "match" if match is not None else "unknown"
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and hasattr(metrics, "gallery_searches"):
        metrics.gallery_searches.labels(decision=decision).inc()
    return SearchResponse(
        decision=decision,
        person=None if match is None else _person_out(names[match.person_id]),
        similarity=candidates[0].similarity if candidates else None,
        threshold=found.decision.threshold,
        operating_point=OperatingPointOut(**found.decision.to_dict()),
        candidates=candidates,
        contract_id=engine.backend.contract.contract_id,
        image=image_report(engine, result),
    )
