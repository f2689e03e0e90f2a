"""``facerec import --dlib``: dlib's ResNet (the torch port) as a model folder the service runs.

Needs the weights from face_recognition_models (the optional dlib extra); skips cleanly without.
The reference is always the port itself (``embed_chips``) on a chip cut independently of the
registry code: ``cv2.warpAffine`` by the similarity taking the landmarks to dlib's template.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerec.bundle import ModelBundle, find_graph
from facerec.contract import DLIB_CHIP_150
from facerec.data.align import DLIB_CHIP_TEMPLATE_150, umeyama

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from test_dlib_port import port, weights  # noqa: E402,F401 - the fixtures (skip without the weights)
from test_import import _run_import, uncalibrated_service  # noqa: E402

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

SAMPLES = Path(__file__).parent / "data" / "lfw_sample"


@pytest.fixture(scope="module")
def folder(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("dlib") / "dlib_resnet"
    assert _run_import("--dlib", "--weights", weights, "--out", out) == 0
    return out


def _unit(x):
    x = np.atleast_2d(np.asarray(x, np.float64))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _chip(photo: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    matrix = umeyama(np.asarray(landmarks, np.float64), DLIB_CHIP_TEMPLATE_150)[:2]
    return cv2.warpAffine(photo, matrix, (150, 150), borderValue=0.0)


def test_the_folder_says_dlibs_alignment_input_and_licence(folder):
    model = ModelBundle(folder)
    contract = model.contract()
    assert (contract.alignment, contract.input_size, contract.embedding_size, contract.colour_order) == \
        (DLIB_CHIP_150, 150, 128, "RGB")
    assert contract.model_version.startswith("dlib-") and "CC0" in contract.extra["licence"]
    assert model.calibration().threshold is None and model.interop_graph is None  # insightface cuts ArcFace only
    card = (folder / "MODEL_CARD.md").read_text()
    assert "CC0" in card and "Davis King" in card and DLIB_CHIP_150 in card


def test_the_runtime_backend_gives_the_ports_descriptor(folder, port):
    from facerec.data.datasets import read_rgb
    from facerec.runtime import OnnxRuntimeBackend
    from facerec.teachers.dlib_port import embed_chips

    rng = np.random.default_rng(3)
    photos = [read_rgb(p) for p in sorted(SAMPLES.glob("*/*.jpg"))[:3]]
    # Landmarks near where MTCNN puts them on an LFW photo, jittered: any chip will do for parity.
    base = (DLIB_CHIP_TEMPLATE_150 - 75.0) * 0.75 + [125.0, 120.0]
    chips = np.stack([_chip(p, base + rng.normal(0, 2.0, (5, 2))) for p in photos])
    backend = OnnxRuntimeBackend(find_graph(folder), device="cpu")
    got = backend.run(chips)["embedding"]
    ref = embed_chips(port, chips)
    cos = (_unit(got) * _unit(ref)).sum(axis=1)
    assert cos.min() >= 0.9999, cos
    assert np.allclose(np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-3)  # raw, not normalised


def test_the_service_pipeline_cuts_dlibs_chip_from_the_photo(folder, port):
    from facerec.data.datasets import read_rgb
    from facerec.runtime import FacePipeline, OnnxRuntimeBackend
    from facerec.teachers.dlib_port import embed_chips

    path = SAMPLES / "Adrien_Brody" / "Adrien_Brody_0001.jpg"
    pipeline = FacePipeline(OnnxRuntimeBackend(find_graph(folder), device="cpu"), keep_crops=True)
    face = pipeline.process(path.read_bytes()).faces[0]
    chip = _chip(read_rgb(path), face.landmarks)
    assert face.crop.shape == (150, 150, 3)
    assert np.abs(face.crop.astype(int) - chip.astype(int)).max() <= 1
    ref = _unit(embed_chips(port, chip[None]))[0]
    assert float(face.embedding @ ref) >= 0.9999


def test_the_service_serves_it_and_asks_for_a_threshold_until_calibrated(folder):
    with uncalibrated_service(folder) as (client, key, photo, served):
        assert len(served["embedding"]) == 128
        v = client.post("/v1/verify", files={"image_a": photo, "image_b": photo}, data={"threshold": "0.4"},
                        headers=key)
        assert v.status_code == 200 and v.json()["match"] is True
        assert client.get("/v1/models", headers=key).json()["contract"]["alignment"] == DLIB_CHIP_150


def test_import_errors_are_one_line(tmp_path, weights):
    with pytest.raises(SystemExit, match="no such dlib weights file"):
        _run_import("--dlib", "--weights", tmp_path / "missing.dat", "--out", tmp_path / "m")
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x01\x01not a dlib net")
    with pytest.raises(SystemExit, match="facerec import: .*bad.dat"):
        _run_import("--dlib", "--weights", bad, "--out", tmp_path / "m")
    with pytest.raises(SystemExit, match="--dlib takes no source"):
        _run_import("x.onnx", "--dlib", "--out", tmp_path / "m")
    with pytest.raises(SystemExit, match="give a source"):
        _run_import("--out", tmp_path / "m")
