"""The format and pixel size of an encoded image, read from its header without decoding it.

``load_image`` only hands bytes to OpenCV once it knows how many pixels the decoder will allocate:
a 35-byte GIF can declare a 20000x20000 canvas and a 4 KB TIFF 40,000 strips that all point at
one zero strip, and OpenCV allocates (and fills) the full canvas before anyone can look at its
shape. So the accepted formats are an allow-list, each with a parser for the fields its decoder
sizes the image by:

=========  ===========================================================================
JPEG       the first SOF segment (the frame libjpeg decodes)
PNG        IHDR
GIF        the logical screen (OpenCV refuses a frame reaching past it)
TIFF       width / length, samples and bits per sample of the first IFD (also BigTIFF)
BMP        BITMAPCOREHEADER or BITMAPINFOHEADER and its successors (negative height = top-down)
WebP       the VP8 frame header, the VP8L header or the VP8X canvas
PNM        P1-P6 (PBM / PGM / PPM: the ASCII width and height, read as OpenCV reads them)
=========  ===========================================================================

Everything else OpenCV could decode (AVIF, JPEG 2000, HDR, Sun raster, PFM, PAM, OpenEXR, ...) is
refused: no face photo needs it, and a format that is never decoded cannot be a bomb. A
recognised format whose header cannot be read is refused too, rather than decoded "to see".
Every parser reads a bounded part of the file (microseconds to a millisecond whatever the
input), so sizing an image can run on the service's event loop.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "BMP", "WebP", "PNM")

_MAX_TIFF_ENTRIES = 1000  # fields in one TIFF directory: a photo's has a few dozen


class HeaderError(ValueError):
    """Not one of the supported formats, or a header that does not give a usable size."""


@dataclass(frozen=True)
class ImageHeader:
    format: str  # one of SUPPORTED_FORMATS
    width: int  # as stored, before any EXIF rotation (which never changes the pixel count)
    height: int
    bits: int = 8  # largest bits per sample found (TIFF); 8 where the format says nothing else
    channels: int = 0  # samples per pixel where the header says (TIFF), else 0

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _u16le(b: bytes, i: int) -> int:
    return struct.unpack_from("<H", b, i)[0]


_MAX_JPEG_SEGMENTS = 10_000  # markers walked before the frame header: real files have < 100
_JPEG_HEADER_BYTES = 16 * 1024 * 1024  # the frame header must start within this (photos: < 1 MB)
_FILL = re.compile(rb"\xff+")


def _jpeg_segments(data: bytes):
    """(marker, offset) of each marker segment up to the first scan, walked the way libjpeg's
    next_marker does (stray bytes and 0xFF fill skipped) at C speed per run of junk, for at most
    ``_MAX_JPEG_SEGMENTS`` steps within the first ``_JPEG_HEADER_BYTES``: 100 MB of junk or of
    lone RST markers is refused in milliseconds."""
    i = 2
    n = min(len(data), _JPEG_HEADER_BYTES)
    for _ in range(_MAX_JPEG_SEGMENTS):
        i = data.find(b"\xff", i, n)  # libjpeg skips stray bytes before a marker; so do we
        if i >= 0:
            i = _FILL.match(data, i, n).end() - 1  # the last 0xFF of a fill run precedes the marker
        if i < 0 or i + 4 > n:
            if n < len(data):
                raise HeaderError(f"JPEG without a frame header in its first {_JPEG_HEADER_BYTES} bytes")
            return
        marker = data[i + 1]
        if marker in (0xD8, 0x01, 0x00) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data: no header segment follows
            return
        yield marker, i
        i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    raise HeaderError(f"JPEG with more than {_MAX_JPEG_SEGMENTS} markers before its frame header")


def _jpeg(data: bytes) -> tuple[int, int]:
    for marker, i in _jpeg_segments(data):
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG), CC (DAC) are not frames.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                break
            h, w = struct.unpack_from(">HH", data, i + 5)
            return w, h
    raise HeaderError("JPEG without a readable frame header (SOF)")


def jpeg_orientation(data: bytes) -> int:
    """The EXIF Orientation (1-8) of a JPEG, 1 when it has none or it cannot be read. 5-8 mean the
    decoder (which applies it) turns the image by 90 degrees. Reads the first EXIF APP1 segment
    before the scan (the one libjpeg hands OpenCV), IFD0 only: microseconds."""
    try:
        for marker, i in _jpeg_segments(data):
            (length,) = struct.unpack_from(">H", data, i + 2)
            if marker != 0xE1 or data[i + 4 : i + 10] != b"Exif\x00\x00":
                continue
            tiff = data[i + 10 : i + 2 + length]
            order = "<" if tiff[:2] == b"II" else ">"
            (ifd,) = struct.unpack_from(order + "I", tiff, 4)
            (entries,) = struct.unpack_from(order + "H", tiff, ifd)
            for k in range(min(entries, _MAX_TIFF_ENTRIES)):
                tag, typ, _count, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * k)
                if tag == 0x0112 and typ == 3:
                    return value if 1 <= value <= 8 else 1
            return 1
    except (HeaderError, struct.error):
        pass
    return 1


def _gif(data: bytes) -> tuple[int, int]:
    # The logical screen is what OpenCV allocates and returns: its decoder refuses any frame that
    # reaches past the screen (grfmt_gif.cpp asserts left + width <= screen width, checked with
    # OpenCV 5.0 in tests/test_image_bombs.py), so no frame needs to be looked at.
    if len(data) < 13:
        raise HeaderError("GIF header truncated")
    return struct.unpack_from("<HH", data, 6)


# TIFF field types libtiff reads an ImageWidth / ImageLength / BitsPerSample from: BYTE, SHORT,
# LONG, SBYTE, SSHORT, SLONG, LONG8, SLONG8.
_TIFF_INTS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 16: "Q", 17: "q"}


def _tiff(data: bytes) -> tuple[int, int, int, int]:
    """Only the first IFD: it is the page imdecode decodes (later pages are never read), and the
    fields are read as libtiff reads them: the FIRST entry of a tag wins (libtiff ignores later
    duplicates), in any integer type."""
    order = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack_from(order + "H", data, 2)
    if version == 42:
        off_fmt, count_fmt, entry, value_at, first = "I", "H", 12, 8, 4
    elif version == 43 and len(data) >= 16:  # BigTIFF: 8-byte offsets and counts
        off_fmt, count_fmt, entry, value_at, first = "Q", "Q", 20, 12, 8
    else:
        raise HeaderError("TIFF with an unknown version")
    (offset,) = struct.unpack_from(order + off_fmt, data, first)
    off_size = struct.calcsize(off_fmt)
    if not offset or offset + struct.calcsize(count_fmt) > len(data):
        raise HeaderError("TIFF directory offset outside the file")
    (entries,) = struct.unpack_from(order + count_fmt, data, offset)
    if entries > _MAX_TIFF_ENTRIES:  # bounds the work; a photo's directory has a few dozen
        raise HeaderError(f"TIFF directory with {entries} entries (at most {_MAX_TIFF_ENTRIES})")
    base = offset + struct.calcsize(count_fmt)
    if base + entries * entry > len(data):
        raise HeaderError("TIFF directory truncated")
    fields: dict[int, int] = {}
    for k in range(entries):
        tag, typ = struct.unpack_from(order + "HH", data, base + k * entry)
        if tag not in (256, 257, 258, 277) or tag in fields:
            continue  # a later duplicate of a tag is ignored, as libtiff does
        if typ not in _TIFF_INTS:
            raise HeaderError(f"TIFF tag {tag} stored as field type {typ}, not an integer")
        fmt = _TIFF_INTS[typ]
        # BitsPerSample has one value per sample; when they do not fit they live elsewhere
        # (same value each in every real file): the first is read from there.
        (count,) = struct.unpack_from(order + ("I" if version == 42 else "Q"), data, base + k * entry + 4)
        where = base + k * entry + value_at
        if count * struct.calcsize(fmt) > off_size:
            (where,) = struct.unpack_from(order + off_fmt, data, where)
            if where + struct.calcsize(fmt) > len(data):
                raise HeaderError("TIFF field points past the end of the file")
        (value,) = struct.unpack_from(order + fmt, data, where)
        if value <= 0:
            raise HeaderError(f"TIFF tag {tag} has the non-positive value {value}")
        fields[tag] = value
    if 256 not in fields or 257 not in fields:
        raise HeaderError("TIFF without image width and length")
    return fields[256], fields[257], fields.get(258, 1), fields.get(277, 1)


def _bmp(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise HeaderError("BMP header truncated")
    (size,) = struct.unpack_from("<I", data, 14)
    if size == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
        return struct.unpack_from("<HH", data, 18)
    if size < 40:
        raise HeaderError("BMP with an unknown header")
    w, h = struct.unpack_from("<ii", data, 18)
    if w <= 0:
        raise HeaderError("BMP with a non-positive width")
    return w, abs(h)


def _webp(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return _u16le(data, 26) & 0x3FFF, _u16le(data, 28) & 0x3FFF
    raise HeaderError("WebP without a readable VP8 / VP8L / VP8X header")


_PNM_HEADER_BYTES = 4096  # width and height (with comments) must lie within this many bytes


def _pnm(data: bytes) -> tuple[int, int]:
    """Width and height as OpenCV's PxM ReadNumber reads them: whitespace and ``#`` comments (to
    the end of the line) are skipped before a number, and the one byte after a number's digits is
    consumed WHATEVER it is. So in ``P5 3000#3000`` the ``#`` ends the width and the "comment" is
    the height: a parser that reads it as a comment would size 3000x1 an image OpenCV decodes
    3000x3000."""
    head = data[:_PNM_HEADER_BYTES]
    n = len(head)
    i = 2
    values = []
    for _ in range(2):
        while i < n and not head[i : i + 1].isdigit():
            c = head[i : i + 1]
            if c == b"#":  # to the end of the line (\n or \r), which is skipped too
                ends = [e for e in (head.find(b"\n", i), head.find(b"\r", i)) if e >= 0]
                if not ends:
                    break
                i = min(ends) + 1
            elif c.isspace():
                i += 1
            else:
                raise HeaderError(f"PNM header with an unexpected byte {c!r} before a number")
        j = i
        while j < n and head[j : j + 1].isdigit():
            j += 1
        if j == i or j >= n:  # no number, or one running to the end of what is read
            raise HeaderError("PNM without a readable width and height")
        values.append(int(head[i:j]))
        i = j + 1  # the byte that ended the number, whatever it is
    return values[0], values[1]


def read_header(data: bytes) -> ImageHeader:
    """The format and size of ``data``; ``HeaderError`` if the format is not supported or its
    header does not give a positive size."""
    try:
        bits = channels = 0
        if data[:3] == b"\xff\xd8\xff":
            fmt, (w, h) = "JPEG", _jpeg(data)
        elif data[:8] == b"\x89PNG\r\n\x1a\n":
            if len(data) < 24 or data[12:16] != b"IHDR":
                raise HeaderError("PNG without an IHDR chunk")
            fmt, (w, h) = "PNG", struct.unpack_from(">II", data, 16)
        elif data[:6] in (b"GIF87a", b"GIF89a"):
            fmt, (w, h) = "GIF", _gif(data)
        elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            fmt, (w, h, bits, channels) = "TIFF", _tiff(data)
        elif data[:2] == b"BM":
            fmt, (w, h) = "BMP", _bmp(data)
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            fmt, (w, h) = "WebP", _webp(data)
        elif len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
            fmt, (w, h) = "PNM", _pnm(data)
        else:
            raise HeaderError(
                "not a supported image format (supported: " + ", ".join(SUPPORTED_FORMATS) + ")"
            )
    except struct.error as e:
        raise HeaderError(f"image header truncated ({e})") from None
    if w <= 0 or h <= 0:
        raise HeaderError(f"{fmt} header gives an empty size {w}x{h}")
    return ImageHeader(fmt, int(w), int(h), bits or 8, channels)
