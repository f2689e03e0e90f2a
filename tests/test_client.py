"""facerec.client against the real app (the shipped model, a SQLite gallery in the test's folder):
every operation's typed result against the raw JSON of the same request, the error envelope as
``FacerecError``, a real 429 retried after its ``Retry-After`` (the sleep is injected: nothing
waits), the async client in the app's own event loop, the result classes against the service's
OpenAPI schemas, and an import that pulls in neither torch, FastAPI nor numpy.

The operations of issue 19's new contract (``embed_batch``, ``detect(embeddings=True)``, verify by
face index or by embeddings, search by embedding, ``aligned``) skip, saying so, on a service whose
OpenAPI schema does not have them yet.
"""

from __future__ import annotations

import asyncio
import io
import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("pydantic_settings")
httpx = pytest.importorskip("httpx")
cv2 = pytest.importorskip("cv2")
from fastapi.testclient import TestClient

from facerec.client import (
    AsyncClient,
    Client,
    EmbedResult,
    FacerecError,
    ItemError,
    RetryPolicy,
    models,
)
from facerec.client.calls import parse_retry_after
from facerec.runtime import Overloaded
from service.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.testing import REPO_ROOT, SAMPLES, wait_ready

pytestmark = pytest.mark.timeout(300)
KEY = "client-key-0123456789abcdef"
H = {"X-API-Key": KEY}
BASE = "http://testserver"  # TestClient's host: the client sends through the app in-process


def photo(name: str, i: int) -> bytes:
    return (SAMPLES / name / f"{name}_{i:04d}.jpg").read_bytes()


