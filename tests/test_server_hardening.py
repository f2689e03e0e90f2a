"""The server's own defences (issue 16, items 7, 8, 10 and the extras): deadlines on slow headers
and slow bodies and the connection cap, on a real uvicorn server on 127.0.0.1 (service/server.py);
the key checked before readiness; API keys in query strings kept out of the access log; no server
paths in answers; 429 messages that name the limit hit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("pydantic_settings")
httpx = pytest.importorskip("httpx")
import uvicorn
from fastapi.testclient import TestClient

from facerec.runtime import Overloaded
from service.app import create_app
from service.middleware import RedactAccessLog, redact_query
from service.server import uvicorn_config
from service.settings import Settings
from service.testing import SAMPLES, shared_model_dir, wait_ready

pytestmark = pytest.mark.timeout(120)

KEY = "hardening-key-0123456789abc"
H = {"X-API-Key": KEY}
A1 = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg").read_bytes()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_model_dir(tmp_path_factory)


@contextlib.contextmanager
def live_server(model_dir, tmp_path, log_config=None, **overrides):
    """facerec's uvicorn configuration (service.server) in a thread, on a socket bound to a free port;
    yields the base URL once /v1/health/ready answers 200."""
    settings = Settings(model=model_dir, api_keys=[KEY], device="cpu", warmup=False,
                        gallery_path=tmp_path / "g.sqlite3", **overrides)
    app = create_app(settings, announce_key=False)
    config = uvicorn_config(app, settings, log_config=log_config, log_level="info")
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            wait_ready(client.get, timeout_s=60, interval_s=0.02, retry_on=(httpx.TransportError,))
        yield base, settings
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


def _connect(base: str, timeout: float = 10.0) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=timeout)
    return s


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes | None = None) -> tuple[float, bytes]:
    """Wait (bounded) until the server closes ``sock``, sending one ``trickle`` byte every 0.1 s, as a
    slowloris client does; returns (seconds until closed, everything the server sent)."""
    start = time.monotonic()
    received = b""
    sock.settimeout(0.1)
    while time.monotonic() - start < seconds:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                return time.monotonic() - start, received
            received += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - start, received
        if trickle is not None:
            try:
                sock.sendall(trickle)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start, received
    raise AssertionError(f"connection still open after {seconds} s; received {received[:200]!r}")


def _read_one(sock: socket.socket) -> bytes:
    """One whole response (headers + Content-Length body) from a keep-alive connection."""
    sock.settimeout(10)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {raw!r}"
        raw += chunk
    _, headers, body = _response(raw)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-body: {raw!r}"
        body += chunk
        raw += chunk
    return raw


def _response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


# ------------------------------------------------------------------------------ item 7: deadlines
@pytest.fixture(scope="module")
def slow_server(model_dir, tmp_path_factory):
    with live_server(model_dir, tmp_path_factory.mktemp("slow"), header_timeout_s=0.5,
                     body_timeout_s=1.0) as (base, settings):
        yield base, settings


def test_slow_headers_are_cut_at_the_header_deadline(slow_server):
    base, s = slow_server
    with _connect(base) as sock:
        sock.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\n")
        elapsed, got = _closed_within(sock, 10, trickle=b"X")  # a header that never ends
    assert got == b""  # closed, nothing answered
    assert s.header_timeout_s * 0.8 <= elapsed < s.header_timeout_s + 3, elapsed
    # An idle connection that sends nothing at all is cut the same way.
    with _connect(base) as sock:
        elapsed, got = _closed_within(sock, 10)
    assert got == b"" and elapsed < s.header_timeout_s + 3, elapsed


def test_keepalive_connection_gets_a_fresh_header_deadline_per_request(slow_server):
    base, s = slow_server
    with _connect(base) as sock:
        sock.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(_read_one(sock))[0] == 200
        # Idle between requests, the keep-alive timeout applies (5 s here), not the header deadline.
        sock.settimeout(3 * s.header_timeout_s)
        with pytest.raises(TimeoutError):
            assert sock.recv(1) != b"", "closed while idle before the keep-alive timeout"
        sock.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(_read_one(sock))[0] == 200
        sock.sendall(b"GET /v1/health/live HTTP/1.1\r\n")  # the third request stalls
        elapsed, got = _closed_within(sock, 10, trickle=b"Y")
    assert got == b"" and elapsed < s.header_timeout_s + 3, elapsed


def test_slow_body_read_by_a_route_answers_408_and_closes(slow_server):
    base, s = slow_server
    head = (f"POST /v1/verify HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n").encode()
    with _connect(base) as sock:
        sock.sendall(head + b'{"image_a": "')
        elapsed, got = _closed_within(sock, 10, trickle=b"A")
    status, headers, body = _response(got)
    assert status == 408
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "FACEREC_BODY_TIMEOUT_S" in error["message"]
    assert headers["connection"] == "close" and headers["x-request-id"]
    assert s.body_timeout_s * 0.8 <= elapsed < s.body_timeout_s + 3, elapsed


def test_unread_body_cannot_trickle_after_the_answer(slow_server):
    """No key: the route answers 401 without reading the body; the client keeps sending it slowly.
    uvicorn alone would read and discard it for as long as it came; the body deadline closes it."""
    base, s = slow_server
    head = b"POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    with _connect(base) as sock:
        sock.sendall(head + b"{")
        elapsed, got = _closed_within(sock, 10, trickle=b" ")
    status, _, body = _response(got)
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    assert s.body_timeout_s * 0.8 <= elapsed < s.body_timeout_s + 3, elapsed


def test_oversized_headers_answer_400_and_close(slow_server):
    base, s = slow_server
    with _connect(base) as sock:
        sock.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (s.max_header_bytes + 1024))
        _, got = _closed_within(sock, 10)
    assert _response(got)[0] == 400  # the header deadline closes without an answer: this is the size check


def test_requests_within_the_deadlines_are_served(slow_server):
    base, _ = slow_server
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/v1/quality", files={"image": A1}, headers=H)
        assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------ item 7: connection cap
def test_connection_cap_answers_503_then_recovers(model_dir, tmp_path):
    cap = 3
    with live_server(model_dir, tmp_path, max_connections=cap, header_timeout_s=30,
                     keepalive_timeout_s=60) as (base, _):
        held = []
        try:
            for _ in range(cap):  # keep-alive connections, each with one request answered
                sock = _connect(base)
                sock.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _response(_read_one(sock))[0] == 200
                held.append(sock)
            with _connect(base) as extra:
                extra.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                _, got = _closed_within(extra, 10)
            status, headers, body = _response(got)
            assert status == 503 and headers["connection"] == "close" and headers["retry-after"] == "1"
            error = json.loads(body)["error"]
            assert error["code"] == "too_many_connections" and error["details"] == {"limit": cap}
            # Beyond twice the cap a connection is closed before anything is read.
            idle = [_connect(base) for _ in range(cap)]  # connections cap+1 .. 2*cap
            held += idle
            with _connect(base) as over:
                over.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                _, got = _closed_within(over, 10)
            assert got == b""
        finally:
            for sock in held:
                sock.close()
        # Once they are gone, requests are served again (the server notices closes asynchronously).
        with httpx.Client(base_url=base, timeout=10) as client:
            wait_ready(client.get, timeout_s=30, interval_s=0.02, retry_on=(httpx.TransportError,))
            assert client.get("/v1/health/live").status_code == 200


# ------------------------------------------------------------------------------ item 8: auth first
def test_unauthenticated_request_during_warmup_gets_401(model_dir, tmp_path):
    settings = Settings(model=model_dir, api_keys=[KEY], device="cpu", gallery_path=tmp_path / "g.sqlite3")
    app = create_app(settings, announce_key=False)
    engine = app.state.engine
    gate = threading.Event()
    warm_up = engine.warm_up

    def held_warm_up():
        assert gate.wait(60), "the test never released warm-up"
        warm_up()

    engine.warm_up = held_warm_up  # Engine.start runs it in its warm-up thread
    with TestClient(app) as client:
        try:
            assert client.get("/v1/health/ready").status_code == 503  # really warming up
            for headers in ({}, {"X-API-Key": "wrong-key-0123456789abcdef"}):
                r = client.post("/v1/verify", files={"image_a": A1, "image_b": A1}, headers=headers)
                assert r.status_code == 401, r.text
                assert r.json()["error"]["code"] == "unauthorized"
            r = client.post("/v1/verify", files={"image_a": A1, "image_b": A1}, headers=H)
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            assert r.json()["error"]["message"] == "not ready: the model is warming up"
        finally:
            gate.set()
        wait_ready(client.get)
        r = client.post("/v1/verify", files={"image_a": A1, "image_b": A1}, headers=H)
        assert r.status_code == 200, r.text


def test_failed_warmup_message_holds_no_server_detail(model_dir, tmp_path):
    settings = Settings(model=model_dir, api_keys=[KEY], device="cpu", gallery_path=tmp_path / "g.sqlite3")
    app = create_app(settings, announce_key=False)
    engine = app.state.engine

    def failing():
        engine.warmup_error = f"RuntimeError: cannot open {model_dir}/x.onnx"

    engine.warm_up = failing
    with TestClient(app) as client:
        r = client.get("/v1/models", headers=H)  # the engine is only reported, not used here
        assert r.status_code == 200
        r = client.post("/v1/quality", files={"image": A1}, headers=H)
        assert r.status_code == 503 and str(model_dir) not in r.text
        assert "warm-up failed" in r.json()["error"]["message"]


def test_real_warmup_failure_is_reported_without_server_paths(model_dir, tmp_path):
    """The engine's own warm-up failing with a path in its exception: readiness (unauthenticated)
    and the 503 say that warm-up failed and of what kind, never the exception's text."""
    settings = Settings(model=model_dir, api_keys=[KEY], device="cpu", gallery_path=tmp_path / "g.sqlite3",
                        warmup=False)
    app = create_app(settings, announce_key=False)
    engine = app.state.engine
    secret_path = f"{model_dir}/secret/x.onnx"

    def broken_warmup(sizes):
        raise RuntimeError(f"cannot open {secret_path}")

    engine.backend.warmup = broken_warmup
    engine.warm_up()
    assert not engine.ready and "RuntimeError" in engine.warmup_error and "secret" not in engine.warmup_error
    with TestClient(app) as client:
        engine.ready = False  # warmup=False marks it ready at start: back to the failed state
        r = client.get("/v1/health/ready")
        assert r.status_code == 503 and "secret" not in r.text and str(model_dir) not in r.text
        assert "warm-up failed (RuntimeError)" in r.json()["detail"]


