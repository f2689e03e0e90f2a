"""dlib's ResNet face descriptor (128-d) as a teacher; optional extra ``teacher``.

dlib-bin and face_recognition_models (the weights) are imported only when this teacher is built,
so ``import facerec`` never needs them. The pipeline is dlib's own, on the ORIGINAL photo:

1. dlib's HOG frontal-face detector, upsampling the image ``upsample`` times (default 1: finds
   faces down to ~40 px; LFW's 250 x 250 photos need it); of several faces the largest is kept
   (the policy ``facerec align`` uses, so teacher and student mostly see the same face);
2. when HOG finds nothing (profiles, tight crops, dark faces), facerec's detector box (MTCNN with
   its padded retry) stands in for the HOG box;
3. dlib's 5-point shape predictor (``shape_predictor_5_face_landmarks``; not the 68-point model,
   whose training data is not licensed for commercial use) places the landmarks in that box;
4. the 150 x 150 chip dlib's network was trained on, cut with ``padding`` = 0.25 (dlib's default
   and the training chips' padding), and the descriptor, L2-normalised.

``jitters`` = 0 (default) embeds the chip once, deterministically; dlib's ``num_jitters`` = N
averages N randomly jittered copies instead (its author reports a small LFW gain at N = 100, at
N times the cost). Every option that changes the output is part of the teacher id.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facerec.teachers.base import Teacher, hash_files_and_options, l2_normalise, register_teacher

EXTRA_HINT = ("the dlib teacher needs the optional extra 'teacher': pip install 'facerec[teacher]' "
              "(dlib-bin + face_recognition_models)")
WEIGHTS = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_5 = "shape_predictor_5_face_landmarks.dat"


class MissingExtraError(ImportError):
    """An optional dependency of a teacher is not installed."""


def _import_dlib():
    try:
        import dlib
    except ImportError as err:
        raise MissingExtraError(f"{EXTRA_HINT} ({err})") from err
    return dlib


def default_models_dir() -> Path:
    """face_recognition_models' ``models`` folder, found without importing the package (its
    ``__init__`` needs ``pkg_resources``, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"{EXTRA_HINT} (face_recognition_models is not installed)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibTeacher(Teacher):
    name = "dlib"
    input_kind = "photo"
    embedding_size = 128

    def __init__(self, models_dir: str | Path | None = None, upsample: int = 1, padding: float = 0.25,
                 jitters: int = 0, fallback: bool = True, detector=None):
        dlib = _import_dlib()
        folder = Path(models_dir) if models_dir else default_models_dir()
        weights, shape = folder / WEIGHTS, folder / SHAPE_5
        for f in (weights, shape):
            if not f.is_file():
                raise MissingExtraError(f"{f} is missing; {EXTRA_HINT}")
        self.upsample, self.padding, self.jitters = int(upsample), float(padding), int(jitters)
        self.fallback = bool(fallback)
        self._hog = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(shape))
        self._net = dlib.face_recognition_model_v1(str(weights))
        self._rectangle = dlib.rectangle
        self._detector_factory = detector
        self._detector = None
        self.version = f"resnet_v1.dlib{dlib.__version__}"
        self.weights_hash = hash_files_and_options(
            [weights, shape], {"upsample": self.upsample, "padding": self.padding,
                               "jitters": self.jitters, "fallback": self.fallback})
        self.stats = {"hog": 0, "fallback": 0, "none": 0}

    def _fallback_box(self, image: np.ndarray):
        from facerec.data.detect import detect_faces
        from facerec.teachers.base import default_detector

        if self._detector is None:
            self._detector = (self._detector_factory or default_detector)()
        faces = detect_faces(self._detector, image, policy="largest")
        if not faces:
            return None
        x1, y1, x2, y2 = (int(round(float(v))) for v in faces[0].box)
        return self._rectangle(x1, y1, x2, y2)

    def face_box(self, image: np.ndarray):
        """dlib rectangle of the face to embed (HOG's largest, else facerec's box), or None."""
        found = self._hog(image, self.upsample)
        if len(found):
            self.stats["hog"] += 1
            return max(found, key=lambda r: r.area())
        box = self._fallback_box(image) if self.fallback else None
        self.stats["fallback" if box is not None else "none"] += 1
        return box

    def embed_one(self, image: np.ndarray) -> np.ndarray | None:
        from facerec.data.align import ensure_three_channels

        image = np.ascontiguousarray(ensure_three_channels(np.asarray(image, dtype=np.uint8)))
        box = self.face_box(image)
        if box is None:
            return None
        shape = self._shape(image, box)
        return np.asarray(self._net.compute_face_descriptor(image, shape, self.jitters, self.padding))

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        rows = [self.embed_one(im) for im in images]
        raw = np.array([r if r is not None else np.full(128, np.nan) for r in rows]).reshape(-1, 128)
        return l2_normalise(raw)

    def describe(self) -> dict:
        return {**super().describe(), "upsample": self.upsample, "padding": self.padding,
                "jitters": self.jitters, "fallback": self.fallback}


@register_teacher
def dlib(path: str | None = None, **kwargs) -> DlibTeacher:
    """dlib's ResNet descriptor on dlib's HOG box + 5-point chip (extra ``teacher``); ``path``: a
    folder with the two .dat files (default: face_recognition_models' own)."""
    return DlibTeacher(models_dir=path, **kwargs)
