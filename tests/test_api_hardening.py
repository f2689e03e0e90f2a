"""Regression tests of the API items of issue 16's red-team pass, against the app in-process:

3. person metadata that the responses could not encode (lone surrogates, NaN, deep nesting) is refused
   before anything is stored, and a row already poisoned by an older version cannot break listings;
4. JSON nested beyond the decoder's recursion limit is a 422 ``invalid_json`` on every route, without a
   traceback in the log;
5. metadata has size limits (settings) with a message stating the limit;
6. ``offset`` beyond what SQL takes is a 422;
9. an oversize chunked upload is a 413, JSON that is not UTF-8 a 422;
11. the OpenAPI schema states what the server enforces, and a 405 lists the path's methods.

The shipped model runs the pipeline (the gallery needs its open-set calibration and real faces).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sqlite3

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from pydantic import ValidationError

from facerec.gallery import MetadataError, NewSample, open_store
from facerec.gallery.metadata import STORE_LIMITS, check_metadata
from facerec.gallery.sql_base import MAX_OFFSET
from facerec.gallery.testing import PgUnavailable, fresh_database, pg_required, pg_server
from service.app import create_app
from service.routes.gallery_io import check_person_metadata, metadata_limits
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.testing import SAMPLES, wait_ready

pytestmark = pytest.mark.timeout(300)
KEY = "hardening-key-0123456789abcdef"
H = {"X-API-Key": KEY}
JSON = {**H, "Content-Type": "application/json"}
MAX_REQUEST = 2 * 1024 * 1024  # small, so an oversize upload is quick to send
LAX = {"min_quality": None, "min_detection_score": None, "min_face_size": None, "max_yaw": None,
       "max_pitch": None, "max_faces": 10, "reject_ood": False, "reject_duplicates": False}


def face(name: str = "Al_Sharpton", i: int = 1) -> bytes:
    return (SAMPLES / name / f"{name}_{i:04d}.jpg").read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening") / "galleries.sqlite3"


@pytest.fixture(scope="module")
def client(db):
    settings = Settings(model=DEFAULT_MODEL_DIR, api_keys=[KEY], device="cpu", gallery_path=db,
                        max_image_bytes=1024 * 1024, max_request_bytes=MAX_REQUEST)
    with TestClient(create_app(settings, announce_key=False)) as c:
        wait_ready(c.get)
        yield c


@pytest.fixture(scope="module")
def gallery(client):
    r = client.post("/v1/galleries", json={"name": "hardening", "policy": LAX}, headers=H)
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def person(client, gallery):
    r = client.post(f"/v1/galleries/{gallery}/persons", headers=H,
                    json={"name": "Al", "metadata": {"badge": 7}, "images": [b64(face())]})
    assert r.status_code == 201, r.text
    return r.json()["person"]["id"]


def envelope(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "request_id"} and body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


def persons_total(client, gallery) -> int:
    r = client.get(f"/v1/galleries/{gallery}/persons", headers=H)
    assert r.status_code == 200, r.text
    return r.json()["total"]


# ============================================================================ 3. unreturnable metadata
# Raw JSON texts (valid JSON as Python parses it) whose value the responses could not encode.
POISON = {
    "lone surrogate": ('{"x": "\\ud800"}', "metadata.x", "utf8"),
    "surrogate key": ('{"\\udfff": 1}', "metadata.\\udfff", "utf8"),
    "NUL": ('{"x": "a\\u0000b"}', "metadata.x", "nul"),
    "NaN": ('{"x": NaN}', "metadata.x", "finite"),
    "Infinity": ('{"x": [1, -Infinity]}', "metadata.x[1]", "finite"),
    "300 levels": ('{"a": ' + "[" * 299 + "]" * 299 + "}", "metadata.a[0][0][0][0][0][0][0]", "max_depth"),
    "9 levels": ('{"a": ' + "[" * 8 + "]" * 8 + "}", "metadata.a[0][0][0][0][0][0][0]", "max_depth"),
}


@pytest.mark.parametrize("case", list(POISON))
def test_unreturnable_metadata_is_refused_before_it_is_stored(client, gallery, person, case):
    raw, where, rule = POISON[case]
    before = persons_total(client, gallery)
    image = b64(face())
    routes = {
        "enroll json": lambda: client.post(
            f"/v1/galleries/{gallery}/persons", headers=JSON,
            content=f'{{"name": "P", "metadata": {raw}, "images": ["{image}"]}}'),
        "enroll multipart": lambda: client.post(
            f"/v1/galleries/{gallery}/persons", headers=H, data={"name": "P", "metadata": raw},
            files={"images": ("a.jpg", face(), "image/jpeg")}),
        "batch": lambda: client.post(
            f"/v1/galleries/{gallery}/enroll", headers=JSON,
            content=f'{{"persons": [{{"name": "P", "metadata": {raw}, "images": ["{image}"]}}]}}'),
        "patch": lambda: client.patch(f"/v1/galleries/{gallery}/persons/{person}", headers=JSON,
                                      content=f'{{"metadata": {raw}}}'),
    }
    for route, send in routes.items():
        err = envelope(send(), 422, "invalid_metadata")
        field = where.replace("metadata", "persons[0].metadata", 1) if route == "batch" else where
        assert err["details"]["field"] == field and err["details"]["rule"] == rule, (route, err)
        assert field in err["message"], (route, err)
    # Nothing was stored, and everything that returns persons still answers.
    assert persons_total(client, gallery) == before
    r = client.get(f"/v1/galleries/{gallery}/persons/{person}", headers=H)
    assert r.status_code == 200 and r.json()["metadata"] == {"badge": 7}
    r = client.post(f"/v1/galleries/{gallery}/search", json={"image": image}, headers=H)
    assert r.status_code == 200 and r.json()["person"]["id"] == person, r.text


@pytest.fixture(params=["sqlite", "pgvector"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store("sqlite", path=tmp_path / "g.sqlite3")
    else:
        try:
            server = pg_server()
        except PgUnavailable as exc:
            if pg_required():
                raise
            pytest.skip(f"no PostgreSQL + pgvector server on this platform: {exc}")
        s = open_store("pgvector", dsn=fresh_database(server), purge="none")
    yield s
    s.close()


def test_the_store_refuses_what_it_could_not_return(store):
    """Both backends refuse, at every write, what the service could not return."""
    g = store.create_gallery("g", "c0ffee", 4, "m", {})
    sample = NewSample(embedding=[1.0, 0.0, 0.0, 0.0], info={})
    deep: list = [1]
    for _ in range(STORE_LIMITS.max_depth):
        deep = [deep]
    for bad in ({"x": "\ud800"}, {"x": float("nan")}, {"x": "a\x00b"}, {"a": deep}, ["not", "an object"]):
        with pytest.raises(MetadataError):
            store.create_person(g.id, "p", bad, [sample])
    unicode = {"name": "Zoë 王 👨\u200d👩\u200d👧", "n": [1, 2.5, None, True], "d": {"e": {}}}
    p, _ = store.create_person(g.id, "p", unicode, [sample])
    assert store.get_person(g.id, p.id).metadata == unicode
    store.update_person(g.id, p.id, metadata={"ok": 1})
    with pytest.raises(MetadataError):
        store.update_person(g.id, p.id, metadata={"x": float("inf")})
    assert store.get_person(g.id, p.id).metadata == {"ok": 1}
    with pytest.raises(ValueError, match="offset"):
        store.list_persons(g.id, 10, 2**63)


# What an older version could have written: the column holds text the responses cannot encode.
STORED = {
    "lone surrogate": '{"x": "\\ud800"}',
    "NaN": '{"x": NaN}',
    "300 levels": '{"a": ' + "[" * 300 + "]" * 300 + "}",
    "5000 levels": "[" * 5000 + "]" * 5000,
    "not JSON": "{oops",
    "not an object": "[1, 2]",
}


def test_a_poisoned_row_written_by_an_older_version_cannot_break_reads(client, db, caplog):
    r = client.post("/v1/galleries", json={"name": "poisoned", "policy": LAX}, headers=H)
    gid = r.json()["id"]
    image = b64(face("David_Beckham", 1))
    r = client.post(f"/v1/galleries/{gid}/persons", json={"name": "D", "images": [image]}, headers=H)
    assert r.status_code == 201, r.text
    pid = r.json()["person"]["id"]
    for case, text in STORED.items():
        with sqlite3.connect(db) as con:  # behind the store's back, as an old version left it
            con.execute("UPDATE persons SET metadata=? WHERE id=?", (text, pid))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            listing = client.get(f"/v1/galleries/{gid}/persons", headers=H)
            one = client.get(f"/v1/galleries/{gid}/persons/{pid}", headers=H)
            found = client.post(f"/v1/galleries/{gid}/search", json={"image": image}, headers=H)
        for r in (listing, one, found):
            assert r.status_code == 200, (case, r.text)
        shown = [listing.json()["persons"][0], one.json(), found.json()["person"]]
        for p in shown:
            assert p["id"] == pid and p["metadata"] == {} and p["metadata_error"], (case, p)
        assert any("unreadable metadata" in rec.getMessage() and pid in rec.getMessage()
                   for rec in caplog.records), case
    # PATCH repairs it.
    r = client.patch(f"/v1/galleries/{gid}/persons/{pid}", json={"metadata": {"fixed": True}}, headers=H)
    assert r.status_code == 200 and r.json()["metadata"] == {"fixed": True}
    assert r.json()["metadata_error"] is None


# ============================================================================ 4. deep JSON
DEEP = "[" * 3000 + "]" * 3000


def test_deeply_nested_json_is_422_invalid_json_without_a_traceback(client, gallery, person, caplog):
    g = f"/v1/galleries/{gallery}"
    posts = ["/v1/verify", "/v1/quality", "/v1/embed", "/v1/detect", "/v1/galleries", f"{g}/search",
             f"{g}/persons", f"{g}/persons/{person}/samples", f"{g}/enroll"]
    patches = [g, f"{g}/persons/{person}"]
    with caplog.at_level(logging.WARNING):
        for path in posts:
            err = envelope(client.post(path, content=DEEP, headers=JSON), 422, "invalid_json")
            assert "nested too deeply" in err["message"], path
        for path in patches:
            err = envelope(client.patch(path, content=DEEP, headers=JSON), 422, "invalid_json")
            assert "nested too deeply" in err["message"], path
        r = client.post(f"{g}/persons", headers=H, data={"name": "P", "metadata": DEEP},
                        files={"images": ("a.jpg", face(), "image/jpeg")})
        err = envelope(r, 422, "invalid_json")
        assert err["details"] == {"field": "metadata"}
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]


def test_other_json_failures_are_invalid_json_too(client, gallery):
    for body in (b"{not json", b'{"image": "\xff\xfe"}', b'{"n": ' + b"9" * 5000 + b"}"):
        for path in ("/v1/quality", "/v1/galleries", f"/v1/galleries/{gallery}/search"):
            envelope(client.post(path, content=body, headers=JSON), 422, "invalid_json")


# ============================================================================ 5. metadata limits
def test_metadata_limits_are_enforced_with_a_message_stating_the_limit(client, gallery, person):
    url = f"/v1/galleries/{gallery}/persons/{person}"
    cases = {
        "max_bytes": ({"blob": ["x" * 1000] * 20}, 16384),
        "max_keys": ({f"k{i}": i for i in range(65)}, 64),
        "max_string": ({"s": "x" * 1025}, 1024),
        "max_depth": ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}}, 8),
    }
    for rule, (metadata, limit) in cases.items():
        err = envelope(client.patch(url, json={"metadata": metadata}, headers=H), 422, "invalid_metadata")
        assert err["details"]["rule"] == rule and err["details"]["limit"] == limit, err
        assert str(limit) in err["message"], err
    # Megabytes, as the red team sent (under the request limit): refused, nothing stored.
    err = envelope(client.patch(url, json={"metadata": {f"k{i}": "x" * 1000 for i in range(60)} | {
        "more": ["x" * 1000] * 1500}}, headers=H), 422, "invalid_metadata")
    assert err["details"]["rule"] == "max_bytes"
    assert client.get(url, headers=H).json()["metadata"] == {"badge": 7}
    # Right at the limits: accepted and returned unchanged.
    at_limit = {f"k{i}": "x" * 200 for i in range(62)} | {"nested": {"a": [[[[[["y" * 1024]]]]]]}}
    assert len(json.dumps(at_limit, separators=(",", ":"))) <= 16384
    r = client.patch(url, json={"metadata": at_limit}, headers=H)
    assert r.status_code == 200 and r.json()["metadata"] == at_limit, r.text
    client.patch(url, json={"metadata": {"badge": 7}}, headers=H)


def test_metadata_limits_are_settings_bounded_by_the_stores_caps():
    base = {"model": DEFAULT_MODEL_DIR, "api_keys": [KEY]}
    small = Settings(**base, metadata_max_keys=2, metadata_max_bytes=256, metadata_max_depth=2,
                     metadata_max_string=16)
    limits = metadata_limits(small)
    assert check_person_metadata({"a": {"b": 1}}, limits) == {"a": {"b": 1}}
    for bad in ({"a": 1, "b": 2, "c": 3}, {"a": {"b": 1, "c": 2, "d": 3}}, {"a": {"b": [1]}},
                {"a": "x" * 17}, {"a": [1] * 200}):
        with pytest.raises(Exception) as info:
            check_person_metadata(bad, limits)
        assert info.value.status == 422 and info.value.code == "invalid_metadata"
    for name in ("max_bytes", "max_keys", "max_depth", "max_string"):
        cap = getattr(STORE_LIMITS, name)
        assert Settings(**base, **{f"metadata_{name}": cap})  # the highest setting is the store's cap
        with pytest.raises(ValidationError):
            Settings(**base, **{f"metadata_{name}": cap + 1})
    # What the highest settings let through, the store accepts.
    check_metadata({"a": "x" * STORE_LIMITS.max_string}, STORE_LIMITS)


# ============================================================================ 6. offset
def test_offset_beyond_sql_integers_is_422(client, gallery, person):
    url = f"/v1/galleries/{gallery}/persons"
    for query in (f"offset={MAX_OFFSET + 1}", "offset=-1", "limit=0", "limit=1001", "offset=" + "9" * 5000):
        err = envelope(client.get(f"{url}?{query}", headers=H), 422, "validation_error")
        assert err["details"][0]["loc"][0] == "query", err
    r = client.get(f"{url}?offset={MAX_OFFSET}", headers=H)
    assert r.status_code == 200 and r.json()["persons"] == [] and r.json()["offset"] == MAX_OFFSET


# ============================================================================ 9. codes
def _chunked_multipart(field: str, size: int):
    yield f'--b\r\nContent-Disposition: form-data; name="{field}"; filename="a.jpg"\r\n\r\n'.encode()
    for _ in range(size // 65536 + 1):
        yield b"x" * 65536
    yield b"\r\n--b--\r\n"


def test_oversize_chunked_uploads_are_413(client, gallery):
    for path, field in ((f"/v1/galleries/{gallery}/search", "image"),
                        (f"/v1/galleries/{gallery}/persons", "images"), ("/v1/verify", "image_a")):
        r = client.post(path, content=_chunked_multipart(field, MAX_REQUEST + 1),
                        headers={**H, "Content-Type": "multipart/form-data; boundary=b"})
        err = envelope(r, 413, "payload_too_large")
        assert err["details"]["limit_bytes"] == MAX_REQUEST
    chunks = (b"x" * 65536 for _ in range(MAX_REQUEST // 65536 + 1))
    envelope(client.post("/v1/galleries", content=chunks, headers=JSON), 413, "payload_too_large")


def test_json_that_is_not_utf8_is_422_on_fastapi_parsed_routes(client, gallery, person):
    body = b'{"name": "\xff\xfe"}'
    for send in (lambda: client.post("/v1/galleries", content=body, headers=JSON),
                 lambda: client.patch(f"/v1/galleries/{gallery}", content=body, headers=JSON),
                 lambda: client.patch(f"/v1/galleries/{gallery}/persons/{person}", content=body, headers=JSON)):
        err = envelope(send(), 422, "invalid_json")
        assert "UTF-8" in err["message"]


# ============================================================================ 11. schema == server
UNDECLARED = ("GET", "POST", "PUT", "PATCH", "DELETE")


def test_405_lists_exactly_the_methods_of_the_path(client):
    doc = client.get("/openapi.json").json()
    ids = {"gallery_id": "0" * 32, "person_id": "1" * 32, "sample_id": "2" * 32}
    checked = 0
    for path, ops in doc["paths"].items():
        declared = {m.upper() for m in ops}
        url = path.format(**ids)
        for method in UNDECLARED:
            if method in declared:
                continue
            r = client.request(method, url, headers=H)
            envelope(r, 405, "method_not_allowed")
            allowed = {m.strip() for m in r.headers["allow"].split(",")} - {"HEAD", "OPTIONS"}
            assert allowed == declared, (method, path, r.headers["allow"])
            checked += 1
    assert checked > 40


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_schema_refs_resolve_and_every_body_is_documented(client):
    doc = client.get("/openapi.json").json()
    for ref in _refs(doc):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]  # KeyError: a ref into nowhere (e.g. a pydantic #/$defs/ left inline)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method in ("post", "patch"):
                assert op["requestBody"]["required"], (method, path)


def test_schema_states_the_run_time_limits(client):
    doc = client.get("/openapi.json").json()
    text = json.dumps(doc)
    from facerec.gallery import OPENSET_FILE, OpenSetCalibration

    fpirs = OpenSetCalibration.load(DEFAULT_MODEL_DIR / OPENSET_FILE).fpirs
    create = doc["components"]["schemas"]["GalleryCreate"]["properties"]
    assert create["target_fpir"]["enum"] == fpirs + [None]
    assert text.count('"maxProperties": 64') >= 3  # person PATCH, enroll, batch
    params = {p["name"]: p["schema"] for p in
              doc["paths"]["/v1/galleries/{gallery_id}/persons"]["get"]["parameters"]}
    assert params["gallery_id"]["pattern"] == "^[0-9a-f]{32}$"
    assert params["offset"]["maximum"] == MAX_OFFSET and params["limit"]["maximum"] == 1000


NAMES = ["Ann", "  Ann  ", "Zoë O'Brien-Łukasz", "王小明", "👨\u200d👩\u200d👧", "\U000f0000 private use",
         "", "   ", "a\nb", "tab\there", "nul\x00", "c1\x85", "line\u2028sep", "x" * 200, "x" * 201]


def test_the_name_pattern_of_the_schema_is_the_servers_rule(client):
    doc = client.get("/openapi.json").json()
    name = doc["components"]["schemas"]["GalleryCreate"]["properties"]["name"]
    pattern = re.compile(name["pattern"])
    for text in NAMES:
        schema_ok = bool(pattern.fullmatch(text)) and name["minLength"] <= len(text) <= name["maxLength"]
        r = client.post("/v1/galleries", json={"name": text}, headers=H)
        assert (r.status_code == 201) == schema_ok, (text, r.text)
        if r.status_code == 201:
            client.delete(f"/v1/galleries/{r.json()['id']}", headers=H)


def test_numbers_are_strict_as_the_schema_says(client, gallery):
    refused = [{"name": "s1", "match_threshold": False}, {"name": "s2", "match_threshold": "0.5"},
               {"name": "s3", "policy": {"max_faces": True}}, {"name": "s4", "policy": {"max_faces": 2.5}},
               {"name": "s5", "target_fpir": 0.5}]
    for body in refused:
        envelope(client.post("/v1/galleries", json=body, headers=H), 422, "validation_error")
    r = client.post("/v1/galleries", json={"name": "s6", "policy": {"max_faces": 3.0}}, headers=H)
    assert r.status_code == 201 and r.json()["policy"]["max_faces"] == 3, r.text
    r = client.patch(f"/v1/galleries/{r.json()['id']}", json={"policy": {"max_faces": 4.0}}, headers=H)
    assert r.status_code == 200 and r.json()["policy"]["max_faces"] == 4, r.text
    err = envelope(client.post("/v1/verify", json={"image_a": "AAAA", "image_b": "AAAA", "threshold": True},
                               headers=H), 422, "validation_error")
    assert err["details"][0]["loc"] == ["threshold"]
    err = envelope(client.get(f"/v1/galleries/{gallery[:-1]}x/persons", headers=H), 422, "validation_error")
    assert err["details"][0]["loc"] == ["path", "gallery_id"]


def test_the_metadata_schema_agrees_with_the_server(client, gallery, person):
    jsonschema = pytest.importorskip("jsonschema")  # schemathesis's dependency (dev extra)
    doc = client.get("/openapi.json").json()
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/PersonUpdate", "components": doc["components"]})
    deep_ok: dict = {"v": 1}
    for _ in range(6):
        deep_ok = {"d": deep_ok}  # 8 levels with the metadata object
    values = [
        {"a": 1, "b": [True, None, 2.5, "x" * 1024], "c": {"d": []}},
        {"d": deep_ok},  # level 8: accepted
        {"d": {"d": deep_ok}},  # level 9: refused
        {"a": [[[[[[[1]]]]]]]},  # an array at level 9
        {"s": "x" * 1025},
        {"k" * 1025: 1},
        {"a": "nul\x00"},
        {"nul\x00": 1},
        {f"k{i}": i for i in range(65)},
    ]
    url = f"/v1/galleries/{gallery}/persons/{person}"
    for metadata in values:
        schema_ok = validator.is_valid({"metadata": metadata})
        r = client.patch(url, json={"metadata": metadata}, headers=H)
        assert (r.status_code == 200) == schema_ok, (metadata, r.text)
    client.patch(url, json={"metadata": {"badge": 7}}, headers=H)


def test_metadata_for_an_existing_person_is_refused_not_dropped(client, gallery, person):
    """metadata is set when a person is created; sent with samples for an existing person it was
    validated, answered 200 and silently lost. Now: 422, and the stored metadata is unchanged."""
    before = client.get(f"/v1/galleries/{gallery}/persons/{person}", headers=H).json()["metadata"]
    r = client.post(f"/v1/galleries/{gallery}/enroll", headers=JSON, json={"persons": [
        {"person_id": person, "metadata": {"note": "lost"}, "images": [b64(face("Al_Sharpton", 2))]}]})
    assert envelope(r, 422, "validation_error")["details"]["field"] == "persons[0].metadata"
    assert "PATCH" in r.json()["error"]["message"]
    r = client.post(f"/v1/galleries/{gallery}/persons/{person}/samples", headers=H,
                    files={"images": ("a.jpg", face("Al_Sharpton", 2), "image/jpeg")},
                    data={"metadata": '{"note": "lost"}'})
    assert envelope(r, 422, "validation_error")["details"]["unknown"] == ["metadata"]
    assert client.get(f"/v1/galleries/{gallery}/persons/{person}", headers=H).json()["metadata"] == before
    schema = client.get("/openapi.json").json()
    batch = json.dumps(schema["paths"]["/v1/galleries/{gallery_id}/enroll"]["post"]["requestBody"])
    assert '"metadata": {"type": "null"}' in batch  # the person_id branch says so too


def test_without_open_set_calibration_the_schema_asks_for_a_threshold(tmp_path_factory, tmp_path):
    """A model with no openset.json takes no FPIR: the schema says so (target_fpir null only, a new
    gallery requires match_threshold), and the server answers accordingly (schemathesis found the
    schema accepting FPIRs the server then refused)."""
    from service.testing import shared_model_dir

    model = shared_model_dir(tmp_path_factory)
    assert not (model / "openset.json").exists()
    settings = Settings(model=model, api_keys=[KEY], device="cpu", gallery_path=tmp_path / "g.sqlite3",
                        warmup=False)
    with TestClient(create_app(settings, announce_key=False)) as c:
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
        create = schemas["GalleryCreate"]
        assert "match_threshold" in create["required"]
        assert create["properties"]["target_fpir"]["type"] == "null"
        assert schemas["GalleryUpdate"]["properties"]["match_threshold"]["type"] == "number"
        envelope(c.post("/v1/galleries", json={"name": "g", "target_fpir": 0.01}, headers=H), 422,
                 "threshold_required")
        envelope(c.post("/v1/galleries", json={"name": "g"}, headers=H), 422, "threshold_required")
        r = c.post("/v1/galleries", json={"name": "g", "match_threshold": 0.3}, headers=H)
        assert r.status_code == 201, r.text
    # the shipped model is calibrated: FPIRs are an enum, the threshold optional
    shipped = Settings(model=DEFAULT_MODEL_DIR, api_keys=[KEY], device="cpu", gallery_path=tmp_path / "s.sqlite3",
                       warmup=False)
    with TestClient(create_app(shipped, announce_key=False)) as c:
        create = c.get("/openapi.json").json()["components"]["schemas"]["GalleryCreate"]
        assert "match_threshold" not in create.get("required", [])
        assert 0.01 in create["properties"]["target_fpir"]["enum"]