def test_shutdown_waits_for_a_running_warmup(model_dir, tmp_path):
    """Closing the engine while warm-up runs joins the warm-up thread first: a daemon thread left
    inside onnxruntime at interpreter exit aborts the process (exit 134)."""
    settings = Settings(model=model_dir, api_keys=[KEY], device="cpu", gallery_path=tmp_path / "g.sqlite3")
    app = create_app(settings, announce_key=False)
    engine = app.state.engine
    entered, gate = threading.Event(), threading.Event()

    def held_warmup():
        entered.set()
        gate.wait(30)
        engine.ready = True

    engine.warm_up = held_warmup

    async def scenario():
        await engine.start()
        assert entered.wait(10)
        closing = asyncio.ensure_future(engine.close())
        for _ in range(20):  # let close() run as far as it can without the gate
            await asyncio.sleep(0)
        assert not closing.done() and engine._warmup_thread.is_alive()
        gate.set()
        await asyncio.wait_for(closing, 30)
        assert not engine._warmup_thread.is_alive()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ item 10: access log
def test_redact_query_hides_every_value_but_paging():
    assert redact_query("/v1/models") == "/v1/models"
    out = redact_query("/v1/g/persons?api_key=K1&offset=3&X-API-Key=K2&access_token=K3&api%5Fkey=K4"
                       "&password=K5&limit=2&design=K6")
    for secret in ("K1", "K2", "K3", "K4", "K5", "K6"):
        assert secret not in out
    assert out.count("[redacted]") == 6 and "offset=3" in out and "limit=2" in out
    # names no list of secret-looking words catches, ';' as a separator, a bare value
    for target in ("/v1/models?jwt=S3CRET", "/v1/models?x=1;api_key=S3CRET", "/v1/models?S3CRET",
                   "/v1/models?OFFSET=1&Limit=2&hmac=S3CRET"):
        assert "S3CRET" not in redact_query(target), target
    assert redact_query("/v1/g/persons?offset=10;limit=5") == "/v1/g/persons?offset=10;limit=5"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_access_log_of_a_real_server_holds_no_query_key(model_dir, tmp_path):
    """uvicorn's own logging configuration (dictConfig, as facerec-serve runs it) keeps the filter."""
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (lg.handlers[:], lg.filters[:], lg.level, lg.propagate)
             for n in names for lg in [logging.getLogger(n)]}
    collect = _Collect()
    try:
        with live_server(model_dir, tmp_path, log_config=uvicorn.config.LOGGING_CONFIG) as (base, _):
            access = logging.getLogger("uvicorn.access")
            assert any(isinstance(f, RedactAccessLog) for f in access.filters)
            access.addHandler(collect)
            with httpx.Client(base_url=base, timeout=10) as client:
                r = client.get(f"/v1/models?api_key={KEY}&offset=7", headers=H)
                assert r.status_code == 200
                assert client.get(f"/v1/models?token={KEY}").status_code == 401
                client.get("/v1/health/live")  # the server logs a response before the next is read
        lines = [line for line in collect.lines if "/v1/models" in line]
        assert len(lines) == 2, collect.lines
        assert all(KEY not in line and "[redacted]" in line for line in lines), lines
        assert "offset=7" in lines[0]
    finally:
        for n, (handlers, filters, level, propagate) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers[:], lg.filters[:], lg.level, lg.propagate = handlers, filters, level, propagate


