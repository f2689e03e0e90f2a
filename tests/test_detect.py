"""Face detection: MTCNN (torch and ONNX backends), SCRFD decoding, policies, pad-and-retry, safe
image decoding. Runs on the shipped LFW sample; one test also uses the full data when present."""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerec.data.detect import (
    Detection,
    FaceDetector,
    create_detector,
    detect_faces,
    list_detectors,
    pad_image,
    select_faces,
)
from facerec.data.image_io import ImageDecodeError, load_image

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "lfw_sample"
SAMPLE_FILES = sorted(SAMPLE.glob("*/*.jpg"))
# 20 images spread over the sample's identities (every 8th of the sorted list).
SUBSET = SAMPLE_FILES[::8][:20]


def _centre(d: Detection) -> np.ndarray:
    return np.array([(d.box[0] + d.box[2]) / 2.0, (d.box[1] + d.box[3]) / 2.0])


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def torch_det():
    return create_detector("mtcnn", device="cpu", backend="torch")


@pytest.fixture(scope="module")
def onnx_det():
    return create_detector("mtcnn", device="cpu", backend="onnx")


@pytest.fixture(scope="module")
def images():
    assert len(SUBSET) == 20, "the LFW sample is missing"
    return {p.name: load_image(p) for p in SUBSET}


# ----------------------------------------------------------------------------- MTCNN on LFW
def test_one_central_face_per_sample_image(onnx_det, images):
    for name, img in images.items():
        h, w = img.shape[:2]
        dets = onnx_det.detect(img)
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        central = [d for d in dets if np.linalg.norm(_centre(d) - [w / 2, h / 2]) < 30]
        assert len(central) == 1, f"{name}: {len(central)} central faces in {[d.box for d in dets]}"
        d = central[0]
        # Deep-funneled LFW: the face is roughly the central 100-130 px.
        assert 60 <= d.width <= 170 and 70 <= d.height <= 200, f"{name}: box {d.box}"
        assert 0.9 <= d.score <= 1.0
        lm = d.landmarks
        assert lm.shape == (5, 2) and lm.dtype == np.float32
        le, re, nose, lmouth, rmouth = lm
        assert le[0] < re[0] and lmouth[0] < rmouth[0], f"{name}: left/right swapped {lm}"
        assert max(le[1], re[1]) < nose[1] < min(lmouth[1], rmouth[1]), f"{name}: vertical order {lm}"
        assert np.all((lm >= d.box[:2] - 5) & (lm <= d.box[2:] + 5)), f"{name}: landmarks outside box"


def test_onnx_agrees_with_torch(torch_det, onnx_det, images):
    for name, img in list(images.items())[:8]:
        a, b = torch_det.detect(img), onnx_det.detect(img)
        assert len(a) == len(b), name
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.box, y.box, atol=1.0, err_msg=name)
            np.testing.assert_allclose(x.landmarks, y.landmarks, atol=1.0, err_msg=name)
            assert abs(x.score - y.score) < 1e-3, name


def test_onnx_export_into_empty_model_dir(tmp_path, onnx_det, images):
    # An empty model_dir gets the three nets exported into it at first use.
    pytest.importorskip("onnxscript")
    det = create_detector("mtcnn", backend="onnx", model_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["onet.onnx", "pnet.onnx", "rnet.onnx"]
    img = next(iter(images.values()))
    (a,), (b,) = det.detect(img)[:1], onnx_det.detect(img)[:1]
    np.testing.assert_allclose(a.box, b.box, atol=1e-3)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_torch_cuda_matches_cpu(torch_det, images):
    gpu = create_detector("mtcnn", device="cuda", backend="torch")
    for name, img in list(images.items())[:4]:
        a, b = torch_det.detect(img), gpu.detect(img)
        assert len(a) == len(b), name
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.box, y.box, atol=1.0, err_msg=name)
            np.testing.assert_allclose(x.landmarks, y.landmarks, atol=1.0, err_msg=name)