def jpeg(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


A1, A2, A4, B1 = photo("Adrien_Brody", 1), photo("Adrien_Brody", 2), photo("Adrien_Brody", 4), photo("Bob_Hope", 3)
GREY = jpeg(np.full((200, 200, 3), 128, np.uint8))


class Sleeps(list):
    """The injected sleep: records what the client would have waited."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client_gallery")
    settings = Settings(model=DEFAULT_MODEL_DIR, api_keys=[KEY], device="cpu",
                        gallery_path=folder / "galleries.sqlite3")
    with TestClient(create_app(settings, announce_key=False)) as tc:
        wait_ready(tc.get)
        yield tc


@pytest.fixture
def fr(app):
    sleeps = Sleeps()
    client = Client(BASE, KEY, http_client=app, sleep=sleeps)
    client.sleeps = sleeps
    return client


def needs(app, path: str, *fields: str) -> None:
    """The service documents ``path`` (and ``fields`` in its JSON request body): the routes and
    request fields of issue 19 that the client's calls rely on."""
    spec = app.get("/openapi.json").json()
    missing = path not in spec["paths"]
    if fields and not missing:
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        missing = not set(fields) <= set(body.get("properties", {}))
    assert not missing, f"this service has no {' '.join((path, *fields))}"


def raw(app, path: str, **kw) -> dict:
    r = app.post(path, headers=H, **kw)
    assert r.status_code == 200, r.text
    return r.json()


# ============================================================================ the real app
def test_verify_quality_embed_detect_are_the_services_answers(app, fr):
    v = fr.verify(A1, A2)
    expected = raw(app, "/v1/verify", files={"image_a": A1, "image_b": A2})
    assert v.similarity == pytest.approx(expected["similarity"], abs=1e-5)
    assert (v.threshold, v.decision, v.match, v.contract_id) == (
        expected["threshold"], expected["decision"], expected["match"], expected["contract_id"])
    assert v.operating_point.source == expected["operating_point"]["source"] == "model"
    assert v.image_a.faces_found == expected["image_a"]["faces_found"]
    assert v.image_b.face.box == pytest.approx(expected["image_b"]["face"]["box"])
    assert isinstance(v.image_a.quality.score, float) and isinstance(v.image_a.ood.flagged, bool)
    request_threshold = fr.verify(A1, B1, threshold=-1.0)
    assert request_threshold.match and request_threshold.operating_point.source == "request"

    q = fr.quality(A1)
    expected = raw(app, "/v1/quality", files={"image": A1})
    assert q.quality.raw == pytest.approx(expected["quality"]["raw"], abs=1e-5)
    assert np.asarray(q.face.landmarks) == pytest.approx(np.asarray(expected["face"]["landmarks"]))

    e = fr.embed(A1)
    expected = raw(app, "/v1/embed", files={"image": A1})
    assert isinstance(e, EmbedResult) and e.contract_id == expected["contract_id"]
    assert np.asarray(e.embedding) == pytest.approx(np.asarray(expected["embedding"]), abs=1e-5)
    assert math.isclose(float(np.linalg.norm(e.embedding)), 1.0, abs_tol=1e-4)

    d = fr.detect(A1)
    expected = raw(app, "/v1/detect", files={"image": A1})
    assert d.faces_found == expected["faces_found"] == len(d.faces)
    assert d.faces[0].face.score == pytest.approx(expected["faces"][0]["face"]["score"])
    assert d.faces[0].embedding is None  # not asked for

    # The inputs a caller has: a path, bytes, an open file; the model's description.
    path = SAMPLES / "Adrien_Brody" / "Adrien_Brody_0001.jpg"
    with open(path, "rb") as f:
        assert fr.embed(f).embedding == pytest.approx(fr.embed(path).embedding, abs=1e-5)
    assert fr.embed(str(path)).contract_id == fr.models()["contract_id"]


def test_errors_carry_the_envelope(app, fr):
    with pytest.raises(FacerecError) as err:
        fr.embed(GREY)
    e = err.value
    assert (e.status, e.code) == (422, "no_face") and e.details["field"] == "image"
    assert e.request_id and e.message and str(e).startswith("422 no_face: ")
    with pytest.raises(FacerecError) as err:
        Client(BASE, "wrong-key-0000000000000000", http_client=app).quality(A1)
    assert (err.value.status, err.value.code) == (401, "unauthorized")
    with pytest.raises(FacerecError) as err:
        fr.gallery("0" * 32)
    assert (err.value.status, err.value.code) == (404, "gallery_not_found")
    with pytest.raises(TypeError, match="binary mode"):
        fr.embed(io.StringIO("not bytes"))
    with pytest.raises(TypeError, match="contract_id"):
        fr.verify([1.0, 0.0], [0.0, 1.0])  # numbers alone do not say which model made them


def test_gallery_create_enroll_search(app, fr):
    g = fr.create_gallery("client test")
    assert g.usable and g.persons == 0 and g.operating_point.source == "model"
    assert g.id in [x.id for x in fr.galleries()]
    enrolled = fr.enroll(g.id, "Adrien Brody", [A1, GREY], metadata={"badge": 7})
    assert (enrolled.created, enrolled.enrolled, enrolled.refused) == (True, 1, 1)
    assert enrolled.person.name == "Adrien Brody" and enrolled.person.metadata == {"badge": 7}
    assert [o.status for o in enrolled.results] == ["enrolled", "refused"]
    assert [r.code for r in enrolled.results[1].reasons] == ["no_face"]
    more = fr.add_samples(g.id, enrolled.person.id, [photo("Adrien_Brody", 3)])
    assert not more.created and more.person.samples == 2
    fr.enroll(g.id, "David Beckham", [photo("David_Beckham", 1)])
    with pytest.raises(FacerecError) as err:  # no photo passes: the gate's reasons in the details
        fr.enroll(g.id, "Nobody", [GREY])
    assert err.value.code == "enrollment_refused"
    assert err.value.details["results"][0]["reasons"][0]["code"] == "no_face"

    hit = fr.search(g.id, A4)
    expected = raw(app, f"/v1/galleries/{g.id}/search", files={"image": A4})
    assert hit.decision == expected["decision"] and hit.threshold == expected["threshold"]
    assert [(c.name, c.person_id) for c in hit.candidates] == [
        (c["name"], c["person_id"]) for c in expected["candidates"]]
    assert hit.similarity == pytest.approx(expected["similarity"], abs=1e-5)
    assert hit.operating_point.gallery_size == 3 and hit.image.faces_found >= 1
    if hit.contract_id == _shipped_contract():  # the trained model: the same person is found
        assert hit.decision == "match" and hit.person.id == enrolled.person.id
    top1 = fr.search(g.id, A4, top_k=1, threshold=-1.0)
    assert len(top1.candidates) == 1 and top1.operating_point.source == "request"
    assert fr.gallery(g.id).persons == 2
    fr.delete_person(g.id, enrolled.person.id)
    assert fr.gallery(g.id).persons == 1
    assert fr.delete_gallery(g.id) is None
    with pytest.raises(FacerecError, match="gallery_not_found"):
        fr.gallery(g.id)


def _shipped_contract() -> str:
    import json

    return json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())["contract_id"]


