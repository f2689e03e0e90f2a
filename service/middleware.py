"""The outermost layer of every HTTP request: request id, body-size limit, last-resort 500, timing.

A plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``: that one runs the app in a
separate task, which breaks streaming request bodies and swallows cancellation. Being inside
Starlette's ``ServerErrorMiddleware`` but outside the router, this layer sees every response
(404/405 from routing, 422 from validation, 500 from bugs) and can stamp ``X-Request-ID`` on each.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse

from service.errors import REQUEST_ID_HEADER, ApiError, envelope

log = logging.getLogger("service")

# A client's own request id is kept (for tracing across services) only if it is short and plain:
# it is echoed into headers and logs, so anything else is replaced.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body larger than the limit of {limit} bytes",
                    {"limit_bytes": limit})


class RequestContextMiddleware:
    def __init__(self, app, max_body: int, metrics=None) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics

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

        async def limited_receive():
            # Content-Length can be absent (chunked uploads), so the bytes are counted as they come.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
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


async def _empty_receive():
    return {"type": "http.request", "body": b"", "more_body": False}
