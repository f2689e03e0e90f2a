"""Issue 19's API breadth through HTTP (TestClient): every face with embeddings (/v1/detect), which
face /v1/verify compares (face_a / face_b), batches (/v1/embed/batch), aligned crops, embeddings in
(/v1/verify), and every new 422/413 code.

The shipped model (models/default) runs the pipeline, so "the same face" and "another face" are
told apart by a trained model rather than by a random one.
"""

from __future__ import annotations

import io
import json
import math

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from PIL import Image

from facerec.data.align import norm_crop
from service.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.testing import SAMPLES, wait_ready
from test_service_gallery import _envelope
from test_service_gallery import b64 as _b64
from test_service_gallery import png as _png

pytestmark = pytest.mark.timeout(600)
KEY = "breadth-key-0123456789abcdef"
H = {"X-API-Key": KEY}
LEFT, RIGHT = "Al_Sharpton", "David_Beckham"


def _photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(SAMPLES / name / f"{name}_0001.jpg").convert("RGB"))


# Two LFW faces side by side: the left photo at full size (250 px), the right one shrunk to 180 px,
# so the left face is the larger (index 0 in /v1/detect's order) and the right one index 1. PNG, so
# what is cut out or kept is pixel for pixel what the two-face image holds.
_canvas = np.full((250, 430, 3), 128, np.uint8)
_canvas[:, :250] = _photo(LEFT)
_canvas[35:215, 250:430] = cv2.resize(_photo(RIGHT), (180, 180), interpolation=cv2.INTER_AREA)
TWO_FACES = _png(_canvas)
# Each face alone, in two senses: on the same canvas with the other face greyed out (the detector
# sees the same image geometry), and cut out as its own photo.
_left_only, _right_only = _canvas.copy(), _canvas.copy()
_left_only[:, 250:], _right_only[:, :250] = 128, 128
LEFT_ONLY, RIGHT_ONLY = _png(_left_only), _png(_right_only)
LEFT_CUT, RIGHT_CUT = _png(_canvas[:, :250]), _png(_canvas[35:215, 250:430])
A1 = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg").read_bytes()
A2 = (SAMPLES / "Adrien_Brody/Adrien_Brody_0002.jpg").read_bytes()
B1 = (SAMPLES / "Mariah_Carey/Mariah_Carey_0001.jpg").read_bytes()
NOT_112 = _png(np.full((120, 112, 3), 90, np.uint8))  # square crops of no model
# The default model's contract: its embedding size and the crop an `aligned` input must be (2.1: dlib's
# 128-d descriptor; a 192 px canvas holding dlib's chip and an ArcFace crop).
CONTRACT = json.loads((DEFAULT_MODEL_DIR / "contract.json").read_text())
SIZE = CONTRACT["input_size"]


@pytest.fixture(scope="module")
def client():
    settings = Settings(model=DEFAULT_MODEL_DIR, api_keys=[KEY], device="cpu", max_batch_images=4)
    with TestClient(create_app(settings, announce_key=False)) as c:
        wait_ready(c.get)
        yield c


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _embed(client, data: bytes, **form) -> dict:
    return _ok(client.post("/v1/embed", files={"image": data}, data=form, headers=H))


