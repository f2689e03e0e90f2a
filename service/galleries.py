"""The service's galleries (1:N identification), opened beside the engine by the app's lifespan.

``Galleries`` holds what every gallery route shares: the settings, the model's open-set calibration
(``openset.json``, checked against the model's contract at start), the store, and the gallery
metrics. The store is opened at start for pgvector (a wrong DSN stops the start) and at the first
gallery request for SQLite (a service that never uses galleries creates no file). Store calls block
(SQLite, PostgreSQL), so they run in the thread pool, and the library's errors come back as API
errors. The logic lives in :mod:`facerec.gallery`; the routes only turn requests and answers into
JSON. Embeddings are never logged and never returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from facerec.contract import ContractMismatchError
from facerec.gallery import (
    AlreadyExists,
    Candidate,
    Decision,
    Enrollment,
    GalleryManager,
    IndexPolicy,
    GalleryRecord,
    NotFound,
    Offered,
    OpenSetCalibration,
    PersonRecord,
    Reason,
    Refusal,
    StoreUnavailable,
    ThresholdRequired,
    default_sqlite_path,
    open_store,
)
from facerec.gallery.measure import evidence_of
from facerec.runtime import DecodeError, NoFaceError, TooManyFacesError
from service.engine import Engine
from service.errors import ApiError, from_exception, validation_error
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("service")


@dataclass
class Identified:
    """A search's answer, its candidates paired with their persons (a person deleted between the
    search and the lookup is dropped, and is then no match either)."""

    decision: str  # match | unknown
    person: PersonRecord | None
    candidates: list[tuple[Candidate, PersonRecord]]
    operating_point: Decision


class Galleries:
    """The app's galleries: settings, open-set calibration (loaded at start), the store (opened by
    ``open`` for pgvector, lazily for SQLite), closed by ``close``."""

    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self._manager: GalleryManager | None = None
        self._lock = threading.Lock()
        path = engine.bundle.openset_path
        self.calibration = OpenSetCalibration.load(path) if path.exists() else None
        contract = engine.backend.contract
        if self.calibration is not None and self.calibration.contract_id != contract.contract_id:
            raise ContractMismatchError(
                f"{path} was calibrated for contract {self.calibration.contract_id}, the "
                f"model has {contract.contract_id}: run `facerec calibrate-openset`"
            )

    # ------------------------------------------------------------------ lifecycle
    def sqlite_path(self) -> Path:
        if self.settings.gallery_path is not None:
            return Path(self.settings.gallery_path)
        return default_sqlite_path()

    def manager(self) -> GalleryManager:
        with self._lock:
            if self._manager is None:
                s = self.settings
                if s.gallery_backend == "pgvector":
                    store = open_store("pgvector", dsn=s.gallery_dsn, purge=s.gallery_pg_purge)
                else:
                    policy = IndexPolicy(kind=s.gallery_index, min_samples=s.gallery_index_min_samples,
                                         ef_search=s.gallery_index_ef_search,
                                         target_recall=s.gallery_index_recall)
                    store = open_store("sqlite", path=self.sqlite_path(), index=policy)
                self._manager = GalleryManager(store, self.engine.backend.contract, self.calibration)
                log.info("gallery store: %s", store.backend)
            return self._manager

    async def open(self) -> None:
        """At start: a pgvector store is opened now, so an unreachable database stops the start."""
        if self.settings.gallery_backend == "pgvector":
            await run_in_threadpool(self.manager)

    def close(self) -> None:
        with self._lock:
            if self._manager is not None:
                self._manager.store.close()
                self._manager = None

    # ------------------------------------------------------------------ store calls
    async def call(self, fn, *args, **kw):
        """A blocking gallery call in the thread pool, its errors as API errors."""
        try:
            return await run_in_threadpool(fn, *args, **kw)
        except Exception as exc:  # noqa: BLE001 - mapped to an API error, or re-raised as is
            raise (_api_error(exc) or exc) from None

    async def get_manager(self) -> GalleryManager:
        """The manager, its store opened now if it is not yet (503 when it cannot be)."""
        return await self.call(self.manager)

    async def gallery(self, gallery_id: str, usable: bool = False) -> tuple[GalleryManager, GalleryRecord]:
        """The manager and the gallery's record (404 when there is none); ``usable``: and the
        gallery was built with the served model (409 ``contract_mismatch`` before any image work)."""
        manager = await self.get_manager()
        record = await self.call(manager.store.get_gallery, gallery_id)
        if usable:
            await self.call(manager.require_contract, record)
        return manager, record

    async def enroll(self, manager: GalleryManager, gallery_id: str, offered: list[Offered],
                     person_id: str | None = None, name: str | None = None, metadata: dict | None = None
                     ) -> Enrollment:
        """Gate and store the photos (for ``person_id``, or a new person ``name``); counts the outcomes."""
        enrollment = await self.call(manager.enroll, gallery_id, offered, person_id, name, metadata or {})
        if self.metrics is not None:
            for o in enrollment.outcomes:
                self.metrics.gallery_samples.labels(outcome=o.status).inc()
                for r in o.refusals:
                    self.metrics.gallery_refusals.labels(reason=r.reason.value).inc()
        return enrollment

    async def identify(self, manager: GalleryManager, gallery_id: str, embedding, top_k: int,
                       fpir: float | None, threshold: float | None) -> Identified:
        found = await self.call(manager.search, gallery_id, embedding, top_k, fpir, threshold)
        persons = {}
        for c in found.candidates:
            with contextlib.suppress(NotFound):  # deleted between search and lookup: dropped below
                persons[c.person_id] = await self.call(manager.store.get_person, gallery_id, c.person_id)
        match = found.match if found.match is not None and found.match.person_id in persons else None
        decision = "match" if match is not None else "unknown"
        if self.metrics is not None:
            self.metrics.gallery_searches.labels(decision=decision).inc()
        return Identified(
            decision=decision,
            person=None if match is None else persons[match.person_id],
            candidates=[(c, persons[c.person_id]) for c in found.candidates if c.person_id in persons],
            operating_point=found.decision,
        )

    # ------------------------------------------------------------------ photos
    async def offer(self, images: list[bytes]) -> list[Offered]:
        """Every image through the pipeline (all faces, to count them); per-image input faults become
        refusals or errors, overload and shutdown fail the request."""
        engine = self.engine
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


def _api_error(exc: BaseException) -> ApiError | None:
    """The API error for a gallery exception, or None when it is a server fault."""
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
        return validation_error(exc, "invalid gallery settings")
    if isinstance(exc, ValueError):
        return ApiError(422, "validation_error", str(exc))
    return None
