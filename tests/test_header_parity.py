"""The header parsers size an image exactly as OpenCV's decoders will (issue 16 review): where they
disagree, a small header can hide a large decode. Each case is checked against ``cv2.imdecode``
itself, and every parser is bounded in time whatever the input (it runs on the event loop)."""

from __future__ import annotations

import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from facerec.data.image_headers import HeaderError, read_header
from facerec.data.image_io import ImageDecodeError, inspect_image, load_image
from facerec.runtime.admission import pixel_count

_FMT = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 16: "Q", 17: "q"}


def tiff(entries, pixels: bytes = b"", big: bool = False, next_ifds: list[bytes] | None = None) -> bytes:
    """A little-endian TIFF (or BigTIFF) whose first IFD holds ``entries`` (tag, type, value),
    in the given order (duplicates allowed), with ``pixels`` as its one strip."""
    entry, head = (20, 16) if big else (12, 8)
    count = "Q" if big else "H"
    ifd_at = head
    data_at = ifd_at + struct.calcsize(count) + entry * (len(entries) + 2) + (8 if big else 4)
    rows = [*entries, (273, 4, data_at), (279, 4, len(pixels))]
    ifd = struct.pack("<" + count, len(rows))
    for tag, typ, value in rows:
        field = struct.pack("<" + _FMT[typ], value).ljust(8 if big else 4, b"\0")
        ifd += struct.pack("<HHQ" if big else "<HHI", tag, typ, 1) + field
    nxt = data_at + len(pixels) if next_ifds else 0
    ifd += struct.pack("<Q" if big else "<I", nxt)
    start = b"II+\x00" + struct.pack("<HHQ", 8, 0, ifd_at) if big else b"II*\x00" + struct.pack("<I", ifd_at)
    return start + ifd + pixels + b"".join(next_ifds or [])


def grey_tiff(width_entries, height_entries, w: int, h: int, compress: bool = False, big=False) -> bytes:
    pixels = zlib.compress(b"\x00" * (w * h), 9) if compress else bytes(range(256)) * (w * h // 256 + 1)
    return tiff([*width_entries, *height_entries, (258, 3, 8), (259, 3, 8 if compress else 1), (262, 3, 1),
                 (277, 3, 1), (278, 4, h)], pixels[: w * h] if not compress else pixels, big)


def decoded_shape(data: bytes):
    out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return None if out is None else out.shape[:2]


# ------------------------------------------------------------------------------------------ TIFF
def test_duplicate_tiff_size_tags_first_wins_as_in_libtiff():
    data = grey_tiff([(256, 4, 30), (256, 3, 1)], [(257, 4, 20), (257, 3, 1)], 30, 20)
    assert decoded_shape(data) == (20, 30)  # libtiff: the first entry, later duplicates ignored
    header = read_header(data)
    assert (header.width, header.height) == (30, 20)


def test_the_duplicate_tag_bomb_is_refused_from_its_header():
    # The reviewer's case: ~88 KB that read as 1x1 under "last wins" and decode 9500x9500 (647 MB).
    bomb = grey_tiff([(256, 4, 9500), (256, 3, 1)], [(257, 4, 9500), (257, 3, 1)], 9500, 9500, compress=True)
    assert len(bomb) < 200_000
    with pytest.raises(ImageDecodeError, match="9500x9500 = 90250000 pixels, more than the limit"):
        inspect_image(bomb, max_pixels=1_000_000)  # the header alone: nothing is decoded


@pytest.mark.parametrize("typ", [1, 3, 4, 6, 8, 9, 16, 17])
def test_tiff_sizes_in_every_integer_type_libtiff_reads(typ):
    big = typ in (16, 17)  # 8-byte types exist only in BigTIFF
    data = grey_tiff([(256, typ, 24)], [(257, typ, 16)], 24, 16, big=big)
    assert decoded_shape(data) == (16, 24)
    header = read_header(data)
    assert (header.width, header.height) == (24, 16)


@pytest.mark.parametrize("typ,value", [(6, -24), (8, -24), (9, -24), (17, -24), (3, 0)])
def test_negative_or_zero_tiff_sizes_are_refused(typ, value):
    data = grey_tiff([(256, typ, value)], [(257, 3, 16)], 24, 16, big=typ == 17)
    with pytest.raises(HeaderError, match="non-positive|empty"):
        read_header(data)


def test_tiff_is_sized_by_its_first_page_which_is_the_one_decoded():
    small = grey_tiff([(256, 3, 8)], [(257, 3, 4)], 8, 4)
    # a second page, 64x64, chained after the first: imdecode never reads it
    page2_at = len(small)
    second = tiff([(256, 3, 64), (257, 3, 64), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1),
                   (278, 4, 64)], b"\x00" * 4096)[8:]  # its IFD and strip, offsets shifted below
    shifted = bytearray(second)
    n = struct.unpack_from("<H", shifted, 0)[0]
    for k in range(n):  # strip offsets of the second page are relative to the whole file
        tag = struct.unpack_from("<H", shifted, 2 + 12 * k)[0]
        if tag == 273:
            struct.pack_into("<I", shifted, 2 + 12 * k + 8,
                             struct.unpack_from("<I", shifted, 2 + 12 * k + 8)[0] - 8 + page2_at)
    data = bytearray(small)
    n1 = struct.unpack_from("<H", data, 8)[0]
    struct.pack_into("<I", data, 8 + 2 + 12 * n1, page2_at)  # page 1's "next IFD" -> page 2
    data = bytes(data) + bytes(shifted)
    ok, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert ok and [p.shape for p in pages] == [(4, 8), (64, 64)]  # a real two-page TIFF
    assert decoded_shape(data) == (4, 8)
    header = read_header(data)
    assert (header.width, header.height) == (8, 4)


