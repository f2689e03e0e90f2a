"""POST /v1/verify: are the largest faces of two photos the same person?"""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.auth import ApiKey
from service.errors import ApiError
from service.inputs import read_images, request_body_doc
from service.routes.common import ERROR_RESPONSES, EngineDep, image_report
from service.schemas import OperatingPoint, VerifyJSON, VerifyResponse

router = APIRouter(prefix="/v1", tags=["verification"])
FIELDS = ("image_a", "image_b")


@router.post(
    "/verify",
    response_model=VerifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_doc(VerifyJSON, FIELDS, threshold=True),
    summary="Verify two face photos",
    description="Multipart files `image_a`, `image_b` (optional form field `threshold`), or JSON with "
    "base64 strings. The largest face of each image is compared; `match` is similarity >= threshold.",
)
async def verify(request: Request, engine: EngineDep, _: ApiKey) -> VerifyResponse:
    parsed = await read_images(request, FIELDS, VerifyJSON, engine.settings.max_image_bytes)
    cal = engine.calibration
    if parsed.threshold is not None:
        threshold, point = parsed.threshold, OperatingPoint(far=None, calibrated_on=None, source="request")
    elif cal.threshold is not None:
        threshold = cal.threshold
        point = OperatingPoint(far=cal.far, calibrated_on=cal.calibrated_on, source=cal.source)
    else:
        raise ApiError(422, "threshold_required", "this model has no calibrated verification threshold: "
                       "pass `threshold` in the request (or set FACEREC_VERIFY_THRESHOLD)")
    async with engine.admit():
        results = await engine.process_many(parsed.images)
    a, b = results["image_a"].faces[0], results["image_b"].faces[0]
    similarity = float(min(1.0, max(-1.0, float(a.embedding @ b.embedding))))
    match = similarity >= threshold
    decision = "match" if match else "no_match"
    if engine.metrics is not None:
        engine.metrics.decisions.labels(decision=decision).inc()
    return VerifyResponse(
        similarity=similarity, threshold=threshold, match=match, decision=decision,
        operating_point=point, contract_id=engine.backend.contract.contract_id,
        image_a=image_report(engine, results["image_a"]), image_b=image_report(engine, results["image_b"]),
    )
