"""Decompression bombs of every format are refused from their header, before any allocation
(issue 16, item 1); legal images of every accepted format still decode; formats that cannot be
sized from their header are refused."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerec.data.image_io import ImageDecodeError, inspect_image, load_image

ROOT = Path(__file__).resolve().parents[1]


def gif_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """35 bytes: a width x height logical screen holding one 1x1 frame (the red-team case)."""
    return (
        b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00" + b"\x3b"
    )


def gif_big_frame(width: int = 20_000, height: int = 20_000) -> bytes:
    """A 1x1 screen whose one frame claims width x height: OpenCV refuses a frame past the screen
    (grfmt_gif.cpp asserts it, before allocating the frame), so the header reads 1x1 and the
    decoder says no; tests/test_header_parity.py checks that assertion on real GIFs."""
    return (
        b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c" + struct.pack("<HHHH", 0, 0, width, height) + b"\x00" + b"\x02\x02\x44\x01\x00" + b"\x3b"
    )


def tiff_bomb(width: int = 20_000, height: int = 20_000, rows_per_strip: int = 64) -> bytes:
    """An 8-bit grey deflate TIFF whose strips all point at one compressed strip of zeros: a few
    KB that decode to width x height pixels."""
    strip = zlib.compress(b"\0" * (width * rows_per_strip), 9)
    n = math.ceil(height / rows_per_strip)
    offsets_at = 8 + len(strip)
    counts_at = offsets_at + 4 * n
    ifd_at = counts_at + 4 * n
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8),  # deflate
        (262, 3, 1, 1), (273, 4, n, offsets_at), (277, 3, 1, 1), (278, 4, 1, rows_per_strip),
        (279, 4, n, counts_at),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if count == 1 and typ == 3:
            ifd += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, typ, count, value)
    ifd += struct.pack("<I", 0)
    return (b"II*\x00" + struct.pack("<I", ifd_at) + strip + struct.pack(f"<{n}I", *[8] * n)
            + struct.pack(f"<{n}I", *[len(strip)] * n) + ifd)


def test_the_bomb_builders_make_real_images():
    """Small twins of the bombs decode: the large ones would really allocate their size."""
    gif = load_image(gif_bomb(40, 30))
    assert gif.shape == (30, 40, 3)
    tif = load_image(tiff_bomb(300, 200, rows_per_strip=16))
    assert tif.shape == (200, 300, 3) and int(tif.max()) == 0
    assert len(tiff_bomb()) < 16_000  # a few KB for 400 MP


@pytest.mark.parametrize("bomb", [gif_bomb, tiff_bomb])
def test_bombs_are_refused_from_the_header(bomb):
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"20000x20000 = 400000000 pixels, more than the limit"):
        load_image(bomb())
    assert time.perf_counter() - start < 2.0


def test_a_gif_frame_larger_than_its_screen_is_refused_by_the_decoder():
    # (its memory is measured with the other bombs in test_bombs_cost_neither_memory_nor_time)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="corrupt or truncated GIF"):
        load_image(gif_big_frame())
    assert time.perf_counter() - start < 2.0


def test_a_smaller_limit_of_the_caller_is_what_counts():
    ok, buf = cv2.imencode(".gif", np.zeros((1000, 1000, 3), np.uint8))
    data = buf.tobytes()
    assert load_image(data, max_pixels=1_000_000).shape == (1000, 1000, 3)
    with pytest.raises(ImageDecodeError, match="more than the limit of 999999"):
        load_image(data, max_pixels=999_999)


_MEASURE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from tests.test_image_bombs import gif_big_frame, gif_bomb, tiff_bomb
from facerec.data.image_io import ImageDecodeError, load_image
bombs = [gif_bomb(), tiff_bomb(), gif_big_frame(), gif_bomb(), tiff_bomb()]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
refused = 0
for b in bombs:
    try:
        load_image(b)
    except ImageDecodeError:
        refused += 1
print(json.dumps({{"refused": refused, "seconds": time.perf_counter() - start,
                  "grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
"""


@pytest.mark.timeout(120)
def test_bombs_cost_neither_memory_nor_time():
    # OpenCV's own pixel limit is switched off in the child, so the header check alone is measured.
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": str(2**40), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEASURE.format(root=str(ROOT))], env=env,
                         capture_output=True, text=True, timeout=100, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["refused"] == 5
    assert result["seconds"] < 2.0  # decoding one of them took ~9-14 s
    assert result["grew_kib"] < 200 * 1024  # decoding one of them took 2.7 GB


_BACKSTOP = """
import sys
sys.path.insert(0, {root!r})
import facerec.runtime  # what the service imports before anything loads OpenCV
import cv2, numpy as np
from tests.test_image_bombs import gif_bomb
try:
    cv2.imdecode(np.frombuffer(gif_bomb(10_001, 10_001), np.uint8), cv2.IMREAD_COLOR)
    print("decoded")
except cv2.error:
    print("refused")
"""


