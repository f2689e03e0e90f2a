"""The application factory: ``create_app(settings)`` -> a FastAPI app with its model loaded.

The model is loaded in the factory, not lazily: a missing model, a GPU the strict device policy
cannot use or an OOD file of another model stops the start with its message, before a port is
opened. Warm-up then runs in the background (liveness answers, readiness waits for it). The lifespan
opens the galleries beside the engine (``service.galleries``) and closes both at shutdown.

``uvicorn --factory service.app:create_app`` works too (settings from the environment), but only
``facerec-serve`` applies the connection settings (deadlines, connection cap: service/server.py);
with plain uvicorn add ``--http service.server:BoundedH11Protocol`` for them at their defaults.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI

import facerec
from service.auth import ApiKeys
from service.engine import Engine
from service.errors import install_handlers
from service.galleries import Galleries
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware, install_access_log_redaction
from service.routes import ROUTERS
from service.routes.gallery_openapi import state_limits_in_openapi
from service.settings import Settings

log = logging.getLogger("service")

DESCRIPTION = """Face verification, quality and out-of-distribution scoring.

Images are sent as multipart files or base64 strings in JSON (never URLs or server paths).
Every `/v1` route except health needs the `X-API-Key` header. Every response carries
`X-Request-ID`; every error has the body `{"error": {"code", "message"}, "request_id"}`.

**What the OOD flag is not.** `ood.flagged` says a face crop is unlike the genuine face photos
the model was fitted on (a non-face, a heavily corrupted image, an adversarial perturbation). It
is **not presentation-attack (liveness) detection**: a printed photo, a screen replay or a mask of
a real face is a real face to it and is not flagged. Use a dedicated liveness check for that.
"""


def create_app(settings: Settings | None = None, announce_key: bool = True) -> FastAPI:
    settings = settings or Settings()
    install_access_log_redaction()  # API keys sent in a query string stay out of the access log
    metrics = Metrics()
    engine = Engine(settings, metrics)
    engine.load()
    keys = ApiKeys(settings.api_keys)
    if announce_key:
        keys.announce()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            # Beside the engine: the galleries' open-set calibration is checked against its model,
            # and a pgvector store is opened now (an unreachable database stops the start).
            galleries = app.state.galleries = Galleries(settings, engine, metrics)
            state_limits_in_openapi(app, galleries)
            await galleries.open()
            try:
                yield
            finally:
                galleries.close()
        finally:
            await engine.close()  # answers what is queued, then stops the batcher

    app = FastAPI(
        title="facerec",
        version=facerec.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # /docs is our own page without a CDN (service/routes/demo.py)
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.api_keys = keys
    install_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(RequestContextMiddleware, max_body=settings.max_request_bytes, metrics=metrics,
                       body_timeout_s=settings.body_timeout_s)
    return app
