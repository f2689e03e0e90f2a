"""The outermost layer of every HTTP request: request id, body-size limit, body deadline,
last-resort 500, timing.

A plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``: that one runs the app in a
separate task, which breaks streaming request bodies and swallows cancellation. Being inside
Starlette's ``ServerErrorMiddleware`` but outside the router, this layer sees every response
(404/405 from routing, 422 from validation, 500 from bugs) and can stamp ``X-Request-ID`` on each.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
import uuid

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from service.errors import REQUEST_ID_HEADER, ApiError, envelope

log = logging.getLogger("service")

# A client's own request id is kept (for tracing across services) only if it is short and plain:
# it is echoed into headers and logs, so anything else is replaced.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ReceiveError(ApiError, StarletteHTTPException):
    """An ApiError raised while the body is read. Also an HTTPException, because FastAPI turns any
    other exception raised while it reads a declared body into a 400 "error parsing the body";
    handlers are looked up along the MRO, so ours (ApiError) still writes the envelope."""

    def __init__(self, status: int, code: str, message: str, details=None, headers=None) -> None:
        ApiError.__init__(self, status, code, message, details, headers)
        self.status_code, self.detail = status, message


def too_slow(seconds: float) -> ApiError:
    # Connection: close makes uvicorn drop the connection after the answer instead of reading
    # (and discarding) the rest of a body that is arriving too slowly.
    return ReceiveError(408, "request_timeout", f"request body not received within {seconds:g} s "
                        "(FACEREC_BODY_TIMEOUT_S)", {"limit_s": seconds}, headers={"Connection": "close"})


def too_large(limit: int) -> ApiError:
    return ReceiveError(413, "payload_too_large", f"request body larger than the limit of {limit} bytes",
                        {"limit_bytes": limit})


class RequestContextMiddleware:
    def __init__(self, app, max_body: int, metrics=None, body_timeout_s: float | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        sent = {"started": False, "status": 500}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                sent["started"], sent["status"] = True, message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        received = 0
        body_done = False
        # The whole body must be in by this time (service/server.py closes connections whose
        # headers are slow; the body is bounded here so that a route waiting for it answers 408).
        body_deadline = None if self.body_timeout_s is None else asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited_receive():
            # Content-Length can be absent (chunked uploads), so the bytes are counted as they come.
            nonlocal received, body_done
            if body_done or body_deadline is None:
                message = await receive()  # after the body: waiting for a disconnect is not bounded
            else:
                try:
                    message = await _receive_by(receive, body_deadline)
                except asyncio.TimeoutError:
                    raise too_slow(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body:
                    raise too_large(self.max_body)
            return message

        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        try:
            if declared > self.max_body:  # refused before a byte of the body is read
                await self._reply(send_with_id, too_large(self.max_body), request_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        except ApiError as err:  # raised by limited_receive outside a route (rare)
            if not sent["started"]:
                await self._reply(send_with_id, err, request_id)
        except Exception:
            log.exception("unhandled error in request %s %s (request id %s)",
                          scope.get("method"), scope.get("path"), request_id)
            if self.metrics is not None:
                self.metrics.errors.labels(code="internal_error").inc()
            if not sent["started"]:
                err = ApiError(500, "internal_error",
                               f"internal error; quote request id {request_id} when reporting it")
                await self._reply(send_with_id, err, request_id)
        finally:
            if self.metrics is not None:
                route = scope.get("route")
                self.metrics.observe_request(
                    getattr(route, "path", "unmatched"), scope.get("method", ""), sent["status"],
                    time.perf_counter() - start,
                )

    async def _reply(self, send, err: ApiError, request_id: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(code=err.code).inc()
        response = JSONResponse(envelope(err.code, err.message, request_id, err.details),
                                status_code=err.status, headers=err.headers)
        await response({"type": "http"}, _empty_receive, send)


async def _receive_by(receive, deadline: float):
    """``receive()``, cancelled if it is still waiting at ``deadline`` (loop time). A message that is
    already buffered is returned even past the deadline: only a client that is slow counts."""
    if hasattr(asyncio, "timeout_at"):  # Python >= 3.11
        async with asyncio.timeout_at(deadline):
            return await receive()
    remaining = deadline - asyncio.get_running_loop().time()
    return await asyncio.wait_for(receive(), max(remaining, 1e-3))


async def _empty_receive():
    return {"type": "http.request", "body": b"", "more_body": False}


# ------------------------------------------------------------------------------ access log
# The service never reads credentials from the query string, but clients put keys there anyway
# (?api_key=..., ?jwt=..., ;token=...), and uvicorn logs the full target of every request. Guessing
# which names hold secrets misses some, so every value is redacted except those of the parameters
# the API defines (paging), which are harmless and useful in a log.
LOGGED_QUERY_PARAMETERS = frozenset({"offset", "limit"})
REDACTED = "[redacted]"
_SEPARATORS = re.compile(r"([&;])")


def redact_query(target: str) -> str:
    """``path?query`` with the value of every parameter but the API's own paging ones replaced
    (``&`` and ``;`` both separate parameters, as many servers accept)."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = _SEPARATORS.split(query)
    for i in range(0, len(parts), 2):  # even items are parameters, odd ones the separators
        name, eq, value = parts[i].partition("=")
        if value and urllib.parse.unquote_plus(name).lower() not in LOGGED_QUERY_PARAMETERS:
            parts[i] = f"{name}={REDACTED}"
        elif not eq and name and not name.isdigit():  # a bare ?SECRET without a name
            parts[i] = REDACTED
    return f"{path}?{''.join(parts)}"


class RedactAccessLog(logging.Filter):
    """On ``uvicorn.access``: its records carry (client, method, path?query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (args[0], args[1], redact_query(args[2]), args[3], args[4])
        return True


def install_access_log_redaction() -> None:
    """Once per process, whoever starts uvicorn (facerec-serve, ``uvicorn --factory``, tests):
    uvicorn's dictConfig keeps a logger's existing filters."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactAccessLog) for f in access.filters):
        access.addFilter(RedactAccessLog())
