"""One error envelope for every failure: ``{"error": {"code", "message"[, "details"]}, "request_id"}``.

FastAPI's own 404/405/422 answers and Starlette's HTTP exceptions are rerouted through the same
envelope, so clients parse exactly one error shape. Runtime exceptions of the inference engine
(typed pipeline errors, ``Overloaded``) are mapped to status codes in ``from_exception`` in one
place. Unexpected exceptions never reach clients with their text (it can hold paths or data); they
get ``internal_error`` and the request id to quote, and the log has the traceback.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from facerec.runtime import (
    BatcherClosed,
    FaceIndexError,
    Overloaded,
    PipelineError,
    TooManyFacesError,
)

REQUEST_ID_HEADER = "X-Request-ID"

# Status -> code for HTTP errors raised by the framework itself (routing, methods).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "overloaded",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An error with its HTTP status, stable code and a message meant for the client."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def request_id_of(request_or_scope) -> str:
    scope = request_or_scope if isinstance(request_or_scope, dict) else request_or_scope.scope
    return scope.get("state", {}).get("request_id", "")


def envelope(code: str, message: str, request_id: str, details: Any = None) -> dict:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error, "request_id": request_id}


def error_response(err: ApiError, request_id: str, request: Request | None = None) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None) if request is not None else None
    if metrics is not None:
        metrics.errors.labels(code=err.code).inc()
    return JSONResponse(
        envelope(err.code, err.message, request_id, err.details),
        status_code=err.status,
        headers={**err.headers, REQUEST_ID_HEADER: request_id},
    )


def from_exception(exc: BaseException, field: str | None = None) -> ApiError | None:
    """The ApiError for an engine exception, or None when it is a server fault."""
    where = f"{field}: " if field else ""
    details = {"field": field} if field else None
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, TooManyFacesError):
        return ApiError(422, exc.code, where + str(exc), {**(details or {}), "faces_found": exc.found,
                                                          "limit": exc.limit})
    if isinstance(exc, FaceIndexError):
        return ApiError(422, exc.code, where + str(exc), {**(details or {}), "faces_found": exc.found,
                                                          "index": exc.index})
    if isinstance(exc, PipelineError):  # decode_error, no_face, not_aligned: the caller's input
        return ApiError(422, exc.code, where + str(exc), details)
    if isinstance(exc, Overloaded):
        # Retry-After takes whole seconds; rounding up keeps clients from retrying too early.
        retry = max(1, math.ceil(exc.retry_after_s))
        return ApiError(429, "overloaded", str(exc), {"retry_after_s": round(exc.retry_after_s, 3)},
                        {"Retry-After": str(retry)})
    if isinstance(exc, BatcherClosed):
        return ApiError(503, "shutting_down", "the service is shutting down", None, {"Retry-After": "5"})
    return None


def _validation_details(errors) -> list[dict]:
    # Only location, message and type: the offending input itself is not echoed back (it can be a
    # multi-megabyte base64 string).
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def validation_error(exc: ValidationError, message: str) -> ApiError:
    """422 ``validation_error`` for a pydantic model a route validates itself, its details without
    the input."""
    return ApiError(422, "validation_error", message, _validation_details(exc.errors(include_input=False)))


def json_error(exc: BaseException, what: str = "the body") -> ApiError:
    """422 ``invalid_json`` for a parse failure of ``json.loads`` (any of the exceptions it raises)."""
    if isinstance(exc, RecursionError):
        reason = "nested too deeply"
    elif isinstance(exc, UnicodeDecodeError):
        reason = "not UTF-8 encoded"
    else:
        reason = str(exc)[:200]
    field = None if what == "the body" else {"field": what}
    return ApiError(422, "invalid_json", f"{what} is not valid JSON ({reason})", field)


def _body_error(exc: StarletteHTTPException) -> ApiError | None:
    """FastAPI answers 400 "There was an error parsing the body" for any exception its JSON parse
    raises besides a syntax error: a body over the size limit (our ApiError from the middleware's
    receive), bytes that are not UTF-8, nesting beyond the decoder's recursion limit. Each has its
    own documented answer."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, ApiError):
        return cause
    if isinstance(cause, (ValueError, RecursionError)):  # UnicodeDecodeError is a ValueError
        return json_error(cause)
    return None


# The methods probed for an Allow header, in the order it lists them.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of this path answers. Starlette's own 405 lists only the methods of
    the first route whose path matched, but one path (``/v1/galleries/{id}``) has several routes.
    Each method is probed through the routes' public ``matches``, so included routers count too."""
    from starlette.routing import Match

    routes = request.app.router.routes
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in routes):
            allowed.append(method)
    return allowed


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc, request_id_of(request), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = _body_error(exc)
        if err is None:
            code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
            message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
            if exc.status_code == 404 and message == "Not Found":
                message = f"no route {request.url.path}"
            headers = dict(exc.headers or {})
            if exc.status_code == 405:
                allowed = allowed_methods(request)
                headers["Allow"] = ", ".join(allowed)
                message = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
            err = ApiError(exc.status_code, code, message, headers=headers)
        return error_response(err, request_id_of(request), request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):  # same code as the routes that parse
            err = ApiError(422, "invalid_json", "the body is not valid JSON", _validation_details(errors))
        else:
            details = _validation_details(errors)
            first = details[0] if details else {}
            where = ".".join(str(part) for part in first.get("loc", []))
            summary = f": {where}: {first.get('msg')}" if first else ""
            err = ApiError(422, "validation_error", f"the request does not match the API schema{summary}",
                           details)
        return error_response(err, request_id_of(request), request)

    async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)  # maps every kind registered below
        return error_response(err, request_id_of(request), request)

    for kind in (PipelineError, Overloaded, BatcherClosed):
        app.add_exception_handler(kind, _engine_error)
