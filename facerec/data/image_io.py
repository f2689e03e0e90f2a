"""Safe image decoding: bytes or a path -> RGB uint8 (H, W, 3), or a clear ``ImageDecodeError``.

Everything a user or a web request can hand us goes through ``load_image``: empty input, files
that are not images, truncated/corrupt files and decompression bombs all end in
``ImageDecodeError`` (a ``ValueError``) with a message naming the problem, never in an OpenCV
assertion or a ``None`` further down. Grey images become 3-channel, alpha is composited onto
white (transparent pixels hold arbitrary colours otherwise), 16-bit images are scaled to 8 bits
and JPEG EXIF orientation is applied (OpenCV does it while decoding).

Decompression bombs: no byte reaches a decoder before its pixel count is known. The formats are an
allow-list (JPEG, PNG, GIF, TIFF, BMP, WebP, PNM; ``facerec.data.image_headers``), each sized
from its header; an image above ``max_pixels`` is refused without allocating it, and any other
format (AVIF, JPEG 2000, HDR, ...) is refused as unsupported. Why not OpenCV's own limit alone:
``OPENCV_IO_MAX_IMAGE_PIXELS`` is read once, when the OpenCV library is loaded (checked with
OpenCV 5.0: setting it after ``import cv2`` has no effect), so it cannot follow a per-call or
per-deployment ``max_pixels`` and is lost whenever anything imported cv2 first. It is still set
here (``facerec.runtime`` imports this module first, so the service has it), when this module is
the first to load OpenCV and the environment does not set it already: a second line of defence if a
header parser were ever wrong. It is set to ``OPENCV_PIXEL_CEILING``, the service's hard cap on
``FACEREC_MAX_PIXELS``, not to a ``max_pixels``, so it never refuses what a configured limit allows;
every smaller limit, per call, is the header check's.

``reduce`` (2, 4 or 8) lets a caller that only needs a smaller copy decode a JPEG at 1/2, 1/4 or
1/8 scale straight from the DCT (libjpeg's scaled decoding: 6000x6000 takes 0.03 s at 1/4 instead
of 0.45 s, and 1/16 of the memory); other formats ignore it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Must precede the first `import cv2` of the process to take effect (see the docstring).
OPENCV_PIXEL_CEILING = 100_000_000  # the service's hard cap on FACEREC_MAX_PIXELS
if "cv2" not in sys.modules:
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(OPENCV_PIXEL_CEILING))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from facerec.data.image_headers import HeaderError, ImageHeader, read_header  # noqa: E402

DEFAULT_MAX_PIXELS = 50_000_000  # ~50 MP: bigger than any camera photo a face pipeline needs
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageDecodeError(ValueError):
    """The input could not be turned into an image (empty, not an image, corrupt, too large)."""


def inspect_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image bytes"
) -> ImageHeader:
    """Format and size from the header, checked against ``max_pixels`` and the pixel types
    ``to_rgb_uint8`` accepts; ``ImageDecodeError`` otherwise. Costs microseconds, decodes nothing."""
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty input (0 bytes)")
    try:
        header = read_header(data)
    except HeaderError as e:
        raise ImageDecodeError(f"{name}: {e}") from None
    if header.pixels > max_pixels:
        raise ImageDecodeError(
            f"{name}: {header.width}x{header.height} = {header.pixels} pixels, "
            f"more than the limit of {max_pixels}"
        )
    # TIFF can hold 32/64-bit samples and many channels: refused before decoding (to_rgb_uint8
    # would refuse them after), so a decode never allocates more than 4 x 16 bits per pixel.
    if header.bits > 16 or header.channels > 4:
        raise ImageDecodeError(
            f"{name}: {header.format} with {header.bits}-bit samples and {header.channels} "
            "channels is not supported (up to 16 bits and 4 channels)"
        )
    return header


def _png_has_alpha_or_16bit(data: bytes) -> bool:
    # IHDR: bit depth at byte 24, colour type at 25 (4 = grey+alpha, 6 = RGBA); a tRNS chunk also
    # means transparency, but palette transparency is rare in photos, so it is not looked for.
    is_png = data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 26
    return is_png and (data[24] == 16 or data[25] in (4, 6))


def to_rgb_uint8(image: np.ndarray, bgr: bool = False) -> np.ndarray:
    """Any decoded array (grey, grey+alpha, BGR/RGB, BGRA/RGBA; uint8 or uint16) -> RGB uint8."""
    if image.dtype == np.uint16:
        # round(x * 255 / 65535) = round(x / 257), without a uint32 copy of the whole image
        image = cv2.convertScaleAbs(image, alpha=1.0 / 257.0)
    elif image.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported pixel type {image.dtype}; expected 8 or 16 bit")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ImageDecodeError(f"unsupported image shape {image.shape}")
    c = image.shape[2]
    if c in (2, 4):  # composite onto white using the alpha channel
        out = np.empty(image.shape[:2] + (c - 1,), np.uint8)
        for y in range(0, image.shape[0], 512):  # in row blocks: float copies of a 40 MP image are GBs
            block = image[y : y + 512]
            alpha = block[:, :, -1:].astype(np.float32) / 255.0
            colour = block[:, :, :-1].astype(np.float32)
            out[y : y + 512] = np.clip(colour * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255)
        image = out
        c -= 1
    if c == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    return np.ascontiguousarray(image[:, :, ::-1] if bgr else image)



def load_image(
    source: bytes | bytearray | memoryview | str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    reduce: int = 1,
    header: ImageHeader | None = None,
) -> np.ndarray:
    """Decode an image file or its bytes to RGB uint8 (H, W, 3); ``ImageDecodeError`` on failure.
    ``reduce`` in (1, 2, 4, 8): decode a JPEG at that fraction of its size (others: full size).
    ``header``: what ``inspect_image(source, max_pixels)`` returned for these same bytes, when the
    caller has it (the header is then not read again)."""
    if reduce not in (1, *_REDUCED):
        raise ValueError(f"reduce must be 1, 2, 4 or 8, not {reduce}")
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

    if len(data) > max_bytes:
        raise ImageDecodeError(f"{name}: {len(data)} bytes, more than the limit of {max_bytes}")
    if header is None:
        header = inspect_image(data, max_pixels, name)

    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR applies EXIF orientation and turns grey into 3 channels; alpha and 16-bit
    # PNGs need IMREAD_UNCHANGED to keep the alpha / precision for to_rgb_uint8.
    if _png_has_alpha_or_16bit(data):
        flags = cv2.IMREAD_UNCHANGED
    elif header.format == "JPEG" and reduce in _REDUCED:
        flags = _REDUCED[reduce]
    else:
        flags = cv2.IMREAD_COLOR
    try:
        decoded = cv2.imdecode(buf, flags)
    except cv2.error as e:  # OpenCV raises on some malformed headers instead of returning None
        raise ImageDecodeError(f"{name}: corrupt or unsupported image ({str(e).strip()[:200]})") from e
    if decoded is None or decoded.size == 0:
        raise ImageDecodeError(
            f"{name}: corrupt or truncated {header.format} ({len(data)} bytes could not be decoded)"
        )
    h, w = decoded.shape[:2]
    if h * w > max_pixels:  # the header said otherwise: never trust a decoder's output blindly
        raise ImageDecodeError(f"{name}: {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    if decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] == 3:
        # The common case, in place: a second full-size copy is 108 MB for a 36 MP photo.
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB, dst=decoded)
    return to_rgb_uint8(decoded, bgr=True)
