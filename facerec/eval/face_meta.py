"""Per-image detection metadata for evaluation: detector score, face box and five landmarks.

Aligned 112x112 crops have lost what the detector saw: its confidence, the face's size in the
original photo, and the landmark geometry that tells head pose. Evaluation reports need all three
(the detector score as a quality measure, face size for the image heuristic, yaw for results by
pose), so this module re-runs a detector on the *original* images with the same face policy the
aligner used ("largest", minimum size 20 px, pad-and-retry) and caches the result as an ``.npz``
keyed by a relative path (``Name/Name_0001.jpg``), so one slow pass serves every later report.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm


@dataclass
class FaceMeta:
    """Detection results for ``keys`` (NaN rows where no face was kept)."""

    keys: list[str]
    found: np.ndarray  # (N,) bool
    score: np.ndarray  # (N,) detector confidence in [0, 1]
    box: np.ndarray  # (N, 4) x1, y1, x2, y2 in the original image's pixels
    landmarks: np.ndarray  # (N, 5, 2) ArcFace order (left eye, right eye, nose, mouth corners)
    image_size: np.ndarray  # (N, 2) width, height of the original image

    def __post_init__(self) -> None:
        n = len(self.keys)
        shapes = {"found": (n,), "score": (n,), "box": (n, 4), "landmarks": (n, 5, 2), "image_size": (n, 2)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"FaceMeta.{name} has shape {getattr(self, name).shape}, expected {shape}")

    @property
    def face_size(self) -> np.ndarray:
        """Shorter side of the detected box in pixels (NaN where no face was found)."""
        return np.minimum(self.box[:, 2] - self.box[:, 0], self.box[:, 3] - self.box[:, 1])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, keys=np.asarray(self.keys), found=self.found, score=self.score, box=self.box,
                 landmarks=self.landmarks, image_size=self.image_size)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FaceMeta:
        with np.load(path) as z:
            return cls([str(k) for k in z["keys"]], z["found"], z["score"], z["box"], z["landmarks"],
                       z["image_size"])

    def select(self, keys: Sequence[str]) -> FaceMeta:
        """Rows for ``keys`` in that order; raises naming the first key that is missing."""
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(f"{len(missing)} images have no detection metadata, e.g. {missing[0]!r}")
        rows = np.array([index[k] for k in keys], dtype=np.int64)
        return FaceMeta(list(keys), self.found[rows], self.score[rows], self.box[rows],
                        self.landmarks[rows], self.image_size[rows])


def relative_key(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``identity/file`` of an image below ``root`` (the key the cache uses), '/'-separated."""
    return Path(path).relative_to(root).as_posix()


def detect_meta(
    paths: Sequence[str | os.PathLike | np.ndarray],
    keys: Sequence[str],
    detector,
    min_size: float = 20.0,
    policy: str = "largest",
    pad_retry: bool = True,
    progress: bool = True,
) -> FaceMeta:
    """Runs ``detector`` on every image (a file, or an RGB uint8 array) with the aligner's face
    policy and keeps one face each."""
    from facerec.data.detect import detect_faces
    from facerec.data.image_io import load_image

    if len(paths) != len(keys):
        raise ValueError(f"{len(paths)} paths for {len(keys)} keys")
    n = len(paths)
    found = np.zeros(n, dtype=bool)
    score = np.full(n, np.nan)
    box = np.full((n, 4), np.nan)
    landmarks = np.full((n, 5, 2), np.nan)
    size = np.zeros((n, 2))
    from facerec.data.align import ensure_three_channels

    for i, path in enumerate(tqdm(paths, desc="detecting", unit="img", disable=not progress)):
        image = ensure_three_channels(path if isinstance(path, np.ndarray) else load_image(path))
        size[i] = image.shape[1], image.shape[0]
        faces = detect_faces(detector, image, policy, min_size, 0.0, pad_retry=pad_retry)
        if faces:
            face = faces[0]
            found[i] = True
            score[i] = face.score
            box[i] = face.box
            landmarks[i] = face.landmarks
    return FaceMeta(list(keys), found, score, box, landmarks, size)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m facerec.eval.face_meta ROOT --out FILE``: cache detections for a folder tree."""
    import argparse

    from facerec.data.detect import create_detector
    from facerec.data.folders import IMAGE_EXTENSIONS

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("root", help="folder tree <root>/<identity>/<image> of ORIGINAL (unaligned) images")
    ap.add_argument("--out", required=True, help="the .npz to write")
    ap.add_argument("--people", default="", help="file with one identity per line (default: all)")
    ap.add_argument("--backend", choices=("onnx", "torch"), default="onnx")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    root = Path(args.root)
    people = (Path(args.people).read_text().split() if args.people
              else sorted(p.name for p in root.iterdir() if p.is_dir()))
    paths = [f for name in people for f in sorted((root / name).iterdir())
             if f.suffix.lower() in IMAGE_EXTENSIONS]
    detector = create_detector("mtcnn", backend=args.backend, threads=args.threads)
    meta = detect_meta(paths, [relative_key(p, root) for p in paths], detector)
    meta.save(args.out)
    print(f"{int(meta.found.sum())}/{len(paths)} faces found; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
