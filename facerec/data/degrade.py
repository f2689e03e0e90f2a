"""Image damage a face photo suffers in the wild, to train the quality token to see it and to
check that it does.

A quality score is only useful if it falls when the face is damaged. Model 1.1's token learnt its
target (CR-FIQA's certainty ratio) on clean, well-lit training faces, and a blurred, shrunk,
JPEG-10 copy of an LFW face scored *higher* than its original in a quarter of the faces tried. The
cure is to show the model damaged faces while it trains: the certainty-ratio target is computed
from the forward pass on the image the model sees, so a degraded training image gets its own
(lower) target and the token learns to predict it. Nothing else in the loss changes.

Everything works on RGB uint8 (H, W, 3) arrays, the aligned 112x112 crop during training or a
whole photo in the evaluation, and returns a new array of the same shape and dtype:

- ``gaussian_blur``: defocus and motion-free camera shake (sigma in pixels of this image);
- ``resample``: a small face upsampled by the aligner (down to ``side`` pixels, back up);
- ``jpeg``: storage and messaging apps (OpenCV's 4:2:0 chroma subsampling);
- ``gaussian_noise``: sensor noise at high ISO (sigma in grey levels);
- ``occlude``: a hand, a phone or a scarf (a flat or noisy rectangle over part of the face);
- ``low_light``: under-exposure (a gain below 1 and a gamma above 1, then a little noise).

``DamageRecipe`` is the fixed check of the issue (blur sigma 3, shrink to 60 px, JPEG 10) and
``RandomDegradation`` the training augmentation: each kind of damage on with its own probability,
strength drawn from a range, applied in the order a camera and a messenger would (optics,
sampling, sensor, exposure, occluder, compression).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "DamageRecipe",
    "RandomDegradation",
    "gaussian_blur",
    "gaussian_noise",
    "jpeg",
    "low_light",
    "occlude",
    "resample",
]


def _check(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return image


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels (0: unchanged copy)."""
    _check(image)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return image.copy()
    k = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma holds 99.7% of the kernel
    return cv2.GaussianBlur(image, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def resample(image: np.ndarray, side: int) -> np.ndarray:
    """Shrink so that the longer side is ``side`` pixels (area averaging), then scale back up
    (bilinear): the detail a face of that size had is all that is left."""
    _check(image)
    h, w = image.shape[:2]
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    if side >= max(h, w):
        return image.copy()
    scale = side / max(h, w)
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at ``quality`` (1..100) and decode again."""
    _check(image)
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1..100, got {quality}")
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of ``sigma`` grey levels, independent per pixel and channel."""
    _check(image)
    noisy = image.astype(np.float32) + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def occlude(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Cover ``fraction`` of the image area with one rectangle (aspect 1:2 to 2:1, anywhere
    inside the image), filled with a flat random colour or with noise."""
    _check(image)
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    h, w = image.shape[:2]
    out = image.copy()
    area = fraction * h * w
    if area < 1:
        return out
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # width / height
    rh = min(h, max(1, round(math.sqrt(area / aspect))))
    rw = min(w, max(1, round(area / rh)))
    y = int(rng.integers(0, h - rh + 1))
    x = int(rng.integers(0, w - rw + 1))
    if rng.random() < 0.5:
        out[y : y + rh, x : x + rw] = rng.integers(0, 256, 3, dtype=np.uint8)
    else:
        out[y : y + rh, x : x + rw] = rng.integers(0, 256, (rh, rw, 3), dtype=np.uint8)
    return out


def low_light(image: np.ndarray, gain: float, gamma: float = 1.0) -> np.ndarray:
    """Under-exposure: ``255 * (gain * x / 255) ** gamma`` (gain < 1 darkens, gamma > 1 crushes
    the shadows further)."""
    _check(image)
    if gain <= 0 or gamma <= 0:
        raise ValueError(f"gain and gamma must be > 0, got {gain}, {gamma}")
    lut = 255.0 * np.clip(gain * np.arange(256) / 255.0, 0.0, 1.0) ** gamma
    return np.rint(lut).astype(np.uint8)[image]


@dataclass(frozen=True)
class DamageRecipe:
    """The fixed damage of the quality check: blur, shrink, JPEG (issue 17: sigma 3, 60 px, q 10).

    ``blur_sigma`` is in pixels of a 112-pixel-wide face crop and scales with the image, so a
    whole photo and its aligned crop get the same damage relative to the face."""

    blur_sigma: float = 3.0
    shrink_to: int = 60
    jpeg_quality: int = 10
    reference_width: float = 112  # the face crop's width the strengths are given for

    def __call__(self, image: np.ndarray) -> np.ndarray:
        _check(image)
        scale = max(image.shape[:2]) / self.reference_width
        out = gaussian_blur(image, self.blur_sigma * scale)
        out = resample(out, round(self.shrink_to * scale))
        return jpeg(out, self.jpeg_quality)


@dataclass(frozen=True)
class RandomDegradation:
    """Training-time damage: with probability ``p`` an image is degraded, and then each kind of
    damage is applied with its own probability (at least one always is), at a strength drawn
    uniformly from its range. Ranges are for 112x112 aligned crops.

    The defaults put half the training images through some damage, each kind about as often as
    the others, and reach the recipe's strength at their upper ends, so the check is inside the
    training distribution rather than beyond it.
    """

    p: float = 0.5
    blur_p: float = 0.35
    blur_sigma: tuple[float, float] = (0.5, 3.5)
    resample_p: float = 0.35
    resample_side: tuple[int, int] = (24, 90)
    noise_p: float = 0.2
    noise_sigma: tuple[float, float] = (2.0, 20.0)
    low_light_p: float = 0.2
    low_light_gain: tuple[float, float] = (0.15, 0.7)
    low_light_gamma: tuple[float, float] = (1.0, 1.8)
    occlusion_p: float = 0.15
    occlusion_fraction: tuple[float, float] = (0.1, 0.4)
    jpeg_p: float = 0.35
    jpeg_quality: tuple[int, int] = (8, 60)

    def __post_init__(self) -> None:
        for name in ("p", "blur_p", "resample_p", "noise_p", "low_light_p", "occlusion_p", "jpeg_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("blur_sigma", "resample_side", "noise_sigma", "low_light_gain", "low_light_gamma",
                     "occlusion_fraction", "jpeg_quality"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: the range ({lo}, {hi}) is empty")

    def kinds(self) -> tuple[tuple[str, float], ...]:
        return (("blur", self.blur_p), ("resample", self.resample_p), ("noise", self.noise_p),
                ("low_light", self.low_light_p), ("occlusion", self.occlusion_p), ("jpeg", self.jpeg_p))

    def choose(self, rng: np.random.Generator) -> list[str]:
        """The kinds of damage for one image, in the order they are applied (empty: clean)."""
        if rng.random() >= self.p:
            return []
        kinds = self.kinds()
        chosen = [name for name, prob in kinds if rng.random() < prob]
        if not chosen:  # a degraded image has at least one kind of damage, drawn by its weight
            weights = np.array([prob for _, prob in kinds], dtype=np.float64)
            if weights.sum() == 0:
                return []
            chosen = [kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))][0]]
        return chosen

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check(image)
        out = image
        for kind in self.choose(rng):
            out = _STEPS[kind](self, out, rng)
        return out if out is not image else image.copy()


# One step per kind of damage: the strength drawn from the configured range, then applied.
_STEPS = {
    "blur": lambda d, x, rng: gaussian_blur(x, rng.uniform(*d.blur_sigma)),
    "resample": lambda d, x, rng: resample(x, int(rng.integers(d.resample_side[0], d.resample_side[1] + 1))),
    "noise": lambda d, x, rng: gaussian_noise(x, rng.uniform(*d.noise_sigma), rng),
    "low_light": lambda d, x, rng: low_light(x, rng.uniform(*d.low_light_gain), rng.uniform(*d.low_light_gamma)),
    "occlusion": lambda d, x, rng: occlude(x, rng.uniform(*d.occlusion_fraction), rng),
    "jpeg": lambda d, x, rng: jpeg(x, int(rng.integers(d.jpeg_quality[0], d.jpeg_quality[1] + 1))),
}