# ------------------------------------------------------------------------------ extras
def test_no_server_paths_in_models_and_health(model_dir, tmp_path):
    # warmup=False here and below: a warm-up thread still inside onnxruntime when the interpreter
    # exits aborts the process ("terminate called without an active exception").
    settings = Settings(model=model_dir, api_keys=[KEY], device="cpu", warmup=False,
                        gallery_path=tmp_path / "g.sqlite3")
    with TestClient(create_app(settings, announce_key=False)) as client:
        wait_ready(client.get)
        for path in ("/v1/models", "/v1/health/ready", "/v1/health/live"):
            r = client.get(path, headers=H)
            assert r.status_code == 200
            assert str(model_dir) not in r.text and str(tmp_path) not in r.text, (path, r.text)
        model = client.get("/v1/models", headers=H).json()["model"]
        assert model["folder"] == model_dir.name and model["file"].endswith(".onnx")
        assert "/" not in model["file"] and "path" not in model


def test_each_429_names_the_limit_hit(model_dir, tmp_path):
    settings = Settings(model=model_dir, api_keys=[KEY], device="cpu", max_concurrent_requests=1,
                        warmup=False, gallery_path=tmp_path / "g.sqlite3")
    engine = create_app(settings, announce_key=False).state.engine

    async def two_at_once():
        async with engine.admit():
            async with engine.admit():
                pass

    with pytest.raises(Overloaded) as err:
        asyncio.run(two_at_once())
    message = str(err.value)
    assert "1 of 1 requests in progress" in message and "FACEREC_MAX_CONCURRENT_REQUESTS" in message
    assert "faces" not in message
    # The batcher's own limit still speaks of faces.
    assert "faces pending" in str(Overloaded(0.5, 3, 3))


def test_docs_page_loads_nothing_from_elsewhere(model_dir, tmp_path):
    """/docs is served from service/static (FastAPI's Swagger UI page loads its code from a CDN)."""
    import re

    settings = Settings(model=model_dir, api_keys=[KEY], device="cpu", warmup=False,
                        gallery_path=tmp_path / "g.sqlite3")
    app = create_app(settings, announce_key=False)
    with TestClient(app) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert "/docs/docs.js" in assets and "/docs/docs.css" in assets
        for url in assets:
            assert not re.match(r"(https?:)?//", url), url  # same origin only
            if url.startswith("/docs/"):
                asset = client.get(url)
                assert asset.status_code == 200 and "http" not in asset.text.replace("/openapi.json", "")
        assert "fetch(\"/openapi.json\"" in client.get("/docs/docs.js").text
        assert client.get("/openapi.json").status_code == 200
    off = Settings(model=model_dir, api_keys=[KEY], device="cpu", docs=False, warmup=False,
                   gallery_path=tmp_path / "g.sqlite3")
    with TestClient(create_app(off, announce_key=False)) as client:
        for path in ("/docs", "/docs/docs.js", "/openapi.json"):
            assert client.get(path).status_code == 404, path
