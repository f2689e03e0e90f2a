"""The service's face detector (FACEREC_DETECTOR, service/detector.py): which detector runs where
(MTCNN in onnxruntime on a CPU, in torch on the service's GPU; an operator's SCRFD), that a detector
which cannot be built stops the start with one line, that the served detector is the one reported,
and the bound on what it sees (FACEREC_DETECT_MAX_SIDE)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("pydantic_settings")
from fastapi.testclient import TestClient
from pydantic import ValidationError

from facerec.runtime.device import GpuProbe, resolve_device
from service.app import create_app
from service.detector import DetectorPlan, DetectorUnavailableError, build_detector, plan_detector
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.testing import SAMPLES, wait_ready

KEY = "detector-key-0123456789abcdef"
H = {"X-API-Key": KEY}
A1 = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg").read_bytes()
# A GPU as the device policy sees one; nothing here runs on it.
GPU = GpuProbe(True, "test", "a GPU the test pretends to have")


def _settings(**kw) -> Settings:
    return Settings(model=DEFAULT_MODEL_DIR, api_keys=[KEY], device="cpu", **kw)


def test_plan_mtcnn_runs_onnxruntime_on_a_cpu_and_torch_on_the_services_gpu(tmp_path):
    cpu, gpu = resolve_device("cpu"), resolve_device("cuda:1", probe=GPU)
    assert plan_detector(_settings(), cpu) == DetectorPlan("mtcnn", "onnx", "cpu")
    assert plan_detector(_settings(), gpu) == DetectorPlan("mtcnn", "torch", "cuda:1")
    assert plan_detector(_settings(), resolve_device("auto", probe=GPU)).device == "cuda:0"
    scrfd = _settings(detector="scrfd", detector_model=tmp_path)
    assert plan_detector(scrfd, cpu) == DetectorPlan("scrfd", "onnx", "cpu", tmp_path)
    assert plan_detector(scrfd, gpu) == DetectorPlan("scrfd", "onnx", "cuda:1", tmp_path)
    assert DetectorPlan("mtcnn", "torch", "cuda:1").describe() == {"name": "mtcnn", "backend": "torch",
                                                                   "device": "cuda:1"}


def test_the_gpu_plans_torch_mtcnn_builds_and_finds_what_the_cpu_one_finds():
    """The code path of a CUDA service (torch MTCNN), built here on the CPU."""
    from facerec.data.mtcnn import TorchRunner
    from facerec.data.image_io import load_image

    image = load_image(A1)
    torch_mtcnn = build_detector(DetectorPlan("mtcnn", "torch", "cpu"))
    onnx_mtcnn = build_detector(DetectorPlan("mtcnn", "onnx", "cpu"))
    assert isinstance(torch_mtcnn.runner, TorchRunner)
    a, b = torch_mtcnn.detect(image), onnx_mtcnn.detect(image)
    assert len(a) == len(b) >= 1
    np.testing.assert_allclose(a[0].landmarks, b[0].landmarks, atol=0.05)


def test_scrfd_needs_its_model_and_a_bad_one_stops_the_start(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="FACEREC_DETECTOR_MODEL"):
        _settings(detector="scrfd")
    with pytest.raises(ValidationError):
        _settings(detector="retinaface")
    monkeypatch.setenv("FACEREC_DETECTOR", "scrfd")
    monkeypatch.setenv("FACEREC_DETECTOR_MODEL", str(tmp_path))
    s = Settings()
    assert (s.detector, s.detector_model) == ("scrfd", tmp_path)
    with pytest.raises(DetectorUnavailableError, match=r"FACEREC_DETECTOR=scrfd on cpu .*not found"):
        create_app(_settings(detector="scrfd", detector_model=tmp_path / "missing"), announce_key=False)
    with pytest.raises(DetectorUnavailableError, match=r"FACEREC_DETECTOR=scrfd on cpu .*no det_\*\.onnx"):
        create_app(_settings(detector="scrfd", detector_model=tmp_path), announce_key=False)


def test_facerec_serve_says_in_one_line_why_the_detector_cannot_start(tmp_path, monkeypatch, capsys):
    from service.__main__ import main

    monkeypatch.setenv("FACEREC_API_KEYS", KEY)
    monkeypatch.setenv("FACEREC_DETECTOR_MODEL", str(tmp_path))
    assert main(["--detector", "scrfd", "--device", "cpu", "--model", str(DEFAULT_MODEL_DIR)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("facerec-serve: FACEREC_DETECTOR=scrfd") and "\n" not in err


def test_service_serves_with_an_scrfd_model_and_reports_it(tmp_path):
    pytest.importorskip("onnx")
    from test_detect import _scrfd_stub

    kps = [-0.8, -0.9, 0.8, -0.9, 0.0, 0.0, -0.6, 1.2, 0.6, 1.2]
    _scrfd_stub(tmp_path / "det_stub.onnx", dict(stride=32, gx=4, gy=4, anchor=0, score=0.93,
                                                 dist=[1.5, 1.8, 1.5, 2.2], kps=kps))
    settings = _settings(detector="scrfd", detector_model=tmp_path, detect_max_side=1200)
    with TestClient(create_app(settings, announce_key=False)) as c:
        wait_ready(c.get)
        models = c.get("/v1/models", headers=H).json()
        assert models["detector"] == {"name": "scrfd", "backend": "onnxruntime", "device": "cpu", "max_side": 1200}
        assert c.app.state.engine.pipeline.detect_max_side == 1200
        r = c.post("/v1/detect", files={"image": A1}, headers=H)
        assert r.status_code == 200, r.text
        face = r.json()["faces"][0]["face"]
        # The stub's one face: anchor centre (128, 128) on the 640 canvas, a 250-px photo scaled
        # by 640/250; the box is the stub's distances x stride around it, mapped back.
        scale = 640 / 250
        expected = (np.array([128 - 48, 128 - 57.6, 128 + 48, 128 + 70.4]) / scale).tolist()
        assert face["box"] == pytest.approx(expected, abs=0.5)
        assert face["score"] == pytest.approx(0.93, abs=1e-6)


def test_models_reports_the_default_detector_and_its_bound():
    with TestClient(create_app(_settings(), announce_key=False)) as c:
        wait_ready(c.get)
        assert c.get("/v1/models", headers=H).json()["detector"] == {
            "name": "mtcnn", "backend": "onnxruntime", "device": "cpu", "max_side": 1600}
        assert c.app.state.engine.pipeline.detect_max_side == 1600
