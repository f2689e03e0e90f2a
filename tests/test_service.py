"""The REST service through its HTTP interface (TestClient): every route, auth, the error
envelope and request id, readiness, /v1/models, /metrics, overload (429) and settings."""

from __future__ import annotations

import asyncio
import base64
import hmac
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("pydantic_settings")
from fastapi.testclient import TestClient
from pydantic import ValidationError

from facerec.runtime import DeviceUnavailableError, Overloaded
from service import auth
from service.app import create_app
from service.settings import ModelNotFoundError, Settings
from service.testing import SAMPLES, shared_model_dir, wait_ready

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "rotated-key-9876543210zyxw"
H = {"X-API-Key": KEY}
A1 = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg").read_bytes()
A2 = (SAMPLES / "Adrien_Brody/Adrien_Brody_0002.jpg").read_bytes()
B1 = (SAMPLES / "Mariah_Carey/Mariah_Carey_0001.jpg").read_bytes()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_model_dir(tmp_path_factory)


def _client(model_dir, **kw):
    settings = Settings(model=model_dir, api_keys=kw.pop("api_keys", [KEY, OTHER_KEY]), device="cpu", **kw)
    return TestClient(create_app(settings, announce_key=False))


@pytest.fixture(scope="module")
def client(model_dir):
    with _client(model_dir) as c:
        wait_ready(c.get)
        yield c