def test_non_faces_give_nothing(onnx_det):
    rng = np.random.default_rng(0)
    blanks = [
        np.zeros((200, 300, 3), np.uint8),
        np.full((250, 250, 3), 128, np.uint8),
        rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
        cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (9, 9), 3),
    ]
    for img in blanks:
        assert detect_faces(onnx_det, img, policy="all", pad_retry=True) == []


def test_detector_rejects_bad_arrays(onnx_det):
    with pytest.raises(ValueError):
        onnx_det.detect(np.zeros((50, 50), np.uint8))
    with pytest.raises(ValueError):
        onnx_det.detect(np.zeros((50, 50, 3), np.float32))


# ----------------------------------------------------------------------------- pad and retry
def test_pad_and_retry_finds_tight_crops(onnx_det, images):
    found_plain = 0
    for name, img in list(images.items())[:8]:
        (face,) = detect_faces(onnx_det, img, policy="central", pad_retry=False)
        # A Yale-B-like tight crop: the inner 80% of the face box, no context around the face.
        b = face.box
        dx, dy = 0.1 * (b[2] - b[0]), 0.1 * (b[3] - b[1])
        x1, y1, x2, y2 = np.round([b[0] + dx, b[1] + dy, b[2] - dx, b[3] - dy]).astype(int)
        crop = np.ascontiguousarray(img[y1:y2, x1:x2])
        found_plain += bool(detect_faces(onnx_det, crop, policy="central", pad_retry=False))
        got = detect_faces(onnx_det, crop, policy="central", pad_retry=True)
        assert len(got) == 1, f"{name}: tight crop not found even with padding"
        # Mapped back to crop coordinates, the box is the face: it reaches outside the crop (kept,
        # not clipped) and matches the box found on the full image.
        expected = b - np.array([x1, y1, x1, y1])
        assert _iou(got[0].box, expected) > 0.6, f"{name}: {got[0].box} vs {expected}"
        assert got[0].box[0] < 0 or got[0].box[1] < 0
    # Tight crops are what padding is for: most are missed without it.
    assert found_plain <= 4


class _CentreOnlyWhenPadded:
    """Fake detector: a 40 px face at the image centre, but only on images bigger than 100x80."""

    def detect(self, image):
        h, w = image.shape[:2]
        if (h, w) == (80, 100):
            return []
        cx, cy = w / 2, h / 2
        lm = np.array([[cx - 8, cy - 5], [cx + 8, cy - 5], [cx, cy], [cx - 6, cy + 8], [cx + 6, cy + 8]], np.float32)
        return [Detection(np.array([cx - 20, cy - 20, cx + 20, cy + 20], np.float32), 0.99, lm)]


def test_pad_and_retry_maps_coordinates_back():
    img = np.zeros((80, 100, 3), np.uint8)
    assert detect_faces(_CentreOnlyWhenPadded(), img, pad_retry=False) == []
    (d,) = detect_faces(_CentreOnlyWhenPadded(), img, policy="largest")
    np.testing.assert_allclose(d.box, [30, 20, 70, 60], atol=1e-4)
    np.testing.assert_allclose(d.landmarks[2], [50, 40], atol=1e-4)
    padded, px, py = pad_image(img, 0.5, "constant")
    assert padded.shape == (160, 200, 3) and (px, py) == (50, 40)


