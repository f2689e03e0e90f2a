"""Face alignment to a 5-point template: ArcFace's, or another model's (the alignment registry).

Every model of the project is trained and served on crops made here, so train and serve cannot
drift: the template, the transform estimate and the warp are the same code everywhere. The
numbers reproduce insightface's ``norm_crop`` (``face_align.py``): a least-squares similarity
transform (Umeyama 1991) from the five detected landmarks to the template, applied with
``cv2.warpAffine`` and a black border.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

#: ArcFace template for a 112x112 crop, (x, y) in pixels. Order: left eye, right eye, nose tip,
#: left mouth corner, right mouth corner ("left" = the viewer's left). It is the 96x112 template
#: of SphereFace/insightface with 8 px added to every x.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

#: Identifier stored in the embedding contract; change it whenever the template or the rule for
#: other sizes changes, so artifacts made with different crops refuse to mix.
from facerec.contract import ARCFACE_TEMPLATE_112 as TEMPLATE_ID  # noqa: E402
from facerec.contract import DLIB_CHIP_150, DLIB_CHIP_CANVAS_192  # noqa: E402

#: Where facerec's MTCNN landmarks (same order as above) fall in dlib's 150 x 150 face chip
#: (``dlib.get_face_chip``, padding 0.25), in pixels: the mean over the bundled LFW sample of each
#: face's MTCNN points mapped into dlib's own chip. Measured by ``benchmarks/dlib_port_lfw.py``
#: (``benchmarks/results/dlib_port_lfw_template.json``); dlib's ResNet on chips cut with it scores
#: 98.33% on 300 LFW validation pairs, as on dlib's own chips. The chip reaches 15 px below the
#: 112 ArcFace crop (which reaches 34 chip px above the chip) and holds the face at 1.51x its
#: resolution, so it must be cut from the photo, not from that crop.
DLIB_CHIP_TEMPLATE_150 = np.array(
    [
        [47.2656, 45.322],
        [101.9354, 45.4099],
        [74.551, 77.7374],
        [49.4237, 103.9669],
        [99.3006, 104.163],
    ],
    dtype=np.float64,
)


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """The 3x3 similarity ``T`` minimising ``sum ||dst_i - T(src_i)||^2`` (rotation, scale, shift).

    Umeyama's closed form: SVD of the cross-covariance. When the best orthogonal map would be a
    reflection (det < 0), the smallest singular direction is flipped, so the result is always a
    proper rotation: a mirrored face must not be "aligned" by mirroring it.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[0] < 2:
        raise ValueError(f"need matching (N>=2, D) point sets, got {src.shape} and {dst.shape}")
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(dim)
    if np.linalg.det(cov) < 0:
        d[-1] = -1.0
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        raise ValueError("degenerate landmarks: all points coincide")
    if rank == dim - 1:
        # The sign of the last singular value is undetermined; pick the proper rotation.
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rot = u @ vt
        else:
            flip = d.copy()
            flip[-1] = -1.0
            rot = u @ np.diag(flip) @ vt
    else:
        rot = u @ np.diag(d) @ vt
    scale = 1.0
    if estimate_scale:
        src_var = src_c.var(axis=0).sum()
        scale = float((s * d).sum() / src_var)
    out = np.eye(dim + 1)
    out[:dim, :dim] = scale * rot
    out[:dim, dim] = dst_mean - scale * rot @ src_mean
    return out


def template_for_size(size: int = 112) -> np.ndarray:
    """The template scaled to ``size``, following insightface's rule for other crop sizes.

    Multiples of 112 scale the template; multiples of 128 scale it by size/128 and move it
    8*size/128 px right, i.e. the 112-wide face sits in the middle of a 128-wide crop.
    """
    if size % 112 == 0:
        ratio, shift_x = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio = size / 128.0
        shift_x = 8.0 * ratio
    else:
        raise ValueError(f"crop size must be a multiple of 112 or 128, got {size}")
    dst = ARCFACE_TEMPLATE * ratio
    dst[:, 0] += shift_x
    return dst


class UnknownAlignmentError(ValueError):
    """An alignment id (a contract's ``alignment``) that facerec cannot cut crops for."""


@dataclass(frozen=True)
class Alignment:
    """How to cut a model's crop: a similarity transform taking the 5 landmarks to ``points(size)``."""

    id: str
    size: int  # the crop size the template is given for (a model's ``input_size``)
    points: Callable[[int], np.ndarray]  # crop size -> (5, 2) template in pixels; ValueError if unsupported


def _fixed_size(alignment_id: str, template: np.ndarray, size: int) -> Callable[[int], np.ndarray]:
    def points(wanted: int) -> np.ndarray:
        if wanted != size:
            raise ValueError(f"alignment {alignment_id!r} cuts {size}x{size} crops, not {wanted}x{wanted}")
        return template.copy()

    return points