def _envelope(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "request_id"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    assert body["request_id"] == r.headers["X-Request-ID"]
    return body


# ---------------------------------------------------------------------------------------- routes
def test_verify_multipart_same_and_different_person(client):
    same = client.post("/v1/verify", files={"image_a": A1, "image_b": A2}, headers=H)
    diff = client.post("/v1/verify", files={"image_a": A1, "image_b": B1}, headers=H)
    for r in (same, diff):
        assert r.status_code == 200, r.text
        body = r.json()
        assert -1.0 <= body["similarity"] <= 1.0
        assert body["threshold"] == pytest.approx(0.3)
        assert body["match"] == (body["similarity"] >= body["threshold"])
        assert body["decision"] == ("match" if body["match"] else "no_match")
        assert body["operating_point"] == {"far": 0.001, "calibrated_on": body["operating_point"]["calibrated_on"],
                                           "source": "model"}
        assert "lfw_sample" in body["operating_point"]["calibrated_on"]
        for side in ("image_a", "image_b"):
            img = body[side]
            assert img["faces_found"] >= 1
            assert len(img["face"]["box"]) == 4 and len(img["face"]["landmarks"]) == 5
            assert 0.0 <= img["face"]["score"] <= 1.0
            assert 0.0 <= img["quality"]["score"] <= 100.0 and isinstance(img["quality"]["raw"], float)
            assert img["quality"]["method"] == "quality_head"  # the model's own quality output
            assert set(img["ood"]) == {"score", "threshold", "flagged"}
            assert img["ood"]["flagged"] == (img["ood"]["score"] < img["ood"]["threshold"])


def test_verify_an_image_with_itself_is_one(client):
    r = client.post("/v1/verify", files={"image_a": A1, "image_b": A1}, headers=H)
    assert r.json()["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert r.json()["match"] is True


def test_verify_json_base64_and_request_threshold(client):
    body = {"image_a": base64.b64encode(A1).decode(), "image_b": "data:image/jpeg;base64," +
            base64.b64encode(B1).decode(), "threshold": 0.99}
    r = client.post("/v1/verify", json=body, headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["threshold"] == 0.99 and r.json()["match"] is False
    assert r.json()["operating_point"]["source"] == "request"
    r = client.post("/v1/verify", files={"image_a": A1, "image_b": A1}, data={"threshold": "-1"}, headers=H)
    assert r.json()["threshold"] == -1.0 and r.json()["match"] is True
    _envelope(client.post("/v1/verify", json={**body, "threshold": 2}, headers=H), 422, "validation_error")


def test_quality_embed_detect(client):
    q = client.post("/v1/quality", files={"image": A1}, headers=H).json()
    assert set(q) == {"face", "faces_found", "quality", "ood"}
    e = client.post("/v1/embed", json={"image": base64.b64encode(A1).decode()}, headers=H).json()
    assert len(e["embedding"]) == 512 and np.linalg.norm(e["embedding"]) == pytest.approx(1.0, abs=1e-4)
    models = client.get("/v1/models", headers=H).json()
    assert e["contract_id"] == models["contract_id"]
    assert e["quality"] == pytest.approx(q["quality"])
    d = client.post("/v1/detect", files={"image": A1}, headers=H).json()
    assert d["faces_found"] == len(d["faces"]) >= 1
    assert d["faces"][0]["face"]["box"] == pytest.approx(q["face"]["box"], abs=1e-3)


def test_models_reports_contract_device_providers(client):
    m = client.get("/v1/models", headers=H).json()
    assert m["contract"]["embedding_size"] == 512 and len(m["contract_id"]) == 16
    assert m["device"]["requested"] == "cpu" and m["device"]["active"] == "cpu"
    assert m["providers"] == ["CPUExecutionProvider"]
    assert m["verification"]["threshold"] == pytest.approx(0.3) and m["verification"]["source"] == "model"
    assert m["quality"] == {"method": "quality_head", "head": True, "percentile_mapping": True,
                            "calibrated_on": m["quality"]["calibrated_on"]}
    assert m["ood"]["contract_id"] == m["contract_id"] and m["ood"]["variant"] == "global"
    assert m["ood"]["detector_confidence"] is None  # this test detector scores the features alone


def test_without_ood_detector_ood_is_null(model_dir):
    with _client(model_dir, ood="none") as c:
        wait_ready(c.get)
        r = c.post("/v1/quality", files={"image": A1}, headers=H)
        assert r.status_code == 200 and r.json()["ood"] is None
        assert c.get("/v1/models", headers=H).json()["ood"] is None


def test_threshold_required_when_model_has_none_and_setting_override(tmp_path, model_dir):
    import shutil

    from facerec.export import update_metadata

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    update_metadata(folder / "vit_tiny_fiqa.onnx", {"verification_threshold": ""})
    with _client(folder) as c:
        wait_ready(c.get)
        _envelope(c.post("/v1/verify", files={"image_a": A1, "image_b": A1}, headers=H), 422, "threshold_required")
    with _client(folder, verify_threshold=0.5) as c:
        wait_ready(c.get)
        body = c.post("/v1/verify", files={"image_a": A1, "image_b": A1}, headers=H).json()
        assert body["threshold"] == 0.5 and body["operating_point"]["source"] == "setting"


# ---------------------------------------------------------------------------------------- auth
@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong-key-but-long-enough"}, {"X-API-Key": ""}])
@pytest.mark.parametrize("method,path", [("post", "/v1/verify"), ("post", "/v1/quality"), ("post", "/v1/embed"),
                                         ("post", "/v1/detect"), ("get", "/v1/models")])
def test_every_v1_route_needs_a_key(client, headers, method, path):
    kw = {"files": {"image": A1, "image_a": A1, "image_b": A1}} if method == "post" else {}
    body = _envelope(getattr(client, method)(path, headers=headers, **kw), 401, "unauthorized")
    assert "X-API-Key" in body["error"]["message"]


def test_rotated_keys_both_work_and_compare_in_constant_time(client, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for key, status in ((KEY, 200), (OTHER_KEY, 200), ("x" * 40, 401), ("short", 401)):
        calls.clear()
        assert client.get("/v1/models", headers={"X-API-Key": key}).status_code == status
        # Every configured key is compared (no early exit), always as equal-length digests.
        assert calls == [(32, 32), (32, 32)]


def test_health_and_metrics_need_no_key(client):
    assert client.get("/v1/health/live").json() == {"status": "alive"}
    assert client.get("/v1/health/ready").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_no_keys_configured_generates_one_printed_once(model_dir, capsys):
    app = create_app(Settings(model=model_dir, device="cpu"))
    err = capsys.readouterr().err
    key = app.state.api_keys.generated
    assert key and len(key) >= 32 and err.count(key) == 1
    with TestClient(app) as c:
        wait_ready(c.get)
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
    assert key not in capsys.readouterr().err  # printed at creation only


# ---------------------------------------------------------------------------------------- envelope
def test_framework_errors_use_the_envelope(client):
    _envelope(client.get("/nope"), 404, "not_found")
    _envelope(client.get("/v1/verify", headers=H), 405, "method_not_allowed")
    _envelope(client.post("/v1/health/live"), 405, "method_not_allowed")
    r = client.get("/v1/health/live", headers={"X-Request-ID": "trace-42"})
    assert r.headers["X-Request-ID"] == "trace-42"
    r = client.get("/v1/health/live", headers={"X-Request-ID": "bad id\twith spaces"})
    assert r.headers["X-Request-ID"] != "bad id\twith spaces" and len(r.headers["X-Request-ID"]) == 32


def test_unexpected_error_is_a_500_envelope_and_service_keeps_serving(client, monkeypatch):
    engine = client.app.state.engine

    async def boom(*a, **k):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(engine, "process_many", boom)
    body = _envelope(client.post("/v1/quality", files={"image": A1}, headers=H), 500, "internal_error")
    assert "secret" not in body["error"]["message"] and body["request_id"] in body["error"]["message"]
    monkeypatch.undo()
    assert client.post("/v1/quality", files={"image": A1}, headers=H).status_code == 200


def test_body_over_the_request_limit_is_413(model_dir):
    with _client(model_dir, max_image_bytes=4096, max_request_bytes=8192) as c:
        wait_ready(c.get)
        big = A1 + b"\0" * 10_000
        _envelope(c.post("/v1/quality", files={"image": big}, headers=H), 413, "payload_too_large")

        def chunks():  # no Content-Length: counted while streaming
            for _ in range(10):
                yield b"x" * 2048

        _envelope(c.post("/v1/quality", content=chunks(), headers={**H, "Content-Type": "application/json"}),
                  413, "payload_too_large")
        small = b"\xff\xd8" + b"0" * 5000
        _envelope(c.post("/v1/quality", files={"image": small}, headers=H), 413, "image_too_large")


# ---------------------------------------------------------------------------------------- readiness
def test_not_ready_until_warm_up_done(client, monkeypatch):
    engine = client.app.state.engine
    monkeypatch.setattr(engine, "ready", False)
    r = client.get("/v1/health/ready")
    assert r.status_code == 503
    assert r.json()["checks"] == {"model_loaded": True, "provider_active": True, "warmup_done": False,
                                  "accepting": True}
    body = _envelope(client.post("/v1/quality", files={"image": A1}, headers=H), 503, "not_ready")
    assert body and r.headers["X-Request-ID"]
    assert client.get("/v1/health/live").status_code == 200


# ---------------------------------------------------------------------------------------- overload
def test_overloaded_batcher_answers_429_with_retry_after(client, monkeypatch):
    engine = client.app.state.engine

    def full(*a, **k):
        raise Overloaded(2.2, 256, 256)

    monkeypatch.setattr(engine.batcher, "submit", full)
    body = _envelope(client.post("/v1/verify", files={"image_a": A1, "image_b": A1}, headers=H), 429, "overloaded")
    assert body["error"]["details"]["retry_after_s"] == pytest.approx(2.2)
    r = client.post("/v1/embed", files={"image": A1}, headers=H)
    assert r.headers["Retry-After"] == "3"
    monkeypatch.undo()
    assert client.post("/v1/embed", files={"image": A1}, headers=H).status_code == 200


def test_queue_full_for_real_gives_429_then_recovers(model_dir):
    """A model call held open fills a one-face queue; the next request is refused at once."""
    with _client(model_dir, max_pending=1, max_wait_ms=0) as c:
        wait_ready(c.get)
        engine = c.app.state.engine
        gate, real_run = threading.Event(), engine.backend.run
        engine.backend.run = lambda batch: (gate.wait(30), real_run(batch))[1]
        first = {}
        t = threading.Thread(target=lambda: first.setdefault(
            "r", c.post("/v1/embed", files={"image": A1}, headers=H)))
        t.start()
        try:
            deadline = time.monotonic() + 30
            while engine.batcher.pending < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = c.post("/v1/embed", files={"image": A1}, headers=H)
            _envelope(r, 429, "overloaded")
            assert int(r.headers["Retry-After"]) >= 1
        finally:
            gate.set()
            t.join(30)
        assert first["r"].status_code == 200
        assert c.post("/v1/embed", files={"image": A1}, headers=H).status_code == 200


def test_concurrent_request_limit(model_dir):
    with _client(model_dir, max_concurrent_requests=1) as c:
        wait_ready(c.get)
        engine = c.app.state.engine

        async def hold():
            async with engine.admit():
                with pytest.raises(Overloaded):
                    async with engine.admit():
                        pass

        asyncio.run(hold())
        assert engine.inflight == 0


# ---------------------------------------------------------------------------------------- metrics
def test_metrics_exposes_latency_queue_batch_decisions_ood_errors(client):
    client.post("/v1/verify", files={"image_a": A1, "image_b": A2}, headers=H)
    client.get("/v1/models")  # 401
    text = client.get("/metrics").text
    for needle in ('facerec_request_duration_seconds_count{method="POST",route="/v1/verify",status="200"}',
                   "facerec_batch_queue_seconds_count", "facerec_batch_size_bucket",
                   "facerec_batch_run_seconds_count", "facerec_verify_decisions_total{decision=",
                   "facerec_ood_checks_total{flagged=", 'facerec_errors_total{code="unauthorized"}',
                   "facerec_requests_in_flight", "facerec_ready 1.0"):
        assert needle in text, needle
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


# ---------------------------------------------------------------------------------------- start-up
def test_no_model_fails_at_start_saying_how_to_export(tmp_path, monkeypatch):
    from service import settings as settings_mod

    monkeypatch.setattr(settings_mod, "DEFAULT_MODEL_DIR", tmp_path / "models" / "default")
    monkeypatch.delenv("FACEREC_MODEL", raising=False)  # CI points it at the shipped model
    with pytest.raises(ModelNotFoundError, match="facerec export"):
        create_app(Settings(api_keys=[KEY]))
    from service.__main__ import main

    monkeypatch.setenv("FACEREC_MODEL", str(tmp_path / "nowhere"))
    assert main([]) == 2


def test_cuda_on_a_machine_without_gpu_refuses_to_start(model_dir, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceUnavailableError):
        create_app(Settings(model=model_dir, api_keys=[KEY], device="cuda"), announce_key=False)


def test_settings_from_environment_and_unsafe_values_refused(monkeypatch):
    monkeypatch.setenv("FACEREC_API_KEYS", f"{KEY}, {OTHER_KEY}")
    monkeypatch.setenv("FACEREC_PORT", "9123")
    s = Settings()
    assert s.api_keys == [KEY, OTHER_KEY] and s.port == 9123 and s.host == "127.0.0.1"
    for bad in ({"api_keys": ["short"]}, {"api_keys": ["changeme"]}, {"api_keys": ["aaaaaaaaaaaaaaaaaaaa"]},
                {"max_faces": 1000}, {"max_pixels": 10**10}, {"device": "gpu"},
                {"max_image_bytes": 50 * 2**20, "max_request_bytes": 2**20}):
        with pytest.raises(ValidationError):
            Settings(**bad)