def test_a_real_429_is_retried_after_its_retry_after(app, fr, monkeypatch):
    """The batcher refuses the first image (a full queue: 429 overloaded, Retry-After 3), then takes
    the retried request: the caller gets the embedding and never saw the 429."""
    batcher = app.app.state.engine.batcher
    real_submit, refusals = batcher.submit, []

    def submit(*a, **k):
        if not refusals:
            refusals.append(1)
            raise Overloaded(2.2, 256, 256)
        return real_submit(*a, **k)

    monkeypatch.setattr(batcher, "submit", submit)
    assert fr.embed(A1).embedding == pytest.approx(fr.embed(A1).embedding, abs=1e-5)
    assert refusals == [1] and fr.sleeps == [3.0]  # the service's Retry-After, ceil(2.2)

    # Refused on every try: the last answer is raised, with the service's code and Retry-After.
    monkeypatch.setattr(batcher, "submit", lambda *a, **k: (_ for _ in ()).throw(Overloaded(0.4, 9, 9)))
    sleeps = Sleeps()
    with pytest.raises(FacerecError) as err:
        Client(BASE, KEY, http_client=app, sleep=sleeps, retry=RetryPolicy(attempts=3)).embed(A1)
    assert (err.value.status, err.value.code, err.value.retry_after) == (429, "overloaded", 1.0)
    assert sleeps == [1.0, 1.0]


def test_async_client_in_the_apps_event_loop(app):
    """AsyncClient over httpx's ASGI transport, run in the loop the app's lifespan started (the
    engine's batcher lives there)."""

    async def run():
        transport = httpx.ASGITransport(app=app.app)
        async with httpx.AsyncClient(transport=transport) as http, AsyncClient(BASE, KEY, http_client=http) as afr:
            v, e = await asyncio.gather(afr.verify(A1, A2), afr.embed(A1))
            try:
                await afr.embed(GREY)
            except FacerecError as exc:
                return v, e, exc
            return v, e, None

    v, e, error = app.portal.call(run)
    assert v.similarity == pytest.approx(raw(app, "/v1/verify", files={"image_a": A1, "image_b": A2})["similarity"],
                                         abs=1e-5)
    assert len(e.embedding) == len(raw(app, "/v1/embed", files={"image": A1})["embedding"])
    assert error is not None and (error.status, error.code) == (422, "no_face")


# ---------------------------------------------------------------------------- issue 19's new contract
def _two_faces() -> bytes:
    left = cv2.imdecode(np.frombuffer(photo("Adrien_Brody", 1), np.uint8), cv2.IMREAD_COLOR)
    right = cv2.imdecode(np.frombuffer(photo("David_Beckham", 1), np.uint8), cv2.IMREAD_COLOR)
    return jpeg(np.concatenate([left, right], axis=1))


def test_detect_with_embeddings_and_verify_by_face_index(app, fr):
    needs(app, "/v1/detect", "embeddings")
    needs(app, "/v1/verify", "face_a")
    two = _two_faces()
    d = fr.detect(two, embeddings=True)
    assert d.faces_found == 2 and d.contract_id == fr.embed(A1).contract_id
    for face in d.faces:
        assert math.isclose(float(np.linalg.norm(face.embedding)), 1.0, abs_tol=1e-4)
    for index, face in enumerate(d.faces):
        v = fr.verify(two, A2, face_a=index)
        assert (v.image_a.face_index, v.image_a.face_rule) == (index, "index")
        assert v.image_a.face.box == pytest.approx(face.face.box, abs=1e-3)
        assert v.image_b.face_rule == "largest" and v.image_b.face_index == 0
        # The face's embedding from detect gives the same verification as the image with its index.
        by_embedding = fr.verify(face.embedding, A2, contract_id=d.contract_id)
        assert by_embedding.similarity == pytest.approx(v.similarity, abs=1e-4)
        assert by_embedding.image_a is None and by_embedding.image_b.face_index == 0