# ------------------------------------------------------------------------------ 1. every face
def test_detect_with_embeddings_gives_both_faces_in_order_each_as_embed_of_it_alone(client):
    plain = _ok(client.post("/v1/detect", files={"image": TWO_FACES}, headers=H))
    assert plain["faces_found"] == 2 and all(f["embedding"] is None for f in plain["faces"])
    body = _ok(client.post("/v1/detect", files={"image": TWO_FACES}, data={"embeddings": "true"}, headers=H))
    as_json = _ok(client.post("/v1/detect", json={"image": _b64(TWO_FACES), "embeddings": True}, headers=H))
    assert body["faces_found"] == 2 and len(body["faces"]) == 2
    left, right = body["faces"]
    assert left["face"]["box"][2] <= 250 <= right["face"]["box"][0], "largest (left) face first"
    for face in body["faces"]:
        assert len(face["embedding"]) == CONTRACT["embedding_size"]
        assert np.linalg.norm(face["embedding"]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose([f["embedding"] for f in as_json["faces"]], [f["embedding"] for f in body["faces"]],
                               atol=1e-6)
    only = [_embed(client, LEFT_ONLY), _embed(client, RIGHT_ONLY)]
    cut = [_embed(client, LEFT_CUT), _embed(client, RIGHT_CUT)]
    assert body["contract_id"] == only[0]["contract_id"] == cut[0]["contract_id"]
    for i, face in enumerate(body["faces"]):
        # The face alone in the same frame: the same detection, crop and embedding (to the float
        # noise of a different batch composition).
        assert _cos(face["embedding"], only[i]["embedding"]) >= 0.9999, i
        np.testing.assert_allclose(face["face"]["landmarks"], only[i]["face"]["landmarks"], atol=1e-3)
        # Cut out as its own photo, the face is the same person beyond doubt, but not the same crop:
        # MTCNN's landmarks move by 1-3 px when the face sits in another image (P-Net scans each
        # pyramid level on a stride-2 grid, and the levels of a 430-px and a 250-px image are
        # resampled on different grids), and a small face's embedding follows its crop: the same
        # person at the model's own calibrated threshold, the other face not (cosine scales differ
        # by model: dlib's descriptors put different people near 0.75, the same person above 0.93).
        own, other = _cos(face["embedding"], cut[i]["embedding"]), _cos(face["embedding"], cut[1 - i]["embedding"])
        threshold = client.get("/v1/models", headers=H).json()["verification"]["threshold"]
        assert own >= threshold > other, (i, own, other, threshold)


# ------------------------------------------------------------------------------ 2. which face
def test_verify_says_which_face_and_takes_an_index(client):
    largest = _ok(client.post("/v1/verify", files={"image_a": TWO_FACES, "image_b": RIGHT_ONLY}, headers=H))
    assert largest["image_a"]["faces_found"] == 2
    assert (largest["image_a"]["face_index"], largest["image_a"]["face_rule"]) == (0, "largest")
    assert (largest["image_b"]["face_index"], largest["image_b"]["face_rule"]) == (0, "largest")
    picked = _ok(client.post("/v1/verify", files={"image_a": TWO_FACES, "image_b": RIGHT_ONLY},
                             data={"face_a": "1"}, headers=H))
    assert (picked["image_a"]["face_index"], picked["image_a"]["face_rule"]) == (1, "index")
    assert picked["image_a"]["face"]["box"][0] >= 250  # the right-hand face
    assert picked["similarity"] > largest["similarity"] + 0.2 and picked["match"] is True
    as_json = _ok(client.post("/v1/verify", json={"image_a": _b64(RIGHT_ONLY), "image_b": _b64(TWO_FACES),
                                                  "face_b": 1}, headers=H))
    assert as_json["image_b"]["face_index"] == 1 and as_json["similarity"] == pytest.approx(
        picked["similarity"], abs=1e-6)
    detected = _ok(client.post("/v1/detect", files={"image": TWO_FACES}, data={"embeddings": "1"}, headers=H))
    alone = _embed(client, RIGHT_ONLY)
    assert picked["similarity"] == pytest.approx(_cos(detected["faces"][1]["embedding"], alone["embedding"]),
                                                 abs=1e-5)
    assert picked["similarity"] == pytest.approx(1.0, abs=1e-4)  # the same face, as /v1/detect found it
    body = _envelope(client.post("/v1/verify", files={"image_a": TWO_FACES, "image_b": A1},
                                 data={"face_a": "2"}, headers=H), 422, "face_index_out_of_range")
    assert body["error"]["details"] == {"field": "image_a", "faces_found": 2, "index": 2}
    _envelope(client.post("/v1/verify", json={"image_a": _b64(A1), "image_b": _b64(B1), "face_a": -1},
                          headers=H), 422, "validation_error")
    _envelope(client.post("/v1/verify", files={"image_a": A1, "image_b": B1}, data={"face_b": "x"}, headers=H),
              422, "validation_error")


# ------------------------------------------------------------------------------ 3. batches
def test_embed_batch_one_broken_image_does_not_fail_the_others(client):
    engine = client.app.state.engine
    sizes, hook = [], engine.batcher.on_batch
    engine.batcher.on_batch = lambda info: (sizes.append(info.size), hook and hook(info))
    try:
        r = client.post("/v1/embed/batch", files=[("images", A1), ("images", b"not an image" * 10),
                                                  ("images", B1)], headers=H)
    finally:
        engine.batcher.on_batch = hook
    body = _ok(r)
    assert body["contract_id"] == engine.backend.contract.contract_id
    good, bad, other = body["results"]
    assert bad == {"error": {"code": "decode_error", "message": bad["error"]["message"],
                             "details": {"field": "images[1]", "index": 1}}}
    assert sizes == [2], "the batch's two faces ran through the model together"
    for entry, data in ((good, A1), (other, B1)):
        single = _embed(client, data)
        assert set(entry) == set(single)
        assert entry["embedding"] == pytest.approx(single["embedding"], abs=1e-5)
        assert entry["face"]["box"] == pytest.approx(single["face"]["box"])
        assert entry["face"]["score"] == pytest.approx(single["face"]["score"])
    as_json = _ok(client.post("/v1/embed/batch", json={"images": [_b64(B1), "not base64!", "", _b64(NOT_112)]},
                              headers=H))
    codes = [e.get("error", {}).get("code") for e in as_json["results"]]
    assert codes == [None, "invalid_base64", "empty_image", "no_face"]
    assert as_json["results"][0]["embedding"] == pytest.approx(other["embedding"], abs=1e-5)


def test_embed_batch_over_the_limit_is_413_and_needs_images(client):
    limit = client.get("/v1/models", headers=H).json()["limits"]["max_batch_images"]
    assert limit == 4
    body = _envelope(client.post("/v1/embed/batch", json={"images": [_b64(A1)] * 5}, headers=H),
                     413, "too_many_images")
    assert body["error"]["details"] == {"limit": 4, "count": 5}
    _envelope(client.post("/v1/embed/batch", files=[("images", A1)] * 5, headers=H), 413, "too_many_images")
    _envelope(client.post("/v1/embed/batch", json={"images": []}, headers=H), 422, "validation_error")
    _envelope(client.post("/v1/embed/batch", files={"other": A1}, headers=H), 422, "validation_error")
    _envelope(client.post("/v1/embed/batch", data={"aligned": "true"}, files={"x": b""}, headers=H), 422,
              "validation_error")


# ------------------------------------------------------------------------------ 4. aligned crops
def test_aligned_crop_embeds_as_the_full_photo_and_other_sizes_are_refused(client):
    full = _embed(client, A1)
    crop = norm_crop(np.asarray(Image.open(io.BytesIO(A1)).convert("RGB")), np.array(full["face"]["landmarks"]),
                     SIZE, CONTRACT["alignment"])
    aligned = _png(crop)
    by_form = _embed(client, aligned, aligned="true")
    by_json = _ok(client.post("/v1/embed", json={"image": _b64(aligned), "aligned": True}, headers=H))
    assert _cos(by_form["embedding"], full["embedding"]) >= 0.99
    assert by_json["embedding"] == pytest.approx(by_form["embedding"], abs=1e-6)
    assert by_form["faces_found"] == 1 and by_form["face"]["score"] is None
    assert by_form["face"]["box"] == [0.0, 0.0, float(SIZE), float(SIZE)]
    q = _ok(client.post("/v1/quality", files={"image": aligned}, data={"aligned": "1"}, headers=H))
    assert q["quality"]["raw"] == pytest.approx(full["quality"]["raw"], abs=0.05)
    v = _ok(client.post("/v1/verify", files={"image_a": aligned, "image_b": aligned}, data={"aligned": "true"},
                        headers=H))
    assert v["similarity"] == pytest.approx(1.0, abs=1e-6) and v["image_a"]["face_rule"] == "aligned"
    batch = _ok(client.post("/v1/embed/batch", files=[("images", aligned), ("images", NOT_112)],
                            data={"aligned": "true"}, headers=H))
    assert batch["results"][0]["embedding"] == pytest.approx(by_form["embedding"], abs=1e-5)
    assert batch["results"][1]["error"]["code"] == "not_aligned"
    # The photo itself (250x250) declared aligned: refused on every route, saying what is expected.
    for r in (client.post("/v1/embed", files={"image": A1}, data={"aligned": "true"}, headers=H),
              client.post("/v1/quality", json={"image": _b64(A1), "aligned": True}, headers=H),
              client.post("/v1/verify", files={"image_a": aligned, "image_b": A1}, data={"aligned": "true"},
                          headers=H)):
        body = _envelope(r, 422, "not_aligned")
        assert f"{SIZE}x{SIZE}" in body["error"]["message"]
    _envelope(client.post("/v1/verify", json={"image_a": _b64(aligned), "image_b": _b64(aligned), "aligned": True,
                                              "face_a": 0}, headers=H), 422, "validation_error")


# ------------------------------------------------------------------------------ 5. embeddings in
def test_verify_by_embeddings_equals_verify_by_images(client):
    a, b, a2 = _embed(client, A1), _embed(client, B1), _embed(client, A2)
    contract = a["contract_id"]
    answers = {}
    for x, y, xe, ye in ((A1, B1, a, b), (A1, A2, a, a2)):
        by_images = answers[x, y] = _ok(client.post("/v1/verify", files={"image_a": x, "image_b": y}, headers=H))
        by_embeddings = _ok(client.post("/v1/verify", json={"embedding_a": xe["embedding"], "embedding_b":
                                                            ye["embedding"], "contract_id": contract}, headers=H))
        mixed = _ok(client.post("/v1/verify", json={"image_a": _b64(x), "embedding_b": ye["embedding"],
                                                    "contract_id": contract}, headers=H))
        for other in (by_embeddings, mixed):
            assert other["similarity"] == by_images["similarity"]
            assert (other["match"], other["decision"], other["threshold"]) == \
                (by_images["match"], by_images["decision"], by_images["threshold"])
        assert by_embeddings["image_a"] is None and by_embeddings["image_b"] is None
        assert mixed["image_a"]["face_rule"] == "largest" and mixed["image_b"] is None
    # Any scale is accepted (the vector is normalised), as a unit vector is.
    scaled = _ok(client.post("/v1/verify", json={"embedding_a": [3 * v for v in a["embedding"]],
                                                 "embedding_b": b["embedding"], "contract_id": contract}, headers=H))
    assert scaled["similarity"] == pytest.approx(answers[A1, B1]["similarity"], abs=1e-6)
    assert answers[A1, A2]["match"] and not answers[A1, B1]["match"]


@pytest.mark.parametrize("change, code", [
    ({"contract_id": "0123456789abcdef"}, "contract_mismatch"),
    ({"embedding_a": [0.1] * 511}, "invalid_embedding"),
    ({"embedding_a": [math.nan] + [0.1] * 511}, "invalid_embedding"),
    ({"embedding_a": [math.inf] + [0.1] * 511}, "invalid_embedding"),
    ({"embedding_a": [1e300] * 512}, "invalid_embedding"),
    ({"embedding_a": [0.0] * 512}, "invalid_embedding"),
    ({"contract_id": None}, "validation_error"),
    ({"image_a": _b64(A1)}, "validation_error"),  # both an image and an embedding for side a
    ({"embedding_b": None}, "validation_error"),  # side b given by nothing
    ({"face_a": 0}, "validation_error"),  # an index into an embedding
])
def test_verify_embedding_errors(client, change, code):
    contract = client.get("/v1/models", headers=H).json()["contract_id"]
    body = {"embedding_a": [0.1] * 512, "embedding_b": [0.2] * 512, "contract_id": contract}
    body = {k: v for k, v in {**body, **change}.items() if v is not None}
    # json.dumps writes NaN and Infinity as JavaScript does (httpx's json= refuses them); Python's
    # parser, and so the service, reads them.
    r = client.post("/v1/verify", content=json.dumps(body), headers={**H, "Content-Type": "application/json"})
    _envelope(r, 422, code)


# ------------------------------------------------------------------------------ 8. and the docs
def test_openapi_documents_the_new_fields_and_what_ood_is_not(client):
    doc = client.get("/openapi.json").json()
    assert "not presentation-attack (liveness) detection" in doc["info"]["description"]
    schemas = doc["components"]["schemas"]
    assert "NOT presentation-attack (liveness) detection" in schemas["Ood"]["properties"]["flagged"]["description"]
    for model, fields in (("VerifiedImage", ("face_index", "face_rule")), ("DetectedFace", ("embedding",)),
                          ("EmbedBatchResponse", ("results", "contract_id"))):
        for field in fields:
            assert schemas[model]["properties"][field].get("description"), (model, field)
    batch = doc["paths"]["/v1/embed/batch"]["post"]["requestBody"]["content"]
    assert set(batch) == {"multipart/form-data", "application/json"}
    assert batch["multipart/form-data"]["schema"]["properties"]["images"]["type"] == "array"
    verify = doc["paths"]["/v1/verify"]["post"]["requestBody"]["content"]
    form = verify["multipart/form-data"]["schema"]["properties"]
    assert form["face_a"]["type"] == "integer" and form["aligned"]["type"] == "boolean"
    for field in ("embedding_a", "embedding_b", "contract_id", "face_a", "aligned"):
        assert verify["application/json"]["schema"]["properties"][field]["description"], field
    for path in ("/v1/embed", "/v1/quality"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]
        assert "aligned" in body["multipart/form-data"]["schema"]["properties"]
    assert "413" in doc["paths"]["/v1/embed/batch"]["post"]["responses"]
