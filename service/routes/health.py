"""Liveness and readiness (no API key: orchestrators probe them) and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.schemas import Liveness, Readiness

router = APIRouter(tags=["health"])


@router.get("/v1/health/live", response_model=Liveness, summary="The process answers")
async def live() -> Liveness:
    return Liveness(status="alive")


@router.get(
    "/v1/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready; `checks` says what is missing"}},
    summary="Model loaded, provider active, warm-up done",
)
async def ready(request: Request) -> JSONResponse:
    engine = request.app.state.engine
    checks = engine.checks()
    ok = all(checks.values())
    metrics = request.app.state.metrics
    metrics.ready.set(1 if ok else 0)
    body = Readiness(status="ready" if ok else "not_ready", checks=checks,
                     detail=None if ok else engine.warmup_error)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    engine = request.app.state.engine
    m.ready.set(1 if all(engine.checks().values()) else 0)
    if engine._loaded:
        m.pending.set(engine.batcher.pending)
    return Response(m.render(), media_type=m.content_type)
