"""Decoding a request's image within bounds, and cutting the aligned crop from it.

A JPEG far larger than the detector's bound is decoded reduced straight from its DCT (1/2, 1/4,
1/8), with a way back to the full resolution for the crops; a face much larger than the crop is
shrunk with area interpolation before the warp (``aligned_crop``) so that it does not alias.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facerec.contract import ARCFACE_TEMPLATE_112
from facerec.runtime.errors import DecodeError


def _crop_scale(landmarks: np.ndarray, size: int, alignment: str = ARCFACE_TEMPLATE_112) -> float:
    """Crop pixels per image pixel of the alignment for these landmarks."""
    from facerec.data.align import estimate_norm

    return float(np.sqrt(abs(np.linalg.det(estimate_norm(landmarks, size, alignment)[:, :2]))))


@dataclass
class _Decoded:
    image: np.ndarray  # RGB uint8, possibly a reduced decode
    shape: tuple[int, int]  # (h, w) of the full-resolution image: what boxes refer to
    full: Callable[[], np.ndarray] | None = None  # decodes the full resolution (None: image is it)

    @property
    def scale(self) -> tuple[float, float]:
        """(fx, fy): full-resolution coordinates = coordinates in ``image`` x (fx, fy)."""
        return self.shape[1] / self.image.shape[1], self.shape[0] / self.image.shape[0]


def _decode(data, max_pixels: int | None, max_bytes: int | None, max_side: int | None = None) -> _Decoded:
    """Decode ``data``; a JPEG far larger than ``max_side`` is decoded reduced (1/2, 1/4, 1/8: still
    at least ``max_side`` on its longer side), with a way back to full resolution for the crops."""
    from facerec.data.image_io import (
        DEFAULT_MAX_BYTES,
        DEFAULT_MAX_PIXELS,
        ImageDecodeError,
        inspect_image,
        load_image,
    )
    from facerec.data.image_headers import jpeg_orientation

    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 3 or data.shape[2] != 3:
            raise DecodeError(f"an image array must be RGB uint8 (H, W, 3), got {data.dtype} {data.shape}")
        return _Decoded(data, data.shape[:2])
    if isinstance(data, str):
        # A string is refused rather than read as a path: request data must never name server files.
        raise TypeError("pass image bytes, an RGB array or a pathlib.Path, not a str")
    if not isinstance(data, (bytes, bytearray, memoryview, os.PathLike)):
        raise TypeError(f"cannot decode a {type(data).__name__}")
    limits = {"max_pixels": max_pixels or DEFAULT_MAX_PIXELS, "max_bytes": max_bytes or DEFAULT_MAX_BYTES}
    try:
        if isinstance(data, os.PathLike):
            image = load_image(Path(data), **limits)
            return _Decoded(image, image.shape[:2])
        header = inspect_image(data, limits["max_pixels"])
        side = max(header.width, header.height)
        reduce = 1
        while max_side and header.format == "JPEG" and reduce < 8 and side / (2 * reduce) >= max_side:
            reduce *= 2
        image = load_image(data, reduce=reduce, header=header, **limits)  # read once
    except ImageDecodeError as err:
        raise DecodeError(str(err)) from err
    if reduce == 1:
        return _Decoded(image, image.shape[:2])
    h, w = header.height, header.width
    # libjpeg's scaled decode gives ceil(side / reduce); OpenCV then applies the EXIF orientation,
    # which may turn it by 90 degrees. Which happened is read from the shape when the two
    # outcomes differ, else (a near-square image: ceil(w/r) == ceil(h/r)) from the EXIF tag.
    upright = (-(-h // reduce), -(-w // reduce))
    if upright[0] == upright[1]:
        turned = jpeg_orientation(bytes(data)) >= 5
    else:
        turned = image.shape[:2] != upright
    if turned:
        h, w = w, h

    def full() -> np.ndarray:
        try:
            return load_image(data, header=header, **limits)
        except ImageDecodeError as err:
            raise DecodeError(str(err)) from err

    return _Decoded(image, (h, w), full)


def aligned_crop(image: np.ndarray, landmarks: np.ndarray, size: int,
                 alignment: str = ARCFACE_TEMPLATE_112) -> np.ndarray:
    """``norm_crop`` to the template of ``alignment`` (a contract's alignment id), anti-aliased: a
    face over twice the crop's resolution is first shrunk (area interpolation, only the part of the
    image the crop covers) to the crop's scale; a bilinear warp straight from a 3000-pixel face to
    112 would sample every 27th pixel and alias."""
    import cv2

    from facerec.data.align import estimate_norm, norm_crop

    m = estimate_norm(landmarks, size, alignment)
    scale = _crop_scale(landmarks, size, alignment)
    if scale >= 0.5:
        return norm_crop(image, landmarks, size, alignment)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    back = corners @ cv2.invertAffineTransform(m).T  # the crop's corners in the image
    h, w = image.shape[:2]
    x0, y0 = (max(0, int(np.floor(v)) - 2) for v in back.min(axis=0))
    x1, y1 = min(w, int(np.ceil(back[:, 0].max())) + 2), min(h, int(np.ceil(back[:, 1].max())) + 2)
    if x1 - x0 < 2 or y1 - y0 < 2:  # the crop lies (almost) outside the image: nothing to shrink
        return norm_crop(image, landmarks, size, alignment)
    region = image[y0:y1, x0:x1]
    rw, rh = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    small = cv2.resize(region, (rw, rh), interpolation=cv2.INTER_AREA)
    f = np.array([rw / (x1 - x0), rh / (y1 - y0)])
    # Pixel centres: source x lands at (x + 0.5) * f - 0.5 in the resized region.
    return norm_crop(small, (np.asarray(landmarks, np.float64) - [x0, y0] + 0.5) * f - 0.5, size, alignment)
