"""Safe image decoding: bytes or a path -> RGB uint8 (H, W, 3), or a clear ``ImageDecodeError``.

Everything a user or a web request can hand us goes through ``load_image``: empty input, files
that are not images, truncated/corrupt files and decompression bombs all end in
``ImageDecodeError`` (a ``ValueError``) with a message naming the problem, never in an OpenCV
assertion or a ``None`` further down. Grey images become 3-channel, alpha is composited onto
white (transparent pixels hold arbitrary colours otherwise), 16-bit images are scaled to 8 bits
and JPEG EXIF orientation is applied (OpenCV does it while decoding).

For PNG and JPEG the pixel count is read from the header before decoding, so a bomb is refused
without allocating it; other formats are checked right after decoding.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

DEFAULT_MAX_PIXELS = 50_000_000  # ~50 MP: bigger than any camera photo a face pipeline needs
DEFAULT_MAX_BYTES = 100 * 1024 * 1024



class ImageDecodeError(ValueError):
    """The input could not be turned into an image (empty, not an image, corrupt, too large)."""


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, or None if unknown / not parseable."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
                continue
            (length,) = struct.unpack(">H", data[i + 2 : i + 4])
            # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG), CC (DAC) are not frames.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if i + 9 > len(data):
                    return None
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return w, h
            i += 2 + length
    return None


def _png_has_alpha_or_16bit(data: bytes) -> bool:
    # IHDR: bit depth at byte 24, colour type at 25 (4 = grey+alpha, 6 = RGBA); a tRNS chunk also
    # means transparency, but palette transparency is rare in photos, so it is not looked for.
    is_png = data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 26
    return is_png and (data[24] == 16 or data[25] in (4, 6))


def to_rgb_uint8(image: np.ndarray, bgr: bool = False) -> np.ndarray:
    """Any decoded array (grey, grey+alpha, BGR/RGB, BGRA/RGBA; uint8 or uint16) -> RGB uint8."""
    if image.dtype == np.uint16:
        image = (image.astype(np.uint32) * 255 + 32767) // 65535
        image = image.astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported pixel type {image.dtype}; expected 8 or 16 bit")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ImageDecodeError(f"unsupported image shape {image.shape}")
    c = image.shape[2]
    if c in (2, 4):  # composite onto white using the alpha channel
        alpha = image[:, :, -1:].astype(np.float32) / 255.0
        colour = image[:, :, :-1].astype(np.float32)
        image = np.clip(colour * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
        c -= 1
    if c == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    return np.ascontiguousarray(image[:, :, ::-1] if bgr else image)


def load_image(
    source: bytes | bytearray | memoryview | str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Decode an image file or its bytes to RGB uint8 (H, W, 3); ``ImageDecodeError`` on failure."""
    name = "image bytes"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise ImageDecodeError(
                    f"{name}: file is {size} bytes, more than the limit of {max_bytes}"
                )
            data = path.read_bytes()
        except OSError as e:
            raise ImageDecodeError(f"{name}: cannot read file ({e.strerror or e})") from e
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise TypeError(f"load_image takes bytes or a path, not {type(source).__name__}")

    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty input (0 bytes)")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"{name}: {len(data)} bytes, more than the limit of {max_bytes}")
    dims = _header_size(data)
    if dims is not None and dims[0] * dims[1] > max_pixels:
        raise ImageDecodeError(
            f"{name}: {dims[0]}x{dims[1]} = {dims[0] * dims[1]} pixels, "
            f"more than the limit of {max_pixels}"
        )

    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR applies EXIF orientation and turns grey into 3 channels; alpha and 16-bit
    # PNGs need IMREAD_UNCHANGED to keep the alpha / precision for to_rgb_uint8.
    flags = cv2.IMREAD_UNCHANGED if _png_has_alpha_or_16bit(data) else cv2.IMREAD_COLOR
    try:
        decoded = cv2.imdecode(buf, flags)
    except cv2.error as e:  # OpenCV raises on some malformed headers instead of returning None
        raise ImageDecodeError(f"{name}: corrupt or unsupported image ({str(e).strip()[:200]})") from e
    if decoded is None or decoded.size == 0:
        kind = "corrupt or truncated image" if dims is not None else "not a recognised image format"
        raise ImageDecodeError(f"{name}: {kind} ({len(data)} bytes could not be decoded)")
    h, w = decoded.shape[:2]
    if h * w > max_pixels:
        raise ImageDecodeError(f"{name}: {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    return to_rgb_uint8(decoded, bgr=True)
