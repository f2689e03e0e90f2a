"""What a teacher is, the teacher registry, and the aligned-crop input shared by most teachers.

A teacher maps face images to L2-normalised embeddings. Its ``teacher_id`` (adapter name, version
and a hash of its weights *and* of every option that changes its output) keys the teacher cache:
two teachers with the same id must give the same embedding for the same image bytes.

Images are RGB uint8 (H, W, 3) arrays of any size. A teacher whose model wants an aligned crop
(``input_kind == "aligned"``) takes an image of exactly its crop size as already aligned (what
``facerec align`` writes) and detects and aligns anything else with facerec's own detector and
ArcFace template; a photo teacher (``input_kind == "photo"``, dlib) prefers the original photo.
A row of NaN means the teacher found no face in that image.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from facerec.registry import Registry

_TEACHERS: Registry[Teacher] = Registry("teacher")

register_teacher = _TEACHERS.register


def create_teacher(name: str, **kwargs) -> Teacher:
    """Build a registered teacher, e.g. ``create_teacher("onnx", path="w600k_r50.onnx")``."""
    return _TEACHERS.create(name, **kwargs)


def list_teachers() -> list[str]:
    return _TEACHERS.names()


def hash_files_and_options(files: Sequence[str | Path], options: dict) -> str:
    """sha256 over the bytes of ``files`` (in order) and the canonical JSON of ``options``."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    h.update(json.dumps(options, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in float32; all-zero or non-finite rows become NaN rows."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    good = np.isfinite(norms) & (norms > 0)
    out = np.where(good, x / np.where(good, norms, 1.0), np.nan)
    return out.astype(np.float32)


class Teacher(ABC):
    """Subclasses set ``name``, ``input_kind``, ``version``, ``embedding_size``, ``weights_hash``."""

    name: str = "teacher"
    input_kind: str = "aligned"  # "aligned" (a template-aligned crop) or "photo" (the original)
    version: str = "0"
    embedding_size: int = 0
    weights_hash: str = ""

    @property
    def teacher_id(self) -> str:
        """``<name>-<version>-<first 16 hex of the weights+options hash>``; keys the cache."""
        return f"{self.name}-{self.version}-{self.weights_hash[:16]}"

    @abstractmethod
    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images -> (N, embedding_size) float32 unit rows; NaN rows where no face."""

    def describe(self) -> dict:
        return {"teacher_id": self.teacher_id, "name": self.name, "version": self.version,
                "embedding_size": int(self.embedding_size), "input_kind": self.input_kind,
                "weights_hash": self.weights_hash}


def default_detector():
    """facerec's MTCNN: on onnxruntime (one thread, the fastest for photos) where it is installed,
    else on torch (a core dependency; the dlib teacher does not otherwise need onnxruntime)."""
    from facerec.data.detect import create_detector

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return create_detector("mtcnn", backend="torch")
    return create_detector("mtcnn", backend="onnx", threads=1)


class AlignedInput:
    """Turns any image into the crop an aligned-input model expects.

    An image of exactly ``crop_size`` x ``crop_size`` is taken as aligned. Anything else goes
    through facerec's detector (MTCNN, with the padded retry that finds faces filling a tight
    crop), the largest face is kept and warped to the ArcFace template at ``crop_size``: the same
    code that made the student's crops, so teacher and student see the same face geometry.
    """

    def __init__(self, crop_size: int = 112, detector: Callable[[], object] | None = None):
        self.crop_size = int(crop_size)
        self._detector_factory = detector
        self._detector = None

    def _detect(self, image: np.ndarray):
        from facerec.data.detect import detect_faces

        if self._detector is None:
            self._detector = (self._detector_factory or default_detector)()
        return detect_faces(self._detector, image, policy="largest")

    def crop(self, image: np.ndarray) -> np.ndarray | None:
        from facerec.data.align import ensure_three_channels, norm_crop

        image = ensure_three_channels(np.asarray(image))
        if image.shape[:2] == (self.crop_size, self.crop_size):
            return image
        faces = self._detect(image)
        if not faces:
            return None
        return norm_crop(image, faces[0].landmarks, self.crop_size)

    def crops(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (K, S, S, 3) crops of the images where a face was found, bool (N,) found)."""
        made = [self.crop(im) for im in images]
        found = np.array([c is not None for c in made], dtype=bool)
        size = self.crop_size
        stack = np.stack([c for c in made if c is not None]) if found.any() else np.zeros((0, size, size, 3), np.uint8)
        return stack, found


def scatter_rows(rows: np.ndarray, found: np.ndarray, dim: int) -> np.ndarray:
    """(K, D) rows for the True entries of ``found`` -> (N, D) with NaN rows elsewhere."""
    out = np.full((len(found), dim), np.nan, dtype=np.float32)
    out[found] = rows
    return out


class CropTeacher(Teacher):
    """A teacher that embeds template-aligned crops in batches: subclasses set ``aligner``
    (:class:`AlignedInput`), ``batch_size`` and ``embedding_size`` and implement ``_run``."""

    aligner: AlignedInput
    batch_size: int = 32

    @abstractmethod
    def _run(self, crops: np.ndarray) -> np.ndarray:
        """One batch of aligned uint8 RGB crops (n, S, S, 3) -> raw (n, embedding_size) rows."""

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Aligned uint8 RGB crops (N, S, S, 3) -> unit rows, without any detection."""
        parts = [self._run(crops[i : i + self.batch_size]) for i in range(0, len(crops), self.batch_size)]
        raw = np.concatenate(parts) if parts else np.zeros((0, self.embedding_size), np.float32)
        return l2_normalise(raw)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        crops, found = self.aligner.crops(images)
        return scatter_rows(self.embed_crops(crops), found, self.embedding_size)
