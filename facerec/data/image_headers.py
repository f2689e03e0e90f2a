"""The format and pixel size of an encoded image, read from its header without decoding it.

``load_image`` only hands bytes to OpenCV once it knows how many pixels the decoder will allocate:
a 35-byte GIF can declare a 20000x20000 canvas and a 4 KB TIFF 40,000 strips that all point at
one zero strip, and OpenCV allocates (and fills) the full canvas before anyone can look at its
shape. So the accepted formats are an allow-list, each with a parser for the fields its decoder
sizes the image by:

=========  ===========================================================================
JPEG       the first SOF segment (the frame libjpeg decodes)
PNG        IHDR
GIF        the logical screen and every image descriptor (a frame can reach past the screen)
TIFF       width / length, samples and bits per sample of every IFD in the chain (also BigTIFF)
BMP        BITMAPCOREHEADER or BITMAPINFOHEADER and its successors (negative height = top-down)
WebP       the VP8 frame header, the VP8L header or the VP8X canvas
PNM        P1-P6 (PBM / PGM / PPM: the ASCII width and height)
=========  ===========================================================================

Everything else OpenCV could decode (AVIF, JPEG 2000, HDR, Sun raster, PFM, PAM, OpenEXR, ...) is
refused: no face photo needs it, and a format that is never decoded cannot be a bomb. A
recognised format whose header cannot be read is refused too, rather than decoded "to see".
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "BMP", "WebP", "PNM")

_MAX_TIFF_IFDS = 64  # a photo has one or two; a longer chain (or a loop) is not a photo


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


def _jpeg(data: bytes) -> tuple[int, int]:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:  # libjpeg skips stray bytes before a marker; so do we
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01, 0x00) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            break
        (length,) = struct.unpack_from(">H", data, i + 2)
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG), CC (DAC) are not frames.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                break
            h, w = struct.unpack_from(">HH", data, i + 5)
            return w, h
        i += 2 + length
    raise HeaderError("JPEG without a readable frame header (SOF)")


def _gif(data: bytes) -> tuple[int, int]:
    if len(data) < 13:
        raise HeaderError("GIF header truncated")
    width, height = struct.unpack_from("<HH", data, 6)
    flags = data[10]
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = 0
    n = len(data)
    # Walk the blocks: every frame's extent counts. A truncated tail ends the walk (the decoder
    # cannot reach frames beyond it either).
    while i < n:
        kind = data[i]
        if kind == 0x3B:  # trailer
            break
        if kind == 0x21:  # extension: label, then sub-blocks
            i += 2
        elif kind == 0x2C:  # image descriptor
            if i + 10 > n:
                break
            left, top, w, h = struct.unpack_from("<HHHH", data, i + 1)
            width, height = max(width, left + w), max(height, top + h)
            frames += 1
            local = data[i + 9]
            i += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1  # + LZW code size
        else:
            break  # not a block: corrupt; the decoder will say so
        while i < n and data[i] != 0:  # data sub-blocks up to the zero terminator
            i += data[i] + 1
        i += 1
    return width, height


def _tiff(data: bytes) -> tuple[int, int, int, int]:
    order = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack_from(order + "H", data, 2)
    if version == 42:
        off_fmt, count_fmt, entry, value_at, first = "I", "H", 12, 8, 4
    elif version == 43 and len(data) >= 16:  # BigTIFF: 8-byte offsets and counts
        off_fmt, count_fmt, entry, value_at, first = "Q", "Q", 20, 12, 8
    else:
        raise HeaderError("TIFF with an unknown version")
    int_types = {3: "H", 4: "I", 16: "Q"}  # the integer field types a size can be stored in
    (offset,) = struct.unpack_from(order + off_fmt, data, first)
    width = height = 0
    bits = channels = 1
    seen: set[int] = set()
    count_size = struct.calcsize(count_fmt)
    off_size = struct.calcsize(off_fmt)
    while offset and offset not in seen and len(seen) < _MAX_TIFF_IFDS:
        seen.add(offset)
        if offset + count_size > len(data):
            break
        (entries,) = struct.unpack_from(order + count_fmt, data, offset)
        base = offset + count_size
        if base + entries * entry + off_size > len(data):
            raise HeaderError("TIFF directory truncated")
        ifd_w = ifd_h = 0
        for k in range(entries):
            tag, typ = struct.unpack_from(order + "HH", data, base + k * entry)
            if tag not in (256, 257, 258, 277) or typ not in int_types:
                continue
            fmt = int_types[typ]
            # BitsPerSample has one value per sample; when they do not fit they live elsewhere
            # (same value each in every real file): the first is read from there.
            (count,) = struct.unpack_from(order + ("I" if version == 42 else "Q"), data, base + k * entry + 4)
            where = base + k * entry + value_at
            if count * struct.calcsize(fmt) > off_size:
                (where,) = struct.unpack_from(order + off_fmt, data, where)
                if where + struct.calcsize(fmt) > len(data):
                    raise HeaderError("TIFF field points past the end of the file")
            (value,) = struct.unpack_from(order + fmt, data, where)
            if tag == 256:
                ifd_w = value
            elif tag == 257:
                ifd_h = value
            elif tag == 258:
                bits = max(bits, value)
            else:
                channels = max(channels, value)
        if len(seen) == 1 and (ifd_w == 0 or ifd_h == 0):  # the first IFD is the image decoded
            raise HeaderError("TIFF without image width and length")
        width, height = max(width, ifd_w), max(height, ifd_h)
        (offset,) = struct.unpack_from(order + off_fmt, data, base + entries * entry)
    if not seen:
        raise HeaderError("TIFF directory offset outside the file")
    return width, height, bits, channels


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


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n\r]*[\n\r])*(\d+)")


def _pnm(data: bytes) -> tuple[int, int]:
    values = []
    i = 2
    for _ in range(2):
        m = _PNM_TOKEN.match(data, i, min(len(data), i + 1024))
        if m is None:
            raise HeaderError("PNM without a readable width and height")
        values.append(int(m.group(1)))
        i = m.end()
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
