"""What the routes share: the engine and gallery dependencies, the documented error answers, and
turning pipeline results into response objects."""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from fastapi import Depends, Request

from facerec.runtime import Face
from service.auth import ApiKey
from service.engine import Engine
from service.errors import ApiError
from service.galleries import Galleries
from service.schemas import (
    EmbedResponse,
    ErrorResponse,
    FaceBox,
    FaceReport,
    ImageReport,
    Ood,
    Quality,
    VerifiedImage,
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
        (422, "invalid input: schema, base64, image decoding, no face, too many faces, not_aligned, "
              "face_index_out_of_range, contract_mismatch, invalid_embedding"),
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


def verified_image(engine: Engine, result, index: int | None, aligned: bool) -> VerifiedImage:
    """The image report of a compared face, saying which face it was and by which rule."""
    rule = "aligned" if aligned else "largest" if index is None else "index"
    return VerifiedImage(**image_report(engine, result).model_dump(), face_index=index or 0, face_rule=rule)


def embed_response(engine: Engine, result) -> EmbedResponse:
    face = result.faces[0]
    return EmbedResponse(
        **image_report(engine, result).model_dump(), embedding=[float(v) for v in face.embedding],
        embedding_norm=float(face.embedding_norm), contract_id=engine.backend.contract.contract_id,
    )


def embedding_in(engine: Engine, values: list[float], contract_id: str, field: str) -> np.ndarray:
    """A client's embedding, checked, as float64 (not normalised here: ``cosine`` does it, as for the
    faces of images): 422 ``contract_mismatch`` when it was made by another model,
    ``invalid_embedding`` for a wrong length, non-finite values or a zero vector."""
    contract = engine.backend.contract
    if contract_id != contract.contract_id:
        raise ApiError(422, "contract_mismatch",
                       f"{field}: made under contract {contract_id!r}, this service's model is "
                       f"{contract.contract_id!r}; embeddings of different models are not comparable",
                       {"field": field, "contract_id": contract.contract_id})
    v = np.asarray(values, np.float64)
    if v.shape != (contract.embedding_size,):
        raise ApiError(422, "invalid_embedding", f"{field}: {v.size} values, this model's embeddings have "
                       f"{contract.embedding_size}", {"field": field, "expected": contract.embedding_size})
    norm = float(np.linalg.norm(v)) if np.isfinite(v).all() else math.nan
    if not math.isfinite(norm) or norm == 0.0:
        raise ApiError(422, "invalid_embedding", f"{field}: the values must be finite and not all zero",
                       {"field": field})
    return v


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity in float64, clipped to -1..1: the one formula of every comparison, so that
    verifying by embeddings gives exactly what verifying by images gives."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(min(1.0, max(-1.0, float((a / np.linalg.norm(a)) @ (b / np.linalg.norm(b))))))


def _box(face: Face) -> FaceBox:
    d = face.to_dict()
    score = None if math.isnan(d["det_score"]) else d["det_score"]  # NaN: no detection (aligned input)
    return FaceBox(box=d["box"], landmarks=d["landmarks"], score=score)


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