# ----------------------------------------------------------------------------- policies
def test_policies_on_two_faces(onnx_det, images):
    # Two sample images with a single face each: the big one as is at the right, the other
    # shrunk to 110 px left of the canvas centre (x = 260).
    singles = [img for img in images.values() if len(onnx_det.detect(img)) == 1][:2]
    canvas = np.full((300, 520, 3), 90, np.uint8)
    canvas[25:275, 260:510] = singles[0]
    canvas[95:205, 140:250] = cv2.resize(singles[1], (110, 110), interpolation=cv2.INTER_AREA)
    everything = detect_faces(onnx_det, canvas, policy="all")
    assert len(everything) == 2, [d.box for d in everything]
    big, small = sorted(everything, key=lambda d: -d.width * d.height)
    assert _centre(big)[0] > 300 and _centre(small)[0] < 260
    (largest,) = detect_faces(onnx_det, canvas, policy="largest")
    np.testing.assert_allclose(largest.box, big.box)
    (central,) = detect_faces(onnx_det, canvas, policy="central")
    np.testing.assert_allclose(central.box, small.box)
    # min_size drops the small face, so 'central' falls back to the big one.
    (kept,) = detect_faces(onnx_det, canvas, policy="central", min_size=small.size + 1)
    np.testing.assert_allclose(kept.box, big.box)
    assert len(detect_faces(onnx_det, canvas, policy="all", min_score=min(big.score, small.score))) == 2
    assert select_faces(everything, canvas.shape, "all", min_score=1.01) == []
    with pytest.raises(ValueError):
        select_faces(everything, canvas.shape, "biggest")


def test_detectors_are_registered_factories():
    """A detector is one registered factory (as models and margins are); create_detector takes
    any case of its name and hands every option to it."""
    assert {"mtcnn", "scrfd"} <= set(list_detectors())
    det = create_detector("MTCNN", backend="onnx", min_face_size=40.0, threads=1)
    assert isinstance(det, FaceDetector) and det.min_face_size == 40.0
    assert det.runner.sessions["pnet"].get_session_options().intra_op_num_threads == 1


def test_registry_names_and_traits():
    from facerec.registry import Registry

    reg = Registry("thing")

    @reg.register
    def plain():
        return "p"

    @reg.register(name="other", special=True)
    def _factory(x=1):
        return x

    assert reg.names() == ["other", "plain"]
    assert reg.create("other", x=3) == 3 and reg.create("plain") == "p"
    assert reg.traits("other") == {"special": True} and reg.traits("plain") == {}
    with pytest.raises(ValueError, match="unknown thing 'nope'; registered: other, plain"):
        reg.traits("nope")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(plain)


def test_create_detector_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown detector"):
        create_detector("haar")
    with pytest.raises(ValueError, match="backend"):
        create_detector("mtcnn", backend="tensorrt")
    with pytest.raises(ValueError, match="model_dir"):
        create_detector("scrfd")
    with pytest.raises(FileNotFoundError, match="det_"):
        create_detector("scrfd", model_dir=tmp_path)


# ----------------------------------------------------------------------------- image decoding
def test_decode_errors_are_clear(tmp_path):
    good = SUBSET[0].read_bytes()
    cases = {
        "empty": b"",
        "not an image": b"name,score\nalice,0.9\n" * 20,
        "truncated jpeg": good[: len(good) // 2],
        "corrupt jpeg": good[:300] + bytes(len(good) - 300),
    }
    for what, data in cases.items():
        with pytest.raises(ImageDecodeError) as e:
            load_image(data)
        assert str(e.value).startswith("image bytes:"), what
    f = tmp_path / "broken.jpg"
    f.write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        load_image(f)
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageDecodeError, match="pixels"):
        load_image(good, max_pixels=250 * 250 - 1)
    # A PNG header claiming 100k x 100k is refused before anything is decoded.
    bomb = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (100_000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    with pytest.raises(ImageDecodeError, match="10000000000 pixels"):
        load_image(bomb)


def test_decode_grey_rgba_and_colour_order():
    grey = np.tile(np.arange(0, 200, 2, dtype=np.uint8), (30, 1))
    out = load_image(cv2.imencode(".png", grey)[1].tobytes())
    assert out.shape == (30, 100, 3) and out.dtype == np.uint8 and np.array_equal(out[..., 0], grey)
    bgra = np.zeros((10, 10, 4), np.uint8)
    bgra[:, :5] = (255, 0, 0, 255)  # opaque blue on the left, transparent on the right
    out = load_image(cv2.imencode(".png", bgra)[1].tobytes())
    assert out.shape == (10, 10, 3)
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 9]) == (255, 255, 255)
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR
    assert tuple(load_image(cv2.imencode(".png", bgr)[1].tobytes())[0, 0]) == (255, 0, 0)


