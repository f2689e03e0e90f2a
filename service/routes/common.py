"""What the routes share: the engine and gallery dependencies, the documented error answers, and
turning pipeline results into response objects."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from facerec.runtime import Face
from service.auth import ApiKey
from service.engine import Engine
from service.errors import ApiError
from service.galleries import Galleries
from service.schemas import (
    ErrorResponse,
    FaceBox,
    FaceReport,
    ImageReport,
    Ood,
    Quality,
)


def get_engine(request: Request, _: ApiKey) -> Engine:
    # The key is checked first (a sub-dependency runs before this one, and FastAPI runs it once per
    # request): a client without a key learns nothing, not even that the model is warming up.
    engine: Engine = request.app.state.engine
    if not engine.ready:
        # The warm-up exception's text stays in the log: it can name server paths.
        detail = "warm-up failed (the server log says why)" if engine.warmup_error else "the model is warming up"
        raise ApiError(503, "not_ready", f"not ready: {detail}", headers={"Retry-After": "2"})
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def get_galleries(request: Request) -> Galleries:
    return request.app.state.galleries


GalleriesDep = Annotated[Galleries, Depends(get_galleries)]

# Documented error answers of every image route (the envelope; see service.errors).
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (401, "missing or invalid API key"),
        (413, "body or image larger than the limits"),
        (415, "neither multipart/form-data nor JSON"),
        (422, "invalid input: schema, base64, image decoding, no face, too many faces"),
        (429, "overloaded: retry after Retry-After seconds"),
        (503, "not ready (warming up) or shutting down"),
    )
}


def face_report(engine: Engine, face: Face) -> FaceReport:
    return FaceReport(face=_box(face), quality=_quality(engine, face), ood=_ood(engine, face))


def image_report(engine: Engine, result) -> ImageReport:
    face = result.faces[0]
    return ImageReport(face=_box(face), faces_found=result.faces_found, quality=_quality(engine, face),
                       ood=_ood(engine, face))


def _box(face: Face) -> FaceBox:
    d = face.to_dict()
    return FaceBox(box=d["box"], landmarks=d["landmarks"], score=d["det_score"])


def _quality(engine: Engine, face: Face) -> Quality | None:
    if face.quality is None:
        return None
    return Quality(score=engine.calibration.quality_score(face.quality), raw=float(face.quality),
                   method=engine.quality_method)


def _ood(engine: Engine, face: Face) -> Ood | None:
    if engine.ood is None or face.ood is None:
        return None
    score = float(face.ood)
    threshold = engine.ood.threshold
    flagged = None if threshold is None else bool(score < threshold)
    if engine.metrics is not None:
        engine.metrics.ood.labels(flagged=str(flagged).lower()).inc()
    return Ood(score=score, threshold=threshold, flagged=flagged)
