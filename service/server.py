"""The HTTP server: uvicorn with every connection bounded in number and in time.

uvicorn (0.54, h11) on its own holds a connection that never finishes its request line and headers
for ever: no timer runs before the first request, and its keep-alive timer is cancelled by any byte
that arrives. Its ``limit_concurrency`` makes that worse, not better: it counts open connections, so
a few hundred slow ones get every other client a 503. This module closes those gaps in the protocol
itself, so the service is safe without a proxy in front:

- **header deadline**: a connection must deliver a complete request line and headers within
  ``header_timeout_s`` of opening (on a keep-alive connection: of the next request's first byte;
  an idle one is closed after ``keepalive_timeout_s``); otherwise it is closed;
- **body deadline**: the body must arrive within ``body_timeout_s`` of the headers. A route waiting
  for it answers 408 (``service.middleware``); a body nobody reads (say, after a 401) cannot keep
  trickling in either: the connection is closed at the deadline;
- **connection cap**: with ``max_connections`` connections open, a new request is answered 503
  ``too_many_connections`` (the service's error envelope) and its connection closed; beyond twice
  that many, new connections are closed at once, before reading anything, so sockets stay bounded;
- request-line + header size: ``max_header_bytes`` (h11 answers 400 beyond), idle keep-alive:
  ``keepalive_timeout_s``, listen backlog: ``backlog``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import REQUEST_ID_HEADER, envelope
from service.settings import Settings

log = logging.getLogger("service")


class _Throttled:
    """One log line per ``interval_s`` at most for an event that an attack repeats by the
    thousand (a slowloris wave would otherwise write a line per connection)."""

    def __init__(self, level: int, message: str, interval_s: float = 5.0) -> None:
        self.level, self.message, self.interval_s = level, message, interval_s
        self.last = -interval_s
        self.count = 0

    def __call__(self, *args) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            log.log(self.level, self.message + " (%d such connection(s) since the last report)",
                    *args, self.count)
            self.last, self.count = now, 0


_headers_late_log = _Throttled(logging.INFO, "closed a connection from %s: no complete request headers within %.1f s")
_body_late_log = _Throttled(logging.INFO, "closed a connection from %s: request body not complete within %.1f s")
_refused_log = _Throttled(logging.WARNING, "refused a connection from %s: %d connections open")


def _too_many_connections(limit: int):
    async def app(scope, receive, send) -> None:
        request_id = uuid.uuid4().hex
        body = json.dumps(envelope(
            "too_many_connections",
            f"the server has {limit} connections open (FACEREC_MAX_CONNECTIONS); retry later",
            request_id, {"limit": limit})).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"), (b"connection", b"close"),
            (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines and the connection cap above (set by
    ``protocol_class``)."""

    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # replaced by our own check (uvicorn's answers plain text)
        self._app = self.app
        self._refuse = _too_many_connections(self.max_connections)
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers", "body" (deadline running), "idle" or none
        self._body_late = False

    # ---------------------------------------------------------------- deadlines
    def _set_phase(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # a deadline runs from the start of its phase, not from the last byte
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        if phase == "headers":
            self._body_late = False
            self._timer = self.loop.call_later(self.header_timeout_s, self._headers_late)
        elif phase == "body":
            self._timer = self.loop.call_later(self.body_timeout_s, self._body_deadline)

    def _follow_request(self, response_ended: bool = False) -> None:
        """After h11 consumed bytes or a response ended: the deadline that applies now."""
        if self.transport.is_closing():
            self._set_phase(None)
            return
        state = self.conn.their_state
        if state is h11.IDLE and response_ended:
            # Idle keep-alive: uvicorn's keep-alive timer applies; the next request's header deadline
            # starts with its first byte.
            self._set_phase("idle")
            return
        # DONE: the request is in and the app's time is not limited here (admission bounds it).
        self._set_phase("headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None)

    def _headers_late(self) -> None:
        self._timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            _headers_late_log(_addr(self.client), self.header_timeout_s)
            self.transport.close()

    def _body_deadline(self) -> None:
        self._timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        self._body_late = True
        # A route reading the body answers 408 itself (middleware); one that answered without
        # reading it, or never reads it, must not let the client trickle bytes for ever.
        if self.cycle is None or self.cycle.response_complete:
            self._close_late_body()

    def _close_late_body(self) -> None:
        _body_late_log(_addr(self.client), self.body_timeout_s)
        self.transport.close()

    # ---------------------------------------------------------------- protocol hooks
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > 2 * self.max_connections:
            _refused_log(_addr(self.client), len(self.connections))
            transport.close()
            return
        self._set_phase("headers")

    def data_received(self, data: bytes) -> None:
        over = len(self.connections) > self.max_connections or len(self.tasks) >= self.max_connections
        self.app = self._refuse if over else self._app  # read by uvicorn when the request is parsed
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._body_late and self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self._close_late_body()
        self._follow_request(response_ended=True)

    def connection_lost(self, exc) -> None:
        self._set_phase(None)
        super().connection_lost(exc)


def _addr(client) -> str:
    return "%s:%d" % client if client else "?"


def protocol_class(settings: Settings) -> type[BoundedH11Protocol]:
    return type("FacerecH11Protocol", (BoundedH11Protocol,), {
        "max_connections": settings.max_connections,
        "header_timeout_s": settings.header_timeout_s,
        "body_timeout_s": settings.body_timeout_s,
    })


def uvicorn_config(app, settings: Settings, **kw) -> uvicorn.Config:
    """The uvicorn configuration of ``facerec-serve`` (tests start servers with the same one)."""
    return uvicorn.Config(
        app, host=settings.host, port=settings.port,
        http=protocol_class(settings),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keepalive_timeout_s,
        backlog=settings.backlog,
        # One worker process: the model, the batcher and the concurrency limits live in this process.
        timeout_graceful_shutdown=30,
        **kw,
    )
