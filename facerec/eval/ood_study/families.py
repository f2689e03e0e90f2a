"""The OOD study's input families, as the service sees them.

Every input is a *photo* (RGB uint8) that goes through the service's own face location
(``facerec.runtime.pipeline.FacePipeline.locate``: MTCNN, at most ``max_faces`` faces, the largest
one aligned to the 112x112 template). Photos in which no face is found are rejected by the face
detector before the OOD detector ever sees them; they are counted, not scored.

Families (each a dict entry ``name -> EvalSet``):

- genuine faces: LFW photos of one split;
- corruptions of those photos: Gaussian blur, Gaussian noise, an occluding noise block over
  40% of the face box, brightness x3 / x0.15;
- attacks on those photos (white box, through a differentiable twin of the alignment with the
  clean photo's landmarks, then 8-bit rounding, then detected and aligned again): FGSM and PGD
  dodging at ε/255, PGD impersonation toward another person's embedding, and the adaptive PGD
  that also raises the detector's score;
- attacks on the aligned crop itself (the model input, the strongest white-box setting);
- non-faces: CIFAR-10 images shown at 32, 112 and 224 px; scikit-image's photos (those without
  people), random crops of them, and the non-face patches of ``skimage.data.lfw_subset()``;
- controls that must *pass* (natural but poor captures, the quality score's business): grey
  photos, small faces (photo downscaled to 30%), JPEG quality 30, mild sensor-like noise
  (σ 2 grey levels per channel), and the same noise saved as JPEG quality 90.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from facerec.data.degrade import jpeg
from facerec.data.detect import detector_name
from facerec.ood import attacks

# scikit-image's bundled photos, minus the two that show people (astronaut, camera).
SKIMAGE_PHOTOS = (
    "brick",
    "cell",
    "chelsea",
    "checkerboard",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)


@dataclass
class EvalSet:
    """Aligned crops (N, 112, 112, 3) uint8 of the photos a face was found in, and bookkeeping."""

    crops: np.ndarray
    offered: int  # photos offered to the face detector
    source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # index of each crop's photo
    det_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))  # face detector's confidence

    @property
    def rejected(self) -> int:
        return self.offered - len(self.crops)


class ServiceLocator:
    """The service's face location on RGB uint8 photos: ``FacePipeline.locate`` with its defaults."""

    def __init__(self, contract, detector=None, min_face_size: float = 20.0, max_faces: int = 10) -> None:
        from facerec.runtime.pipeline import FacePipeline

        class _NoModel:  # locate() needs only the contract; nothing is ever embedded here
            output_names: tuple = ()

        backend = _NoModel()
        backend.contract = contract
        self.pipeline = FacePipeline(
            backend, detector=detector, min_face_size=min_face_size, max_faces=max_faces
        )

    @property
    def detector_name(self) -> str:
        return detector_name(self.pipeline.detector)

    def locate(self, photo: np.ndarray):
        """(crop uint8, landmarks (5, 2), detector confidence) of the largest face, or None when the
        service would answer 'no face' / 'too many faces'."""
        from facerec.runtime.pipeline import PipelineError

        try:
            located = self.pipeline.locate(np.ascontiguousarray(photo))
        except PipelineError:
            return None
        d = located.detections[0]
        return located.crops[0], np.asarray(d.landmarks, np.float64), float(d.score)

    def crops(self, photos: Sequence[np.ndarray]) -> EvalSet:
        from tqdm import tqdm

        kept, source, score = [], [], []
        for i, p in enumerate(tqdm(photos, desc="face detection", leave=False, disable=len(photos) < 50)):
            found = self.locate(p)
            if found is not None:
                kept.append(found[0])
                source.append(i)
                score.append(found[2])
        size = self.pipeline.contract.input_size
        crops = np.stack(kept) if kept else np.zeros((0, size, size, 3), np.uint8)
        return EvalSet(crops, len(photos), np.asarray(source, np.int64), np.asarray(score, np.float64))


