"""POST /v1/verify: are two faces the same person? Each side is a photo (its largest face, or the
face the request picks by index), an aligned crop, or an embedding the client kept."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.auth import ApiKey
from service.errors import ApiError
from service.inputs import read_images, request_body_doc
from service.routes.common import ERROR_RESPONSES, EngineDep, cosine, embedding_in, verified_image
from service.schemas import OperatingPoint, VerifyJSON, VerifyResponse

router = APIRouter(prefix="/v1", tags=["verification"])
FIELDS = ("image_a", "image_b")
OPTIONS = ("threshold", "face_a", "face_b", "aligned")


@router.post(
    "/verify",
    response_model=VerifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_doc(VerifyJSON, FIELDS, OPTIONS),
    summary="Verify two faces",
    description="Multipart files `image_a`, `image_b` (optional form fields `threshold`, `face_a`, "
    "`face_b`, `aligned`), or JSON with base64 strings. Each image's largest face is compared unless "
    "`face_a`/`face_b` picks another by its index in /v1/detect's order; each image object says "
    "which (`face_index`, `face_rule`) and how many were found. In JSON a side may instead be an "
    "embedding the client kept (`embedding_a`/`embedding_b` with its `contract_id`): the answer is "
    "the one the images would give. `match` is similarity >= threshold.",
)
async def verify(request: Request, engine: EngineDep, _: ApiKey) -> VerifyResponse:
    parsed = await read_images(request, FIELDS, VerifyJSON, engine.settings.max_image_bytes, OPTIONS)
    body: VerifyJSON = parsed.body
    cal = engine.calibration
    if parsed.threshold is not None:
        threshold, point = parsed.threshold, OperatingPoint(far=None, calibrated_on=None, source="request")
    elif cal.threshold is not None:
        threshold = cal.threshold
        point = OperatingPoint(far=cal.far, calibrated_on=cal.calibrated_on, source=cal.source)
    else:
        raise ApiError(422, "threshold_required", "this model has no calibrated verification threshold: "
                       "pass `threshold` in the request (or set FACEREC_VERIFY_THRESHOLD)")
    # Embeddings are checked before any image work: a wrong vector costs no detection.
    given = {f"image_{s}": embedding_in(engine, getattr(body, f"embedding_{s}"), body.contract_id, f"embedding_{s}")
             for s in "ab" if getattr(body, f"embedding_{s}") is not None}
    indexes = {"image_a": body.face_a, "image_b": body.face_b}
    results = {}
    if parsed.images:
        async with engine.admit():
            results = await engine.process_many(parsed.images, aligned=body.aligned, indexes=indexes)
    vectors = {**given, **{name: r.faces[0].embedding for name, r in results.items()}}
    similarity = cosine(vectors["image_a"], vectors["image_b"])
    match = similarity >= threshold
    decision = "match" if match else "no_match"
    if engine.metrics is not None:
        engine.metrics.decisions.labels(decision=decision).inc()
    reports = {name: verified_image(engine, r, indexes[name], body.aligned) for name, r in results.items()}
    return VerifyResponse(
        similarity=similarity, threshold=threshold, match=match, decision=decision,
        operating_point=point, contract_id=engine.backend.contract.contract_id,
        image_a=reports.get("image_a"), image_b=reports.get("image_b"),
    )
