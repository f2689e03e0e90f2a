"""Gallery routes through HTTP, on both backends (SQLite file and a real PostgreSQL + pgvector):
every route, the gate's reason codes, contract refusal, deletion that leaves nothing behind,
concurrent enrollment and search, auth and the error envelope.

The shipped model (models/default, with its openset.json) runs the pipeline, so identities are real:
a second photo of an enrolled person is a match, a person never enrolled is unknown.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from PIL import Image

from facerec.gallery import OPENSET_FILE, OpenSetCalibration
from facerec.gallery.testing import (
    PgUnavailable,
    fresh_database,
    pg_required,
    pg_server,
)
from service.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.testing import SAMPLES, wait_ready

pytestmark = pytest.mark.timeout(300)
KEY = "gallery-key-0123456789abcdef"
H = {"X-API-Key": KEY}
CALIBRATION = OpenSetCalibration.load(DEFAULT_MODEL_DIR / OPENSET_FILE)


def img(name: str, i: int) -> bytes:
    return (SAMPLES / name / f"{name}_{i:04d}.jpg").read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


BLANK = png(np.full((200, 200, 3), 128, np.uint8))
# Two people side by side, faces of the same size: whose face is meant is unclear.
TWO = png(
    np.concatenate(
        [
            np.asarray(Image.open(io.BytesIO(img("Al_Sharpton", 1)))),
            np.asarray(Image.open(io.BytesIO(img("David_Beckham", 1)))),
        ],
        axis=1,
    )
)


@pytest.fixture(scope="module", params=["sqlite", "pgvector"])
def backend(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"gallery_{request.param}")
    if request.param == "sqlite":
        return {"gallery_backend": "sqlite", "gallery_path": folder / "galleries.sqlite3"}
    try:
        server = pg_server()
    except PgUnavailable as exc:
        if pg_required():
            raise
        pytest.skip(f"no PostgreSQL + pgvector server on this platform: {exc}")
    return {"gallery_backend": "pgvector", "gallery_dsn": fresh_database(server), "gallery_pg_purge": "full"}


@pytest.fixture(scope="module")
def client(backend):
    settings = Settings(model=DEFAULT_MODEL_DIR, api_keys=[KEY], device="cpu", **backend)
    with TestClient(create_app(settings, announce_key=False)) as c:
        wait_ready(c.get)
        yield c


def _envelope(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "request_id"} and body["error"]["code"] == code, body
    assert body["error"]["message"] and body["request_id"] == r.headers["X-Request-ID"]
    return body


_names = iter(range(10**6))
# Every gate check off but the duplicate check: for tests about something else than the gate.
LAX = {
    "min_quality": None,
    "min_detection_score": None,
    "min_face_size": None,
    "max_yaw": None,
    "max_pitch": None,
    "max_faces": 10,
    "reject_ood": False,
}


def _gallery(client, **kw) -> str:
    r = client.post("/v1/galleries", json={"name": f"g{next(_names)}", **kw}, headers=H)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _enroll(client, gid, name, *images) -> dict:
    r = client.post(
        f"/v1/galleries/{gid}/persons",
        data={"name": name},
        files=[("images", data) for data in images],
        headers=H,
    )
    assert r.status_code == 201, r.text
    return r.json()


def _search(client, gid, data, **fields) -> dict:
    r = client.post(
        f"/v1/galleries/{gid}/search",
        files={"image": data},
        data={k: str(v) for k, v in fields.items()},
        headers=H,
    )
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------------------- galleries
def test_gallery_create_list_get_update_delete(client):
    r = client.post("/v1/galleries", json={"name": "office", "policy": {"min_face_size": 60}}, headers=H)
    assert r.status_code == 201, r.text
    g = r.json()
    models = client.get("/v1/models", headers=H).json()
    assert g["contract_id"] == models["contract_id"] and g["usable"] is True
    assert g["embedding_size"] == models["contract"]["embedding_size"]  # the model's: 128 for 2.1
    assert g["policy"]["min_face_size"] == 60 and g["policy"]["max_faces"] == 1 and g["target_fpir"] == 0.01
    point = g["operating_point"]
    assert point["source"] == "model" and point["threshold"] == CALIBRATION.lookup(0.01, 1).threshold
    _envelope(client.post("/v1/galleries", json={"name": "office"}, headers=H), 409, "gallery_exists")
    _envelope(
        client.post("/v1/galleries", json={"name": "x", "target_fpir": 0.05}, headers=H),
        422,
        "validation_error",
    )  # not a calibrated FPIR: the message lists the calibrated ones
    _envelope(
        client.post("/v1/galleries", json={"name": "x", "policy": {"min_quality": 200}}, headers=H),
        422,
        "validation_error",
    )
    _envelope(
        client.post("/v1/galleries", json={"name": "x", "unknown": 1}, headers=H), 422, "validation_error"
    )
    assert g["id"] in [x["id"] for x in client.get("/v1/galleries", headers=H).json()["galleries"]]
    got = client.get(f"/v1/galleries/{g['id']}", headers=H).json()
    assert got["name"] == "office" and g["index"] is None
    assert got["index"]["kind"] == "exact"  # a small gallery; how searches run is in GET of one gallery
    r = client.patch(
        f"/v1/galleries/{g['id']}",
        json={"name": "office-2", "policy": {"max_yaw": 30}, "match_threshold": 0.5},
        headers=H,
    )
    assert r.status_code == 200, r.text
    u = r.json()
    assert u["name"] == "office-2" and u["policy"]["max_yaw"] == 30 and u["policy"]["min_face_size"] == 60
    assert u["operating_point"]["source"] == "gallery" and u["operating_point"]["threshold"] == 0.5
    u = client.patch(f"/v1/galleries/{g['id']}", json={"match_threshold": None}, headers=H).json()
    assert u["operating_point"]["source"] == "model"
    assert client.delete(f"/v1/galleries/{g['id']}", headers=H).status_code == 204
    _envelope(client.get(f"/v1/galleries/{g['id']}", headers=H), 404, "gallery_not_found")
    _envelope(client.delete(f"/v1/galleries/{g['id']}", headers=H), 404, "gallery_not_found")
    _envelope(client.get("/v1/galleries/not-an-id", headers=H), 422, "validation_error")  # malformed id


# ----------------------------------------------------------------------------------------- enroll + search
def test_enroll_and_open_set_search(client):
    gid = _gallery(client, policy=LAX)
    adrien = _enroll(client, gid, "Adrien Brody", img("Adrien_Brody", 1))
    assert adrien["created"] and adrien["enrolled"] == 1 and adrien["person"]["samples"] == 1
    m = adrien["results"][0]["measurements"]
    assert set(m) == {"det_score", "face_size", "faces_found", "yaw", "pitch", "quality_score", "ood_flagged"}
    r = client.post(
        f"/v1/galleries/{gid}/persons",
        headers=H,
        json={  # JSON, base64, metadata
            "name": "Al Sharpton",
            "metadata": {"badge": 7},
            "images": [b64(img("Al_Sharpton", 1))],
        },
    )
    assert r.status_code == 201 and r.json()["person"]["metadata"] == {"badge": 7}
    _enroll(client, gid, "David Beckham", img("David_Beckham", 1))

    hit = _search(client, gid, img("Adrien_Brody", 4))
    assert hit["decision"] == "match" and hit["person"]["id"] == adrien["person"]["id"]
    sims = [c["similarity"] for c in hit["candidates"]]
    assert len(sims) == 3 and sims == sorted(sims, reverse=True) and hit["similarity"] == sims[0]
    assert hit["similarity"] >= hit["threshold"]
    point = hit["operating_point"]
    expected = CALIBRATION.lookup(0.01, 3)  # three samples in the gallery
    assert (point["threshold"], point["fpir"], point["gallery_size"], point["calibrated_gallery_size"]) == (
        expected.threshold,
        0.01,
        3,
        expected.calibrated_gallery_size,
    )
    assert point["source"] == "model" and "LFW fold 5" in point["calibrated_on"]
    assert (
        hit["image"]["faces_found"] >= 1
        and hit["contract_id"] == client.get("/v1/models", headers=H).json()["contract_id"]
    )

    for name in ("Muhammad_Ali", "Bob_Hope"):  # never enrolled: unknown, with candidates below threshold
        miss = _search(client, gid, img(name, 3))
        assert miss["decision"] == "unknown" and miss["person"] is None
        assert miss["similarity"] < miss["threshold"]

    # Per-request overrides: a threshold, or another calibrated FPIR; top_k.
    forced = _search(client, gid, img("Bob_Hope", 3), threshold=-1, top_k=1)
    assert forced["decision"] == "match" and forced["operating_point"]["source"] == "request"
    assert len(forced["candidates"]) == 1 and forced["threshold"] == -1
    lax = client.post(
        f"/v1/galleries/{gid}/search", headers=H, json={"image": b64(img("Adrien_Brody", 4)), "fpir": 0.1}
    ).json()
    assert lax["threshold"] == CALIBRATION.lookup(0.1, 3).threshold and lax["operating_point"]["fpir"] == 0.1
    _envelope(
        client.post(
            f"/v1/galleries/{gid}/search",
            headers=H,
            json={"image": b64(img("Adrien_Brody", 4)), "fpir": 0.05},
        ),
        422,
        "validation_error",
    )
    _envelope(
        client.post(
            f"/v1/galleries/{gid}/search",
            headers=H,
            json={"image": b64(img("Adrien_Brody", 4)), "fpir": 0.1, "threshold": 0.3},
        ),
        422,
        "validation_error",
    )
    _envelope(
        client.post(
            f"/v1/galleries/{gid}/search",
            files={"image": img("Adrien_Brody", 4)},
            data={"top_k": "0"},
            headers=H,
        ),
        422,
        "validation_error",
    )
    _envelope(client.post(f"/v1/galleries/{gid}/search", files={"image": BLANK}, headers=H), 422, "no_face")


def test_search_by_embedding_equals_search_by_image(client):
    """Issue 19: a kept embedding (from /v1/embed) searches as its photo does; another model's vector,
    a wrong length or non-finite values are refused before the gallery is read."""
    gid = _gallery(client, policy=LAX)
    adrien = _enroll(client, gid, "Adrien Brody", img("Adrien_Brody", 1))
    _enroll(client, gid, "Al Sharpton", img("Al_Sharpton", 1))
    probe = img("Adrien_Brody", 4)
    e = client.post("/v1/embed", files={"image": probe}, headers=H).json()
    by_image = _search(client, gid, probe)
    r = client.post(f"/v1/galleries/{gid}/search", headers=H,
                    json={"embedding": e["embedding"], "contract_id": e["contract_id"], "top_k": 2})
    assert r.status_code == 200, r.text
    by_embedding = r.json()
    assert by_embedding["decision"] == by_image["decision"] == "match"
    assert by_embedding["person"]["id"] == adrien["person"]["id"] and by_embedding["image"] is None
    assert [c["person_id"] for c in by_embedding["candidates"]] == [c["person_id"] for c in by_image["candidates"]]
    assert [c["similarity"] for c in by_embedding["candidates"]] == pytest.approx(
        [c["similarity"] for c in by_image["candidates"]], abs=1e-6)
    search = f"/v1/galleries/{gid}/search"
    for body, code in (
        ({"embedding": e["embedding"], "contract_id": "0" * 16}, "contract_mismatch"),
        ({"embedding": e["embedding"][:-1], "contract_id": e["contract_id"]}, "invalid_embedding"),
        ({"embedding": [float("nan")] * len(e["embedding"]), "contract_id": e["contract_id"]}, "invalid_embedding"),
        ({"embedding": e["embedding"]}, "validation_error"),  # no contract_id
        ({"embedding": e["embedding"], "contract_id": e["contract_id"], "image": b64(probe)}, "validation_error"),
    ):  # json.dumps writes NaN as JavaScript does (httpx's json= refuses it); the service reads it
        r = client.post(search, content=json.dumps(body), headers={**H, "Content-Type": "application/json"})
        _envelope(r, 422, code)
    empty = _gallery(client)
    nobody = _search(client, empty, img("Adrien_Brody", 4))
    assert nobody["decision"] == "unknown" and nobody["candidates"] == [] and nobody["similarity"] is None


def test_batch_enrollment_reports_per_image(client):
    # The OOD gate is off here: at TPR 95% the shipped detector flags about one genuine face in
    # twenty (2.1's flags Al_Sharpton_0002), and this test is about the per-image report; the gate
    # has its own tests below.
    gid = _gallery(client, policy={"reject_ood": False})
    r = client.post(
        f"/v1/galleries/{gid}/persons",
        data={"name": "Al"},
        headers=H,
        files=[
            ("images", img("Al_Sharpton", 1)),
            ("images", BLANK),
            ("images", TWO),
            ("images", b"not an image"),
        ],
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["enrolled"] == 1 and body["refused"] == 3 and body["person"]["samples"] == 1
    res = body["results"]
    assert [x["status"] for x in res] == ["enrolled", "refused", "refused", "error"]
    assert res[0]["sample_id"] and res[0]["reasons"] == []
    assert [x["code"] for x in res[1]["reasons"]] == ["no_face"]
    assert [x["code"] for x in res[2]["reasons"]] == ["multiple_faces"]
    assert res[2]["measurements"]["faces_found"] >= 2
    assert res[3]["error"]["code"] == "decode_error"
    # Several persons in one request (JSON): each gets its own report, in order.
    r = client.post(
        f"/v1/galleries/{gid}/enroll",
        headers=H,
        json={
            "persons": [
                {"name": "Bob", "images": [b64(img("David_Beckham", 1)), b64(img("David_Beckham", 3))]},
                {"person_id": body["person"]["id"], "images": [b64(img("Al_Sharpton", 2))]},
                {"name": "Nobody", "images": [b64(BLANK)]},
            ]
        },
    )
    assert r.status_code == 200, r.text
    persons = r.json()["persons"]
    assert persons[0]["created"] and persons[0]["enrolled"] == 2
    assert not persons[1]["created"] and persons[1]["person"]["samples"] == 2
    assert persons[2]["person"] is None and persons[2]["results"][0]["reasons"][0]["code"] == "no_face"
    assert client.get(f"/v1/galleries/{gid}", headers=H).json()["persons"] == 2
    _envelope(
        client.post(
            f"/v1/galleries/{gid}/enroll",
            headers=H,
            json={"persons": [{"name": "x", "person_id": body["person"]["id"], "images": [b64(BLANK)]}]},
        ),
        422,
        "validation_error",
    )
    _envelope(
        client.post(f"/v1/galleries/{gid}/persons", files=[("images", BLANK)], headers=H),
        422,
        "validation_error",
    )  # a new person needs a name


def test_gate_reason_codes(client):
    gid = _gallery(client)
    refused = client.post(
        f"/v1/galleries/{gid}/persons", data={"name": "x"}, files=[("images", BLANK)], headers=H
    )
    body = _envelope(refused, 422, "enrollment_refused")
    assert body["error"]["details"]["results"][0]["reasons"][0]["code"] == "no_face"
    assert client.get(f"/v1/galleries/{gid}", headers=H).json()["persons"] == 0  # nobody was created

    # Measure one photo, then set each limit just beyond it: refused with that code; just inside: accepted.
    probe = _gallery(client, policy={"reject_duplicates": False})
    m = _enroll(client, probe, "m", img("Adrien_Brody", 1))["results"][0]["measurements"]
    limits = {
        "face_too_small": ("min_face_size", m["face_size"] + 1, m["face_size"] - 1),
        "low_quality": ("min_quality", m["quality_score"] + 0.5, m["quality_score"] - 0.5),
        "extreme_pose": ("max_yaw", abs(m["yaw"]) - 1, abs(m["yaw"]) + 1),
    }
    for code, (field, refuse, accept) in limits.items():
        client.patch(f"/v1/galleries/{probe}", json={"policy": {field: refuse}}, headers=H)
        r = client.post(
            f"/v1/galleries/{probe}/persons",
            data={"name": code},
            files=[("images", img("Adrien_Brody", 1))],
            headers=H,
        )
        reasons = _envelope(r, 422, "enrollment_refused")["error"]["details"]["results"][0]["reasons"]
        assert [x["code"] for x in reasons] == [code], reasons
        client.patch(f"/v1/galleries/{probe}", json={"policy": {field: accept}}, headers=H)
        _enroll(client, probe, code, img("Adrien_Brody", 1))
    client.patch(
        f"/v1/galleries/{probe}",
        json={"policy": {"min_detection_score": min(1.0, m["det_score"] + 1e-4)}},
        headers=H,
    )
    r = client.post(
        f"/v1/galleries/{probe}/persons",
        data={"name": "det"},
        files=[("images", img("Adrien_Brody", 1))],
        headers=H,
    )
    reason = _envelope(r, 422, "enrollment_refused")["error"]["details"]["results"][0]["reasons"][0]
    assert reason["code"] == "low_quality" and "detector score" in reason["message"]

    # OOD: with the detector's threshold above every score, every photo is flagged.
    ood = client.app.state.engine.ood
    saved = ood.threshold
    ood.threshold = float("inf")
    try:
        r = client.post(
            f"/v1/galleries/{gid}/persons",
            data={"name": "ood"},
            files=[("images", img("Bob_Hope", 1))],
            headers=H,
        )
        reasons = _envelope(r, 422, "enrollment_refused")["error"]["details"]["results"][0]["reasons"]
        assert "ood_flagged" in [x["code"] for x in reasons]
    finally:
        ood.threshold = saved

    # Duplicate: the same face offered under another name.
    first = _enroll(client, gid, "Sarah", img("Sarah_Hughes", 1))
    r = client.post(
        f"/v1/galleries/{gid}/persons",
        data={"name": "Not Sarah"},
        files=[("images", img("Sarah_Hughes", 1))],
        headers=H,
    )
    res = _envelope(r, 422, "enrollment_refused")["error"]["details"]["results"][0]
    assert [x["code"] for x in res["reasons"]] == ["duplicate_of_other_person"]
    assert (
        res["duplicate_of"]["person_id"] == first["person"]["id"] and res["duplicate_of"]["similarity"] > 0.99
    )
    # ... but adding it to the same person is fine.
    r = client.post(
        f"/v1/galleries/{gid}/persons/{first['person']['id']}/samples",
        files=[("images", img("Sarah_Hughes", 1))],
        headers=H,
    )
    assert r.status_code == 200 and r.json()["enrolled"] == 1 and r.json()["person"]["samples"] == 2


def test_person_routes_and_deletion(client):
    gid = _gallery(client, policy=LAX)
    a = _enroll(client, gid, "Ann", img("Ann_Veneman", 1), img("Ann_Veneman", 2))["person"]
    b = _enroll(client, gid, "Tim", img("Tim_Henman", 1))["person"]
    listing = client.get(f"/v1/galleries/{gid}/persons", headers=H).json()
    assert [p["name"] for p in listing["persons"]] == ["Ann", "Tim"] and listing["total"] == 2
    page = client.get(f"/v1/galleries/{gid}/persons?limit=1&offset=1", headers=H).json()
    assert [p["id"] for p in page["persons"]] == [b["id"]]
    _envelope(client.get(f"/v1/galleries/{gid}/persons?limit=0", headers=H), 422, "validation_error")
    detail = client.get(f"/v1/galleries/{gid}/persons/{a['id']}", headers=H).json()
    assert detail["samples"] == len(detail["sample_list"]) == a["samples"] >= 1
    r = client.patch(
        f"/v1/galleries/{gid}/persons/{a['id']}", json={"name": "Ann V.", "metadata": {"t": 1}}, headers=H
    )
    assert r.status_code == 200 and r.json()["name"] == "Ann V." and r.json()["metadata"] == {"t": 1}
    _envelope(
        client.patch(f"/v1/galleries/{gid}/persons/{a['id']}", json={"name": ""}, headers=H),
        422,
        "validation_error",
    )
    sample = detail["sample_list"][0]["id"]
    assert (
        client.delete(f"/v1/galleries/{gid}/persons/{a['id']}/samples/{sample}", headers=H).status_code == 204
    )
    _envelope(
        client.delete(f"/v1/galleries/{gid}/persons/{a['id']}/samples/{sample}", headers=H),
        404,
        "sample_not_found",
    )
    assert (
        client.get(f"/v1/galleries/{gid}/persons/{a['id']}", headers=H).json()["samples"] == a["samples"] - 1
    )
    assert client.delete(f"/v1/galleries/{gid}/persons/{b['id']}", headers=H).status_code == 204
    _envelope(client.get(f"/v1/galleries/{gid}/persons/{b['id']}", headers=H), 404, "person_not_found")
    found = _search(client, gid, img("Tim_Henman", 1), threshold=-1)
    assert b["id"] not in [c["person_id"] for c in found["candidates"]]  # gone from the index too
    other = _gallery(client)
    _envelope(client.get(f"/v1/galleries/{other}/persons/{a['id']}", headers=H), 404, "person_not_found")
    _envelope(client.delete(f"/v1/galleries/{other}/persons/{a['id']}", headers=H), 404, "person_not_found")


def _stored_embedding_bytes(client, person_id: str) -> tuple[bytes, list[bytes]]:
    """(the person's first embedding as raw float32, every file of the store's data)."""
    state = client.app.state.galleries
    store = state.manager().store
    if store.backend == "sqlite":
        con = store._con()
        blob = con.execute("SELECT embedding FROM samples WHERE person_id=?", (person_id,)).fetchone()
        files = [p for p in state.sqlite_path().parent.iterdir() if p.name.startswith("galleries.sqlite3")]
        return (blob[0][:256] if blob else None), [p.read_bytes() for p in files]
    import psycopg

    with psycopg.connect(state.settings.gallery_dsn, autocommit=True) as con:
        row = con.execute(
            "SELECT embedding::text FROM facerec_samples WHERE person_id=%s", (person_id,)
        ).fetchone()
        con.execute("CHECKPOINT")
        paths = [
            r[0]
            for r in con.execute(
                "SELECT pg_relation_filepath(oid) FROM pg_class WHERE relname LIKE 'facerec_%' OR oid IN "
                "(SELECT reltoastrelid FROM pg_class WHERE relname LIKE 'facerec_%')"
            )
            if r[0]
        ]
        root = con.execute("SHOW data_directory").fetchone()[0]
    # A prefix: storage may split a row's bytes into chunks (SQLite overflow pages, PostgreSQL TOAST).
    vec = None if row is None else np.array(row[0].strip("[]").split(","), "<f4").tobytes()[:256]
    return vec, [(Path(root) / p).read_bytes() for p in paths]


def test_deleted_person_leaves_no_rows_and_no_bytes(client):
    gid = _gallery(client, policy=LAX)
    keep = _enroll(client, gid, "keep", img("Pete_Sampras", 1))["person"]
    gone = _enroll(client, gid, "gone", img("Norm_Coleman", 1))["person"]
    vec_gone, files = _stored_embedding_bytes(client, gone["id"])
    vec_keep, _ = _stored_embedding_bytes(client, keep["id"])
    assert vec_gone is not None and any(vec_gone in f for f in files)  # the scan sees stored embeddings
    assert client.delete(f"/v1/galleries/{gid}/persons/{gone['id']}", headers=H).status_code == 204
    after, files = _stored_embedding_bytes(client, gone["id"])
    assert after is None  # no row
    assert not any(vec_gone in f for f in files) and any(vec_keep in f for f in files)
    assert client.delete(f"/v1/galleries/{gid}", headers=H).status_code == 204
    _, files = _stored_embedding_bytes(client, keep["id"])
    assert not any(vec_keep in f for f in files)  # the whole gallery is gone


def test_contract_mismatch_is_refused(client):
    """A gallery built with another model (its pinned contract differs from the served model's)."""
    gid = _gallery(client, policy=LAX)
    person = _enroll(client, gid, "p", img("Renee_Zellweger", 1))["person"]
    store = client.app.state.galleries.manager().store
    if store.backend == "sqlite":
        store._con().execute(
            "UPDATE galleries SET contract_id='0123456789abcdef', model_name='old 0.9' WHERE id=?", (gid,)
        )
    else:
        with store._tx() as con:
            con.execute(
                "UPDATE facerec_galleries SET contract_id='0123456789abcdef', model_name='old 0.9' "
                "WHERE id=%s",
                (gid,),
            )
    body = _envelope(_search_raw(client, gid), 409, "contract_mismatch")
    assert "0123456789abcdef" in body["error"]["message"] and "old 0.9" in body["error"]["message"]
    _envelope(
        client.post(
            f"/v1/galleries/{gid}/persons",
            data={"name": "q"},
            files=[("images", img("Sheryl_Crow", 1))],
            headers=H,
        ),
        409,
        "contract_mismatch",
    )
    _envelope(
        client.post(
            f"/v1/galleries/{gid}/persons/{person['id']}/samples",
            files=[("images", img("Renee_Zellweger", 2))],
            headers=H,
        ),
        409,
        "contract_mismatch",
    )
    g = client.get(f"/v1/galleries/{gid}", headers=H).json()
    assert g["usable"] is False and g["operating_point"] is None
    assert client.delete(f"/v1/galleries/{gid}", headers=H).status_code == 204  # management still works


def _search_raw(client, gid):
    return client.post(f"/v1/galleries/{gid}/search", files={"image": img("Renee_Zellweger", 2)}, headers=H)


def test_concurrent_enroll_and_search(client):
    gid = _gallery(client, policy=LAX)
    seed = _enroll(client, gid, "Valentino", img("Valentino_Rossi", 1))["person"]
    people = [
        "Walter_Mondale",
        "Xavier_Malisse",
        "Yasser_Arafat",
        "Tommy_Thompson",
        "Silvan_Shalom",
        "Rubens_Barrichello",
    ]
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def enroll(name):
        try:
            results[name] = client.post(
                f"/v1/galleries/{gid}/persons",
                data={"name": name},
                files=[("images", img(name, 1))],
                headers=H,
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def search(i):
        try:
            results[f"s{i}"] = client.post(
                f"/v1/galleries/{gid}/search", files={"image": img("Valentino_Rossi", 1)}, headers=H
            )
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=enroll, args=(n,)) for n in people] + [
        threading.Thread(target=search, args=(i,)) for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for n in people:
        assert results[n].status_code == 201, results[n].text
    enrolled = set(people)
    for i in range(6):
        body = results[f"s{i}"].json()
        assert body["decision"] == "match" and body["person"]["id"] == seed["id"]
        assert body["similarity"] == pytest.approx(1.0, abs=1e-3)
    g = client.get(f"/v1/galleries/{gid}", headers=H).json()
    assert g["persons"] == 1 + len(enrolled) and g["samples"] == 1 + len(enrolled)
    for n in enrolled:  # each enrolled photo finds its own person
        top = _search(client, gid, img(n, 1))
        assert top["person"] is not None and top["person"]["name"] == n


# ----------------------------------------------------------------------------------------- cross-cutting
def _routes(gid="0" * 32, pid="1" * 32, sid="2" * 32):
    base = f"/v1/galleries/{gid}"
    return [
        ("post", "/v1/galleries"),
        ("get", "/v1/galleries"),
        ("get", base),
        ("patch", base),
        ("delete", base),
        ("post", f"{base}/persons"),
        ("get", f"{base}/persons"),
        ("get", f"{base}/persons/{pid}"),
        ("patch", f"{base}/persons/{pid}"),
        ("delete", f"{base}/persons/{pid}"),
        ("post", f"{base}/persons/{pid}/samples"),
        ("delete", f"{base}/persons/{pid}/samples/{sid}"),
        ("post", f"{base}/enroll"),
        ("post", f"{base}/search"),
    ]


def test_every_gallery_route_needs_a_key_and_is_documented(client):
    for method, path in _routes():
        _envelope(getattr(client, method)(path), 401, "unauthorized")
        _envelope(
            getattr(client, method)(path, headers={"X-API-Key": "wrong-key-but-long-enough"}),
            401,
            "unauthorized",
        )
    spec = client.get("/openapi.json").json()["paths"]
    documented = {(m, p) for p, ops in spec.items() for m in ops}
    for method, path in _routes("{gallery_id}", "{person_id}", "{sample_id}"):
        assert (method, path) in documented, (method, path)
    for path in (
        "/v1/galleries/{gallery_id}/persons",
        "/v1/galleries/{gallery_id}/persons/{person_id}/samples",
        "/v1/galleries/{gallery_id}/search",
    ):  # both encodings of the image routes documented
        assert set(spec[path]["post"]["requestBody"]["content"]) == {
            "multipart/form-data",
            "application/json",
        }
    # Unknown ids answer 404 on every route that names one.
    for method, path in _routes()[2:]:
        kw = {"json": {}} if method in ("post", "patch") else {}
        r = getattr(client, method)(path, headers=H, **kw)
        assert r.status_code == 404 and r.json()["error"]["code"].endswith("_not_found"), (
            method,
            path,
            r.text,
        )


def test_metrics_and_no_embeddings_in_logs(client, caplog):
    gid = _gallery(client, policy=LAX)
    with caplog.at_level(logging.DEBUG):
        person = _enroll(client, gid, "Jacques", img("Jacques_Rogge", 1))["person"]
        _search(client, gid, img("Jacques_Rogge", 2))
        client.delete(f"/v1/galleries/{gid}/persons/{person['id']}", headers=H)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert person["id"] in text  # operations are logged, by id ...
    assert not re.search(r"(-?\d+\.\d{3,}[,\s]+){8}", text)  # ... never a vector of numbers
    metrics = client.get("/metrics").text
    assert 'facerec_gallery_searches_total{decision="match"}' in metrics
    assert 'facerec_gallery_samples_total{outcome="enrolled"}' in metrics
    assert (
        'facerec_request_duration_seconds_count{method="POST",route="/v1/galleries/{gallery_id}/search"'
        in metrics
    )


def test_gallery_settings_and_unreachable_database_stop_the_start(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from facerec.gallery import StoreUnavailable
    from facerec.gallery import ann_policy

    with monkeypatch.context() as m:
        m.setattr(ann_policy, "faiss_module", lambda: None)
        with pytest.raises(ValidationError, match=r"FACEREC_GALLERY_INDEX=approximate needs faiss"):
            Settings(model=DEFAULT_MODEL_DIR, api_keys=[KEY], gallery_index="approximate")

    with pytest.raises(ValidationError, match="FACEREC_GALLERY_DSN"):
        Settings(model=DEFAULT_MODEL_DIR, api_keys=[KEY], gallery_backend="pgvector")
    with pytest.raises(ValidationError):
        Settings(model=DEFAULT_MODEL_DIR, api_keys=[KEY], gallery_backend="redis")
    bad = Settings(
        model=DEFAULT_MODEL_DIR,
        api_keys=[KEY],
        device="cpu",
        warmup=False,
        gallery_backend="pgvector",
        gallery_dsn=f"postgresql://nobody@/none?host={tmp_path}",
    )
    assert "nobody" not in repr(bad)  # the DSN (it may hold a password) stays out of reprs
    app = create_app(bad, announce_key=False)
    with pytest.raises(StoreUnavailable, match="cannot connect"), TestClient(app):
        pass