def to_input(images: np.ndarray) -> torch.Tensor:
    """RGB uint8 (N, H, W, 3) -> model input (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model input -> RGB uint8, rounded as any image sent to the service is."""
    return ((x.detach() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- corruptions


def occlude_boxes(
    photos: np.ndarray, landmarks: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """A block of uniform noise covering ``fraction`` of each face's area (the square spanned by its
    landmarks, enlarged 2x), at a random position inside it."""
    out = photos.copy()
    h, w = photos.shape[1:3]
    for i, lm in enumerate(landmarks):
        c = lm.mean(0)
        half = max(lm.max(0) - lm.min(0)) or 20.0  # landmark spread ~ half the face width
        x0, y0 = int(max(c[0] - half, 0)), int(max(c[1] - half, 0))
        x1, y1 = int(min(c[0] + half, w)), int(min(c[1] + half, h))
        bw, bh = max(1, round((x1 - x0) * fraction**0.5)), max(1, round((y1 - y0) * fraction**0.5))
        bx = int(rng.integers(x0, max(x0 + 1, x1 - bw + 1)))
        by = int(rng.integers(y0, max(y0 + 1, y1 - bh + 1)))
        out[i, by : by + bh, bx : bx + bw] = rng.integers(0, 256, (bh, bw, 3), dtype=np.uint8)[
            : h - by, : w - bx
        ]
    return out


def corruptions(photos: np.ndarray, landmarks: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Heavy synthetic damage of whole photos (uint8 in, uint8 out)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = to_input(photos)
    half = len(x) // 2
    return {
        "blur": to_uint8(attacks.gaussian_blur(x, 4.0)),
        "noise": to_uint8(attacks.gaussian_noise(x, 0.2, generator=g)),
        "occlusion": occlude_boxes(photos, landmarks, 0.4, rng),
        "brightness": to_uint8(
            torch.cat([attacks.brightness(x[:half], 3.0), attacks.brightness(x[half:], 0.15)])
        ),
    }


def controls(photos: np.ndarray, seed: int) -> dict[str, np.ndarray | list]:
    """Natural but poor captures of genuine faces, which the OOD detector should let through."""
    rng = np.random.default_rng(seed)
    grey = np.repeat(
        cv2.cvtColor(photos.reshape(-1, *photos.shape[2:]), cv2.COLOR_RGB2GRAY).reshape(photos.shape[:3])[
            ..., None
        ],
        3,
        axis=3,
    )
    h, w = photos.shape[1:3]
    small = [cv2.resize(p, (round(w * 0.3), round(h * 0.3)), interpolation=cv2.INTER_AREA) for p in photos]
    noisy = np.clip(photos + rng.normal(0, 2.0, photos.shape), 0, 255).round().astype(np.uint8)
    return {
        "ctl_grey": grey,
        "ctl_small": small,
        "ctl_jpeg30": [jpeg(p, 30) for p in photos],
        "ctl_noise2": noisy,
        "ctl_noise2_jpeg90": [jpeg(p, 90) for p in noisy],
    }


# ----------------------------------------------------------------------------- attacks


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _progress(batches, n: int, size: int, desc: str):
    from tqdm import tqdm

    return tqdm(batches, desc=desc, total=-(-n // size), leave=False, disable=n <= size)


def _attack_batches(model, images: np.ndarray, kind: str, epsilon: float, steps: int, target, detector_score,
                    detector_weight: float, seed: int, batch: int, reference, desc: str,
                    warp_of: Callable[[slice], Callable] | None = None) -> np.ndarray:
    """FGSM or PGD over ``images`` in batches; ``warp_of(batch slice)`` gives the batch's input
    transform (the alignment warp for whole photos), None attacks the images themselves."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in _progress(_batches(len(images), batch), len(images), batch, desc):
        x = to_input(images[s])
        t = None if target is None else target[s]
        r = None if reference is None else reference[s]
        warp = None if warp_of is None else warp_of(s)
        if kind == "fgsm":
            adv = attacks.fgsm(model, x, epsilon, target=t, input_transform=warp, reference=r)
        else:
            adv = attacks.pgd(
                model,
                x,
                epsilon,
                steps=steps,
                target=t,
                generator=g,
                input_transform=warp,
                detector_score=detector_score,
                detector_weight=detector_weight,
                reference=r,
            )
        out.append(to_uint8(adv))
    return np.concatenate(out)


def attack_photos(
    model,
    photos: np.ndarray,
    landmarks: np.ndarray,
    kind: str,
    epsilon: float,
    steps: int = 5,
    target: torch.Tensor | None = None,
    detector_score: Callable | None = None,
    detector_weight: float = 1.0,
    seed: int = 0,
    batch: int = 25,
    reference: torch.Tensor | None = None,
    alignment: str | None = None,
    size: int = 112,
) -> np.ndarray:
    """Attack whole photos (same size) through the alignment warp with the given landmarks;
    ``kind`` is 'fgsm' or 'pgd'; ε in [0, 1] pixel units; ``target``: impersonation, else dodging
    away from ``reference`` (the gallery embeddings). ``alignment``/``size``: the model's crop (its
    contract; default the ArcFace 112 template). Returns perturbed uint8 photos."""
    from facerec.data.align import TEMPLATE_ID, estimate_norm

    alignment = alignment or TEMPLATE_ID

    def warp_of(s: slice):
        matrices = np.stack([estimate_norm(lm, size, alignment) for lm in landmarks[s]])
        return attacks.AlignmentWarp(matrices, photos.shape[1:3], size)

    return _attack_batches(model, photos, kind, epsilon, steps, target, detector_score, detector_weight,
                           seed, batch, reference, f"{kind} on photos", warp_of)


def attack_crops(
    model,
    crops: np.ndarray,
    kind: str,
    epsilon: float,
    steps: int = 5,
    target: torch.Tensor | None = None,
    detector_score: Callable | None = None,
    detector_weight: float = 1.0,
    seed: int = 0,
    batch: int = 25,
    reference: torch.Tensor | None = None,
) -> np.ndarray:
    """The same attacks on aligned crops (the model input itself)."""
    return _attack_batches(model, crops, kind, epsilon, steps, target, detector_score, detector_weight,
                           seed, batch, reference, f"{kind} on crops")


# ----------------------------------------------------------------------------- non-faces


def _skimage_data():
    try:
        import skimage.data
    except ImportError as err:
        raise RuntimeError("the scikit-image non-face family needs scikit-image (pip install scikit-image): "
                           "its photos and lfw_subset patches ship inside the wheel") from err
    return skimage.data


def cifar_photos(paths: Sequence, sizes: Sequence[int] = (32, 112, 224)) -> list[np.ndarray]:
    """Each CIFAR image at every size (bilinear up-sampling; 32 is the original)."""
    from facerec.data.datasets import read_rgb

    out = []
    for p in paths:
        img = read_rgb(p)
        out += [
            img if s == img.shape[0] else cv2.resize(img, (s, s), interpolation=cv2.INTER_LINEAR)
            for s in sizes
        ]
    return out


def skimage_photos(names: Sequence[str], crops_per_photo: int, seed: int) -> list[np.ndarray]:
    """scikit-image photos, plus random square crops of each resized to 48-256 px."""
    skimage_data = _skimage_data()

    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        img = np.asarray(getattr(skimage_data, name)())
        if img.dtype != np.uint8:
            img = (
                (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
                if img.dtype.kind == "f"
                else (img > 0).astype(np.uint8) * 255
            )
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = np.ascontiguousarray(img[..., :3])
        out.append(img)
        h, w = img.shape[:2]
        for _ in range(crops_per_photo):
            side = int(rng.integers(min(24, min(h, w)), min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            size = int(rng.integers(48, 257))
            out.append(
                cv2.resize(
                    img[y : y + side, x : x + side],
                    (size, size),
                    interpolation=cv2.INTER_AREA if size < side else cv2.INTER_LINEAR,
                )
            )
    return out


def skimage_patches(indices: Sequence[int], sizes: Sequence[int] = (25, 100)) -> list[np.ndarray]:
    """The non-face 25x25 patches of ``skimage.data.lfw_subset()`` (rows 100-199), grey, at each size."""
    skimage_data = _skimage_data()

    patches = skimage_data.lfw_subset()[100:]
    out = []
    for i in indices:
        grey = (np.clip(patches[i], 0, 1) * 255).round().astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        out += [rgb if s == 25 else cv2.resize(rgb, (s, s), interpolation=cv2.INTER_LINEAR) for s in sizes]
    return out