@pytest.mark.timeout(120)
def test_opencv_itself_refuses_a_bomb_in_a_process_that_imported_the_runtime():
    """The second line of defence: OpenCV's own ceiling (100 MP, the hard cap of the pixel setting)
    is set before OpenCV loads, when the environment does not set it."""
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    out = subprocess.run([sys.executable, "-c", _BACKSTOP.format(root=str(ROOT))], env=env,
                         capture_output=True, text=True, timeout=100, check=True)
    assert out.stdout.strip().splitlines()[-1] == "refused"


def _bgr(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.dstack([x * 4 % 256, y * 5 % 256, (x + y) * 3 % 256]).astype(np.uint8)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tiff", ".webp", ".ppm", ".gif", ".jpg"])
def test_legal_images_of_every_accepted_format_decode(ext):
    bgr = _bgr()
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []  # 101: lossless
    ok, buf = cv2.imencode(ext, bgr, params)
    assert ok
    data = buf.tobytes()
    header = inspect_image(data)
    assert (header.width, header.height) == (64, 48)
    rgb = load_image(data)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    diff = np.abs(rgb.astype(int) - bgr[:, :, ::-1].astype(int))
    swapped = np.abs(rgb.astype(int) - bgr.astype(int))
    assert diff.mean() < swapped.mean() / 2  # RGB, not BGR
    # Lossless formats give the pixels back; JPEG rounds its blocks, OpenCV's GIF encoder
    # quantises to a fixed palette (16 grey levels of error on average for this gradient).
    tolerance = {".jpg": 8, ".gif": 25}.get(ext, 0)
    assert diff.mean() <= tolerance if tolerance else diff.max() == 0


def test_a_grey_pgm_and_a_bigtiff_decode():
    grey = _bgr()[:, :, 0]
    ok, buf = cv2.imencode(".pgm", grey)
    assert np.array_equal(load_image(buf.tobytes())[:, :, 1], grey)
    tiff = pytest.importorskip("PIL.Image")
    import io

    out = io.BytesIO()
    tiff.fromarray(_bgr()[:, :, ::-1]).save(out, "TIFF", big_tiff=True)
    data = out.getvalue()
    if data[2:4] != b"+\x00":  # Pillow too old to write BigTIFF
        pytest.skip("Pillow cannot write BigTIFF here")
    assert np.array_equal(load_image(data), _bgr()[:, :, ::-1])


@pytest.mark.parametrize("ext", [".jp2", ".hdr", ".ras", ".pfm", ".pam"])
def test_formats_without_a_header_check_are_refused(ext):
    img = _bgr() if ext != ".pfm" else _bgr().astype(np.float32)
    ok, buf = cv2.imencode(ext, img)
    assert ok and cv2.imdecode(buf, cv2.IMREAD_COLOR) is not None  # OpenCV itself would decode it
    with pytest.raises(ImageDecodeError, match="not a supported image format"):
        load_image(buf.tobytes())


def test_tiff_samples_beyond_16_bits_are_refused_before_decoding():
    ok, buf = cv2.imencode(".tiff", _bgr().astype(np.float32))
    with pytest.raises(ImageDecodeError, match="32-bit samples"):
        load_image(buf.tobytes())


@pytest.mark.parametrize("data", [
    b"GIF89a\x10", b"II*\x00\xff\xff\xff\x00", b"BM" + b"\0" * 10, b"RIFF\0\0\0\0WEBPVP8 ",
    b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\0\0\0\0\0", b"P6 12", b"\xff\xd8\xff\xe0\0\x10JFIF",
])
def test_truncated_or_empty_headers_are_clean_errors(data):
    with pytest.raises(ImageDecodeError):
        load_image(data)


# ------------------------------------------------------------------------------ the service
@pytest.mark.timeout(300)
def test_verify_with_a_gif_bomb_answers_422_at_once(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("pydantic_settings")
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from service.testing import SAMPLES, shared_model_dir, wait_ready

    key = "bombs-key-0123456789abcdef"
    settings = Settings(model=shared_model_dir(tmp_path_factory), api_keys=[key], device="cpu")
    face = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg").read_bytes()
    with TestClient(create_app(settings, announce_key=False)) as client:
        wait_ready(client.get)
        for bomb in (gif_bomb(), tiff_bomb()):
            start = time.perf_counter()
            r = client.post("/v1/verify", files={"image_a": face, "image_b": bomb},
                            headers={"X-API-Key": key})
            assert time.perf_counter() - start < 5.0
            assert r.status_code == 422, r.text
            body = r.json()
            assert body["error"]["code"] == "decode_error"
            assert "more than the limit" in body["error"]["message"]
            assert body["error"]["details"] == {"field": "image_b"}
        ok = client.post("/v1/verify", files={"image_a": face, "image_b": face}, headers={"X-API-Key": key})
        assert ok.status_code == 200, ok.text
