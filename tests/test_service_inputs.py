"""Bad input gets a 4xx envelope and the service keeps serving; unusual but valid images
(EXIF rotation, CMYK, 16-bit, greyscale, animated GIF) are answered normally."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("pydantic_settings")
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from service.testing import SAMPLES, shared_model_dir, wait_ready

KEY = "inputs-key-0123456789abcdef"
H = {"X-API-Key": KEY}
FACE = SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg"
A1 = FACE.read_bytes()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(model=shared_model_dir(tmp_path_factory), api_keys=[KEY], device="cpu")
    with TestClient(create_app(settings, announce_key=False)) as c:
        wait_ready(c.get)
        yield c


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(size: int = 20_000) -> bytes:
    """A real 20,000 x 20,000 grey PNG (400 MP when decoded) of ~400 KB, built row by row."""
    comp = zlib.compressobj(9)
    row = b"\0" * (size + 1)  # filter byte + pixels
    data = b"".join(comp.compress(row) for _ in range(size)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def collage(n: int = 4) -> bytes:
    people = sorted(p for p in SAMPLES.iterdir() if p.is_dir())[:n]
    tiles = [Image.open(next(iter(sorted(p.glob("*.jpg"))))).convert("RGB") for p in people]
    sheet = Image.new("RGB", (250 * n, 250), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, (250 * i, 0))
    return _encode(sheet, "JPEG", quality=95)


def _error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "request_id"} and body["request_id"] == r.headers["X-Request-ID"]
    if code:
        assert body["error"]["code"] == code, body
    return body


BAD_FILES = {
    "empty": (b"", "empty_image"),
    "truncated_jpeg": (A1[: len(A1) // 3], None),  # decode_error or no_face: the decoder may salvage rows
    "not_an_image": (b"%PDF-1.4 this is not an image at all" * 20, "decode_error"),
    "bomb_20000x20000": (png_bomb(), "decode_error"),
    "tiny_10x10": (_encode(Image.new("RGB", (10, 10), "gray"), "PNG"), "no_face"),
    "blank_no_face": (_encode(Image.new("RGB", (400, 300), (200, 190, 180)), "JPEG"), "no_face"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_images_are_4xx_and_service_keeps_serving(client, name):
    data, code = BAD_FILES[name]
    body = _error(client.post("/v1/quality", files={"image": data}, headers=H), 422, code)
    assert body["error"]["details"]["field"] == "image"
    r = client.post("/v1/verify", files={"image_a": A1, "image_b": data}, headers=H)
    assert _error(r, 422, code)["error"]["message"].startswith("image_b")
    assert client.post("/v1/quality", files={"image": A1}, headers=H).status_code == 200


def test_bomb_is_refused_by_its_header_not_decoded(client):
    body = _error(client.post("/v1/embed", files={"image": png_bomb()}, headers=H), 422, "decode_error")
    assert "20000x20000" in body["error"]["message"]


def test_too_many_faces(client, monkeypatch):
    sheet = collage(4)
    d = client.post("/v1/detect", files={"image": sheet}, headers=H).json()
    assert d["faces_found"] >= 4 and len(d["faces"]) == d["faces_found"]
    areas = [(f["face"]["box"][2] - f["face"]["box"][0]) * (f["face"]["box"][3] - f["face"]["box"][1])
             for f in d["faces"]]
    assert areas == sorted(areas, reverse=True)  # largest first
    monkeypatch.setattr(client.app.state.engine.pipeline, "max_faces", 2)
    for path, field in (("/v1/quality", "image"), ("/v1/detect", "image")):
        body = _error(client.post(path, files={field: sheet}, headers=H), 422, "too_many_faces")
        assert body["error"]["details"]["limit"] == 2
    monkeypatch.undo()
    q = client.post("/v1/quality", files={"image": sheet}, headers=H).json()
    assert q["faces_found"] == d["faces_found"]


@pytest.mark.parametrize("kwargs,code", [
    ({"files": {"img": A1}}, "validation_error"),                          # wrong file field name
    ({"files": {"image": A1, "extra": A1}}, None),                         # unknown field
    ({"files": {"image": (None, b"not a file")}}, "validation_error"),    # text part instead of a file
    ({"json": {"img": base64.b64encode(A1).decode()}}, "validation_error"),
    ({"json": {"image": "***not base64***"}}, "invalid_base64"),
    ({"json": {"image": base64.b64encode(A1).decode()[:-3]}}, "invalid_base64"),
    ({"json": {"image": 12}}, "validation_error"),
    ({"json": ["image"]}, "validation_error"),
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, "invalid_json"),
    ({"content": b"", "headers": {"Content-Type": "application/json"}}, "validation_error"),
    ({"content": b"", "headers": {}}, "unsupported_media_type"),
    ({"content": A1, "headers": {"Content-Type": "image/jpeg"}}, "unsupported_media_type"),
    ({"content": b"--x\r\ngarbage", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, None),
])
def test_malformed_requests(client, kwargs, code):
    headers = {**H, **kwargs.pop("headers", {})}
    r = client.post("/v1/embed", headers=headers, **kwargs)
    assert 400 <= r.status_code < 500
    _error(r, r.status_code, code)


def test_verify_wrong_field_names(client):
    _error(client.post("/v1/verify", files={"image_a": A1, "image_c": A1}, headers=H), 422, "validation_error")
    _error(client.post("/v1/verify", json={"image_a": "", "imageB": ""}, headers=H), 422, "validation_error")
    assert client.post("/v1/verify", files={"image_a": A1, "image_b": A1}, headers=H).status_code == 200


def _reference(client) -> dict:
    return client.post("/v1/quality", files={"image": A1}, headers=H).json()


def test_exif_orientation_is_applied(client):
    ref = _reference(client)
    upright = Image.open(FACE)
    # Stored rotated 90 degrees counter-clockwise, with EXIF orientation 6 ("rotate 90 CW to view").
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    r = client.post("/v1/quality", files={"image": _encode(stored, "JPEG", quality=98, exif=exif.tobytes())},
                    headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["face"]["box"] == pytest.approx(ref["face"]["box"], abs=6)  # the upright geometry


def _sixteen_bit_png() -> bytes:
    bgr = cv2.imread(str(FACE), cv2.IMREAD_COLOR)
    ok, buf = cv2.imencode(".png", bgr.astype(np.uint16) * 257)
    assert ok
    return buf.tobytes()


def _animated_gif() -> bytes:
    face = Image.open(FACE).convert("RGB")
    blank = Image.new("RGB", face.size, "white")
    return _encode(face, "GIF", save_all=True, append_images=[blank, blank], duration=100, loop=0)


@pytest.mark.parametrize("kind", ["cmyk_jpeg", "png_16bit", "greyscale_jpeg", "greyscale_png",
                                  "rgba_png", "animated_gif", "webp"])
def test_unusual_formats_are_answered_normally(client, kind):
    face = Image.open(FACE).convert("RGB")
    data = {
        "cmyk_jpeg": lambda: _encode(face.convert("CMYK"), "JPEG", quality=95),
        "png_16bit": _sixteen_bit_png,
        "greyscale_jpeg": lambda: _encode(face.convert("L"), "JPEG", quality=95),
        "greyscale_png": lambda: _encode(face.convert("L"), "PNG"),
        "rgba_png": lambda: _encode(face.convert("RGBA"), "PNG"),
        "animated_gif": _animated_gif,
        "webp": lambda: _encode(face, "WEBP", quality=90),
    }[kind]()
    if kind == "png_16bit":
        assert data[24] == 16  # really 16 bits per channel
    r = client.post("/v1/quality", files={"image": data}, headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["face"]["box"] == pytest.approx(_reference(client)["face"]["box"], abs=8)