def test_verify_and_search_by_embeddings_equal_by_images(app, fr):
    needs(app, "/v1/verify", "embedding_a")
    ea, eb = fr.embed(A1), fr.embed(A2)
    by_images, by_embeddings = fr.verify(A1, A2), fr.verify(ea, eb)
    assert by_embeddings.similarity == pytest.approx(by_images.similarity, abs=1e-5)
    assert by_embeddings.decision == by_images.decision
    assert by_embeddings.image_a is None and by_embeddings.image_b is None
    with pytest.raises(FacerecError) as err:  # a vector another model made
        fr.verify(ea.embedding, eb.embedding, contract_id="0" * 16)
    assert err.value.code == "contract_mismatch"

    needs(app, "/v1/galleries/{gallery_id}/search", "embedding")
    g = fr.create_gallery("client embeddings")
    fr.enroll(g.id, "Adrien Brody", [A1])
    by_image, by_embedding = fr.search(g.id, A4), fr.search(g.id, fr.embed(A4))
    assert by_embedding.image is None and by_embedding.decision == by_image.decision
    assert by_embedding.similarity == pytest.approx(by_image.similarity, abs=1e-5)


def test_embed_batch_keeps_order_and_reports_the_broken_image(app, fr):
    needs(app, "/v1/embed/batch")
    batch = fr.embed_batch([A1, b"not an image", GREY, B1])
    assert [type(r) for r in batch.results] == [EmbedResult, ItemError, ItemError, EmbedResult]
    assert batch.results[1].code == "decode_error" and batch.results[2].code == "no_face"
    for result, image in ((batch.results[0], A1), (batch.results[3], B1)):
        assert result.embedding == pytest.approx(fr.embed(image).embedding, abs=1e-4)
        assert result.contract_id == batch.contract_id


def test_aligned_crop_embeds_like_the_full_photo(app, fr):
    needs(app, "/v1/embed", "aligned")
    from facerec.data.align import norm_crop

    from facerec.bundle import ModelBundle

    contract = ModelBundle(DEFAULT_MODEL_DIR).contract()  # the model's own crop (2.1: a 192 px canvas)
    full = fr.embed(A1)
    image = cv2.imdecode(np.frombuffer(A1, np.uint8), cv2.IMREAD_COLOR)
    crop = jpeg(norm_crop(image, np.asarray(full.face.landmarks, np.float32), contract.input_size,
                          contract.alignment))
    aligned = fr.embed(crop, aligned=True)
    assert float(np.dot(aligned.embedding, full.embedding)) >= 0.99
    assert aligned.face.score is None and aligned.faces_found == 1
    assert fr.quality(crop, aligned=True).quality is not None
    with pytest.raises(FacerecError) as err:
        fr.embed(A1, aligned=True)  # 250x250: not the model's crop
    assert (err.value.status, err.value.code) == (422, "not_aligned")


# ---------------------------------------------------------------------------- the result types
# Each result class and the service's schema it mirrors (components of /openapi.json).
MIRRORS = {
    "FaceBox": "FaceBox", "Quality": "Quality", "Ood": "Ood",
    "ImageReport": "ImageReport", "VerifiedImage": "VerifiedImage", "DetectedFace": "DetectedFace",
    "DetectResult": "DetectResponse", "OperatingPoint": "OperatingPoint", "VerifyResult": "VerifyResponse",
    "EmbedResult": "EmbedResponse", "ItemError": "ErrorBody", "EmbedBatchResult": "EmbedBatchResponse",
    "GalleryOperatingPoint": "OperatingPointOut", "Gallery": "GalleryOut", "Person": "PersonOut",
    "Reason": "ReasonOut", "ImageOutcome": "ImageOutcome", "EnrollResult": "EnrollResponse",
    "Candidate": "CandidateOut", "SearchResult": "SearchResponse",
    "GalleryIndex": "IndexOut", "GalleryIndexRecall": "IndexRecallOut",
}
# Base classes only (the schema has no such component): their fields are checked in their subclasses.
BASES = {"FaceReport"}