def test_decode_applies_exif_orientation():
    Image = pytest.importorskip("PIL.Image")
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).shape == (40, 20, 3)


# ----------------------------------------------------------------------------- SCRFD decoding
def _scrfd_stub(path: Path, face: dict) -> None:
    """An ONNX model with insightface SCRFD's interface (input 1x3x640x640; scores, boxes and
    landmarks for strides 8/16/32 with 2 anchors) whose outputs are constants encoding ``face``
    plus a weaker duplicate (to be removed by NMS) and a sub-threshold candidate."""
    from onnx import TensorProto, checker, helper, numpy_helper

    nodes, outputs = [], []
    for kind, dim in (("score", 1), ("bbox", 4), ("kps", 10)):
        for s in (8, 16, 32):
            g = 640 // s
            arr = np.zeros((g * g * 2, dim), np.float32)
            if s == face["stride"]:
                row = (face["gy"] * g + face["gx"]) * 2 + face["anchor"]
                dup = row + 1 - 2 * face["anchor"]  # the other anchor of the same location
                value = {"score": [face["score"]], "bbox": face["dist"], "kps": face["kps"]}[kind]
                arr[row] = value
                arr[dup] = [0.6] if kind == "score" else value
            if s == 8 and kind == "score":
                arr[100] = 0.3  # below the 0.5 threshold
            name = f"{kind}_{s}"
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
    graph = helper.make_graph(
        nodes, "scrfd_stub", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 640, 640])], outputs
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def test_scrfd_decoding_on_synthetic_model(tmp_path):
    pytest.importorskip("onnx")
    kps = [-0.8, -0.9, 0.8, -0.9, 0.0, 0.0, -0.6, 1.2, 0.6, 1.2]
    face = dict(stride=32, gx=10, gy=8, anchor=1, score=0.93, dist=[2.0, 2.5, 2.0, 3.0], kps=kps)
    _scrfd_stub(tmp_path / "det_stub.onnx", face)
    det = create_detector("scrfd", model_dir=tmp_path)
    # A 480x320 image letterboxes to 640x427 at the top left: scale 4/3.
    dets = det.detect(np.zeros((320, 480, 3), np.uint8))
    assert len(dets) == 1
    d = dets[0]
    assert d.score == pytest.approx(0.93, abs=1e-6)
    cx, cy = 10 * 32, 8 * 32  # anchor centres have no half-stride offset
    expected_box = np.array([cx - 64, cy - 80, cx + 64, cy + 96]) * 0.75
    np.testing.assert_allclose(d.box, expected_box, atol=0.5)
    expected_lm = (np.array([cx, cy]) + np.array(kps).reshape(5, 2) * 32) * 0.75
    np.testing.assert_allclose(d.landmarks, expected_lm, atol=0.5)
    # The policies and pad-and-retry work on it like on any detector.
    assert len(detect_faces(det, np.zeros((320, 480, 3), np.uint8), policy="central")) == 1


# ----------------------------------------------------------------------------- full LFW subset
def _data_root() -> Path:
    return Path(os.environ.get("FACEREC_DATA") or REPO.parent / "shared" / "data")


@pytest.mark.data
def test_lfw_subset_central_face_found(onnx_det):
    root = _data_root() / "lfw" / "lfw-deepfunneled"
    files = sorted(root.glob("*/*.jpg"))
    if len(files) < 1000:
        pytest.skip(f"full LFW not found under {root}")
    subset = files[:: len(files) // 200][:200]
    found = 0
    for f in subset:
        img = load_image(f)
        faces = detect_faces(onnx_det, img, policy="central")
        if faces and np.linalg.norm(_centre(faces[0]) - [img.shape[1] / 2, img.shape[0] / 2]) <= 30:
            found += 1
    assert found / len(subset) >= 0.98, f"{found}/{len(subset)}"
