"""What every gallery route shares: the app's gallery state (settings, open-set calibration, the
store opened lazily), the router's lifespan, store calls in the thread pool with their errors mapped
to API errors, and the path-parameter types."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi import Path as PathParam
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from facerec.contract import ContractMismatchError
from facerec.gallery import (
    AlreadyExists,
    GalleryManager,
    NotFound,
    OpenSetCalibration,
    StoreUnavailable,
    ThresholdRequired,
    open_store,
)
from facerec.gallery.openset import OPENSET_FILE
from facerec.gallery.store import ID_PATTERN, valid_id
from service.errors import ApiError, _validation_details
from service.routes.gallery_io import metadata_limits
from service.routes.gallery_openapi import openapi_for

log = logging.getLogger("service")


# ============================================================================ state and errors
class GalleryState:
    """The app's galleries: settings, the open-set calibration (loaded at start), the store (lazy)."""

    def __init__(self, app) -> None:
        self.settings = app.state.settings
        self.engine = app.state.engine
        self._manager: GalleryManager | None = None
        self._lock = threading.Lock()
        folder = self.engine.model_path if self.engine.model_path.is_dir() else self.engine.model_path.parent
        path = folder / OPENSET_FILE
        self.calibration = OpenSetCalibration.load(path) if path.exists() else None
        contract = self.engine.backend.contract
        if self.calibration is not None and self.calibration.contract_id != contract.contract_id:
            raise ContractMismatchError(
                f"{path} was calibrated for contract {self.calibration.contract_id}, the "
                f"model has {contract.contract_id}: run `facerec calibrate-openset`"
            )

    def sqlite_path(self) -> Path:
        if self.settings.gallery_path is not None:
            return Path(self.settings.gallery_path)
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "facerec" / "galleries.sqlite3"

    def manager(self) -> GalleryManager:
        with self._lock:
            if self._manager is None:
                s = self.settings
                if s.gallery_backend == "pgvector":
                    store = open_store("pgvector", dsn=s.gallery_dsn, purge=s.gallery_pg_purge)
                else:
                    store = open_store("sqlite", path=self.sqlite_path())
                self._manager = GalleryManager(store, self.engine.backend.contract, self.calibration)
                log.info("gallery store: %s", store.backend)
            return self._manager

    def close(self) -> None:
        with self._lock:
            if self._manager is not None:
                self._manager.store.close()
                self._manager = None


def _state_the_limits_in_openapi(app, state: GalleryState) -> None:
    """The schema at /openapi.json states this service's metadata limits and its model's calibrated
    FPIRs (FastAPI's documented way to extend the schema: replace ``app.openapi``)."""
    build = app.openapi
    fpirs = state.calibration.fpirs if state.calibration is not None else None

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_for(build(), metadata_limits(state.settings), fpirs)
        return app.openapi_schema

    app.openapi_schema = None
    app.openapi = openapi


@contextlib.asynccontextmanager
async def lifespan(app):
    state = app.state.galleries = GalleryState(app)
    _state_the_limits_in_openapi(app, state)
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None and not hasattr(metrics, "gallery_searches"):
        from prometheus_client import Counter

        metrics.gallery_searches = Counter(
            "facerec_gallery_searches",
            "gallery searches by decision",
            ["decision"],
            registry=metrics.registry,
        )
        metrics.gallery_samples = Counter(
            "facerec_gallery_samples",
            "photos offered for enrollment, by outcome",
            ["outcome"],
            registry=metrics.registry,
        )
        metrics.gallery_refusals = Counter(
            "facerec_gallery_refusals",
            "enrollment refusals by reason code",
            ["reason"],
            registry=metrics.registry,
        )
    if state.settings.gallery_backend == "pgvector":
        await run_in_threadpool(state.manager)  # an unreachable database stops the start
    try:
        yield
    finally:
        state.close()




def _map_error(exc: BaseException) -> ApiError | None:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NotFound):
        return ApiError(404, exc.code, str(exc))
    if isinstance(exc, AlreadyExists):
        return ApiError(409, exc.code, str(exc))
    if isinstance(exc, ContractMismatchError):
        return ApiError(409, "contract_mismatch", str(exc))
    if isinstance(exc, ThresholdRequired):
        return ApiError(422, "threshold_required", str(exc))
    if isinstance(exc, StoreUnavailable):
        return ApiError(503, exc.code, str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, ValidationError):
        return ApiError(
            422,
            "validation_error",
            "invalid gallery settings",
            _validation_details(exc.errors(include_input=False)),
        )
    if isinstance(exc, ValueError):
        return ApiError(422, "validation_error", str(exc))
    return None


async def store_call(fn, *args, **kw):
    """A blocking gallery call in the thread pool, its errors as API errors."""
    try:
        return await run_in_threadpool(fn, *args, **kw)
    except Exception as exc:  # noqa: BLE001 - mapped to an API error, or re-raised as is
        raise (_map_error(exc) or exc) from None


def get_galleries(request: Request) -> GalleryState:
    return request.app.state.galleries


Galleries = Annotated[GalleryState, Depends(get_galleries)]


def _path_id(what: str):
    return Annotated[str, PathParam(pattern=ID_PATTERN, description=f"the {what}'s id: 32 hexadecimal digits")]


# The schema states the id format, so a malformed id is refused by validation (422) like any other
# schema violation; an unknown well-formed id is the store's 404.
GalleryId, PersonId, SampleId = _path_id("gallery"), _path_id("person"), _path_id("sample")


async def manager_of(state: GalleryState) -> GalleryManager:
    return await store_call(state.manager)


def checked_id(value: str, what: str) -> str:
    """A well-formed id (32 hex digits) or 422; an unknown well-formed id is the store's 404."""
    if not valid_id(value):
        raise ApiError(
            422, "validation_error", f"{what}_id must be 32 hexadecimal digits", {"field": f"{what}_id"}
        )
    return value