@dataclass(frozen=True)
class Canvas:
    """A crop that holds the crops of two alignments: the ``primary`` one as an exact window (no
    resampling) at ``offset`` (x, y), the ``secondary`` one through a fixed similarity transform.

    A graph fed the canvas runs a network of each alignment (``facerec.export.attach_quality``: a
    recognizer and another model's quality token) on faces cut once from the photo."""

    id: str
    size: int
    primary: str
    primary_size: int
    offset: tuple[int, int]
    secondary: str
    secondary_size: int

    def template(self) -> np.ndarray:
        """The canvas's 5 points: the primary template shifted by ``offset``."""
        return alignment_template(self.primary, self.primary_size) + np.asarray(self.offset, np.float64)

    def secondary_to_canvas(self) -> np.ndarray:
        """2 x 3 matrix taking a pixel (x, y) of the secondary crop to the canvas: the similarity
        fitted (least squares, as an alignment is) from the secondary template to the canvas's."""
        src = alignment_template(self.secondary, self.secondary_size)
        return umeyama(src, self.template())[:2]

    def secondary_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), each (S, S) float64: where each pixel of the secondary crop falls in the canvas, in
        canvas pixels (pixel centres at integer coordinates, as ``cv2.warpAffine`` counts them)."""
        s = self.secondary_size
        v, u = np.mgrid[0:s, 0:s].astype(np.float64)
        m = self.secondary_to_canvas()
        return m[0, 0] * u + m[0, 1] * v + m[0, 2], m[1, 0] * u + m[1, 1] * v + m[1, 2]

    def secondary_grid(self) -> np.ndarray:
        """(S, S, 2) sampling grid for ``GridSample`` (``align_corners=False``): :meth:`secondary_pixels`
        in [-1, 1] (x then y)."""
        x, y = self.secondary_pixels()
        return np.stack([(2 * x + 1) / self.size - 1, (2 * y + 1) / self.size - 1], axis=-1).astype(np.float32)


#: canvas id -> its layout. dlib's chip (150) and the ArcFace crop (112, 1.51x larger in the photo;
#: it spans x -10.6..158.5 and y -34.0..135.1 in chip pixels) both fit a 192 px canvas with the chip
#: at (21, 38).
CANVASES: dict[str, Canvas] = {
    DLIB_CHIP_CANVAS_192: Canvas(DLIB_CHIP_CANVAS_192, 192, DLIB_CHIP_150, 150, (21, 38), TEMPLATE_ID, 112),
}


def find_canvas(primary: str, secondary: str) -> Canvas | None:
    """The registered canvas of these two alignments, or None."""
    for canvas in CANVASES.values():
        if (canvas.primary, canvas.secondary) == (primary, secondary):
            return canvas
    return None


#: alignment id (a contract's ``alignment``) -> how crops are cut for it.
ALIGNMENTS: dict[str, Alignment] = {
    TEMPLATE_ID: Alignment(TEMPLATE_ID, 112, template_for_size),
    DLIB_CHIP_150: Alignment(DLIB_CHIP_150, 150, _fixed_size(DLIB_CHIP_150, DLIB_CHIP_TEMPLATE_150, 150)),
}


def get_alignment(alignment_id: str) -> Alignment:
    """The registered alignment ``alignment_id``; UnknownAlignmentError (one line) otherwise."""
    try:
        return ALIGNMENTS[alignment_id]
    except KeyError:
        raise UnknownAlignmentError(
            f"unknown alignment {alignment_id!r}: facerec cuts crops for {', '.join(sorted(ALIGNMENTS))}"
        ) from None


def alignment_template(alignment_id: str = TEMPLATE_ID, size: int | None = None) -> np.ndarray:
    """The template of ``alignment_id`` for a ``size`` crop (default: the alignment's own size)."""
    found = get_alignment(alignment_id)
    return found.points(found.size if size is None else int(size))


# A canvas is an alignment too (its template: the primary one, shifted).
for _canvas in CANVASES.values():
    ALIGNMENTS[_canvas.id] = Alignment(_canvas.id, _canvas.size, _fixed_size(_canvas.id, _canvas.template(), _canvas.size))


def estimate_norm(landmarks: np.ndarray, size: int = 112, alignment: str = TEMPLATE_ID) -> np.ndarray:
    """The 2x3 affine matrix that maps image pixels to the aligned ``size`` x ``size`` crop."""
    lmk = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    return umeyama(lmk, alignment_template(alignment, size))[:2, :]


def norm_crop(image: np.ndarray, landmarks: np.ndarray, size: int = 112, alignment: str = TEMPLATE_ID) -> np.ndarray:
    """Warp ``image`` (H, W[, C], any channel order) to the aligned crop, black outside the image."""
    image = ensure_three_channels(image)
    matrix = estimate_norm(landmarks, size, alignment)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def center_crop(image: np.ndarray, size: int = 112, fraction: float = 0.5) -> np.ndarray:
    """Fallback when no face is found: a central square ``fraction`` of the shorter side, resized.

    0.5 suits LFW-style images (a face box about 1/2.2 of the side, centred); the result is NOT
    template-aligned and the align report lists every image that got it.
    """
    image = ensure_three_channels(image)
    h, w = image.shape[:2]
    side = max(1, round(min(h, w) * fraction))
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = image[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def ensure_three_channels(image: np.ndarray) -> np.ndarray:
    """Grey (H, W) or (H, W, 1) becomes (H, W, 3); RGBA/BGRA loses alpha. Models take 3 channels."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"not an image: shape {image.shape}")