@pytest.mark.parametrize("big", [False, True])
def test_a_tiff_directory_of_too_many_entries_is_refused_at_once(big):
    # The reviewer's loops: 64 overlapping IFDs of 65520 (or ~524k BigTIFF) entries took 0.7 s
    # (5.2 s) to size. Only the first IFD is read now, and one of over 1000 entries is refused.
    entries = 524_000 if big else 65_520
    entry = 20 if big else 12
    b = bytearray((16 if big else 8) + 8 + entries * entry + 8)
    if big:
        b[:16] = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16)
        struct.pack_into("<Q", b, 16, entries)
    else:
        b[:8] = b"II*\x00" + struct.pack("<I", 8)
        struct.pack_into("<H", b, 8, entries)
    start = time.perf_counter()
    assert pixel_count(bytes(b)) is None
    with pytest.raises(HeaderError, match="entries"):
        read_header(bytes(b))
    assert time.perf_counter() - start < 0.5


# ------------------------------------------------------------------------------------------- PNM
@pytest.mark.parametrize("head", [
    b"P5 30 20\n255\n", b"P5 30#20\n255\n", b"P5\n# a comment 99 99\n30 20\n255\n",
    b"P5 30\n#\n20\n255\n", b"P5\t30\r20 255\n", b"P5 30#20 255 ",
    b"P5 30x20\n255\n",  # any byte ends a number, not only whitespace
])
def test_pnm_size_is_read_as_opencv_reads_it(head):
    data = head + bytes(range(256)) * 3
    shape = decoded_shape(data)
    header = read_header(data)
    assert shape == (header.height, header.width)


def test_the_pnm_comment_trick_is_refused_from_its_header():
    # '#' right after the width ends the number; OpenCV reads the "comment" as the height.
    p4 = b"P4 8000#8000\n1" + b"\x00" * (8000 * 8000 // 8)
    with pytest.raises(ImageDecodeError, match="8000x8000 = 64000000 pixels"):
        inspect_image(p4, max_pixels=1_000_000)
    p5 = b"P5 3000#3000\n255\n" + b"\x80" * (3000 * 3000)
    with pytest.raises(ImageDecodeError, match="3000x3000 = 9000000 pixels"):
        load_image(p5, max_pixels=1_000_000)


@pytest.mark.parametrize("head", [b"P5 30 x20\n255\n", b"P5 30 -20\n255\n", b"P5 30 "])
def test_pnm_headers_opencv_would_not_read_are_refused(head):
    with pytest.raises(HeaderError):
        read_header(head)


# ------------------------------------------------------------------------------------------- GIF
def test_opencv_refuses_a_gif_frame_past_the_screen_so_the_screen_is_the_size():
    ok, buf = cv2.imencode(".gif", np.full((100, 120, 3), 128, np.uint8))
    gif = bytearray(buf.tobytes())
    desc = gif.index(b"\x2c", 13)
    assert struct.unpack_from("<HHHH", gif, desc + 1) == (0, 0, 120, 100)
    for screen, at in [((60, 100), (0, 0)), ((120, 50), (0, 0)), ((120, 100), (10, 0)), ((120, 100), (0, 1))]:
        bad = bytearray(gif)
        struct.pack_into("<HH", bad, 6, *screen)
        struct.pack_into("<HH", bad, desc + 1, *at)
        assert decoded_shape(bytes(bad)) is None  # grfmt_gif.cpp: left + width <= screen width
        with pytest.raises(ImageDecodeError):
            load_image(bytes(bad))
    struct.pack_into("<HH", gif, 6, 200, 150)  # a frame inside a larger screen: the screen's size
    assert decoded_shape(bytes(gif)) == (150, 200) == (read_header(bytes(gif)).height, read_header(bytes(gif)).width)


# ---------------------------------------------------------------------------- bounded parse time
M = 32 * 1024 * 1024  # the service accepts bodies of up to 100 MB


@pytest.mark.parametrize("data", [
    b"\xff\xd8\xff" + b"\x00" * M,  # 10 MB: 0.34 s before
    b"\xff\xd8" + b"\xff\xd0" * (M // 2),  # lone RST markers, 10 MB: 0.47 s before
    b"\xff\xd8" + b"\xff" * M,  # fill bytes, 10 MB: 0.59 s before
    b"\xff\xd8" + b"\xff\x00" * (M // 2),
    b"GIF89a\x10\x00\x10\x00\x00\x00\x00\x21\xf9" + b"\x01\x00" * (M // 2) + b"\x00;",  # 10 MB: 0.28 s before
    b"P5\n#" + b"x" * M + b"\n16 16\n255\n",
], ids=["jpeg-zeros", "jpeg-rst", "jpeg-fill", "jpeg-ff00", "gif-subblocks", "pnm-comment"])
def test_every_pathological_header_is_sized_or_refused_quickly(data):
    start = time.perf_counter()
    pixel_count(data)  # what the service runs on its event loop for every image
    assert time.perf_counter() - start < 0.5  # ~20 ms measured; the old walks 1-2 s


def test_a_jpeg_frame_header_beyond_the_first_16_mb_is_refused():
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    jpeg = buf.tobytes()
    app = b"\xff\xe1\xff\xff" + b"\x00" * 65533  # one 64 KB APP1 segment
    assert read_header(jpeg[:2] + app * 10 + jpeg[2:]).width == 8
    with pytest.raises(HeaderError, match="first 16777216 bytes"):
        read_header(jpeg[:2] + app * 260 + jpeg[2:])  # 17 MB of metadata before the frame