def test_every_result_class_is_mirrored():
    import dataclasses

    classes = {n for n, c in vars(models).items() if dataclasses.is_dataclass(c) and c.__module__ == models.__name__}
    assert classes == set(MIRRORS) | BASES


@pytest.mark.parametrize("cls_name", sorted(MIRRORS))
def test_result_class_has_the_schemas_fields(app, cls_name):
    import dataclasses

    schemas = app.get("/openapi.json").json()["components"]["schemas"]
    name = MIRRORS[cls_name]
    assert name in schemas, name
    cls = getattr(models, cls_name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(fields) == set(schemas[name]["properties"]), name
    required = {n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert required <= set(schemas[name].get("required", [])), name


# ============================================================================ no service needed
def test_client_imports_without_torch_fastapi_or_numpy():
    code = ("import sys, facerec.client; heavy = {'torch', 'fastapi', 'numpy', 'starlette', 'pydantic', "
            "'service', 'cv2'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def _mock(*answers: httpx.Response) -> tuple[Client, list, "Sleeps"]:
    """A client whose transport answers ``answers`` in turn (the last one again if asked more)."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[min(len(seen), len(answers)) - 1]

    sleeps = Sleeps()
    client = Client(BASE, KEY, sleep=sleeps, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    return client, seen, sleeps


OVERLOADED = {"error": {"code": "overloaded", "message": "inference queue full"}, "request_id": "r1"}


def test_429_then_200_waits_retry_after_once():
    client, seen, sleeps = _mock(httpx.Response(429, json=OVERLOADED, headers={"Retry-After": "2"}),
                                 httpx.Response(200, json={"galleries": []}))
    assert client.galleries() == []
    assert sleeps == [2.0] and len(seen) == 2 and all(r.headers["X-API-Key"] == KEY for r in seen)


def test_retry_is_bounded_and_a_long_wait_is_not_waited():
    client, seen, sleeps = _mock(httpx.Response(429, json=OVERLOADED))  # no Retry-After: backoff
    with pytest.raises(FacerecError) as err:
        client.galleries()
    assert len(seen) == 4 and sleeps == [0.5, 1.0, 2.0] and err.value.retry_after is None
    assert err.value.request_id == "r1"
    client, seen, sleeps = _mock(httpx.Response(429, json=OVERLOADED, headers={"Retry-After": "3600"}))
    with pytest.raises(FacerecError) as err:
        client.galleries()
    assert len(seen) == 1 and sleeps == [] and err.value.retry_after == 3600.0
    client, seen, sleeps = _mock(httpx.Response(503, json=OVERLOADED, headers={"Retry-After": "1"}))
    with pytest.raises(FacerecError):
        client.galleries()
    assert len(seen) == 1  # only 429 is retried by default: RetryPolicy(statuses=...) says otherwise


def test_an_answer_that_is_not_the_envelope():
    client, _, _ = _mock(httpx.Response(502, text="<html>Bad Gateway</html>", headers={"X-Request-ID": "p"}))
    with pytest.raises(FacerecError) as err:
        client.galleries()
    assert (err.value.status, err.value.code, err.value.request_id) == (502, "http_502", "p")
    assert "Bad Gateway" in err.value.message


def test_async_retry_sleeps_asynchronously():
    answers = iter([httpx.Response(429, json=OVERLOADED, headers={"Retry-After": "1.5"}),
                    httpx.Response(200, json={"galleries": []})])
    waited = []

    async def sleep(seconds):
        waited.append(seconds)

    async def run():
        transport = httpx.MockTransport(lambda request: next(answers))
        async with httpx.AsyncClient(transport=transport) as http:
            return await AsyncClient(BASE, KEY, sleep=sleep, http_client=http).galleries()

    assert asyncio.run(run()) == [] and waited == [1.5]


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412490.0) == 0.0  # past
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None and parse_retry_after("-5") == 0.0
