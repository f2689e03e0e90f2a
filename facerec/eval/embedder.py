"""One embedding function for any model a report can be asked about, and a cache for its output.

``load_embedder(path)`` accepts a ``facerec export`` folder (its fp32 ``.onnx`` graph, found by
:func:`facerec.bundle.find_graph`), an ``.onnx`` file, or anything
``facerec.export.torch_artifact.load_model_file`` reads (a training checkpoint or a torch artefact). It returns a :data:`facerec.eval.calibration.EmbedFn`: a
normalised (N, 3, 112, 112) batch -> (raw embeddings, quality or None). Raw means *not*
L2-normalised, so the embedding norm stays available as a quality measure.

``embed_cached`` runs :func:`embed_set` (unflipped and, optionally, mirrored embeddings, quality
and the image statistics of :mod:`facerec.eval.image_measures` in one pass over the images) and
stores the arrays in an ``.npz`` keyed by the model file's hash and the image list, so a report
re-run, or a second report on the same images, does not embed again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facerec.bundle import find_graph
from facerec.eval.calibration import EmbedFn, load_batch


@dataclass
class Embedder:
    run: EmbedFn
    name: str  # what it is, for reports
    fingerprint: str  # short hash of the weights file(s)
    has_quality: bool


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def onnx_embedder(graph: Path, threads: int = 0) -> Embedder:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    if "embedding" not in outputs:
        raise ValueError(f"{graph} has no 'embedding' output (outputs: {outputs})")
    wanted = [n for n in ("embedding", "quality") if n in outputs]
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray):
        out = dict(zip(wanted, session.run(wanted, {input_name: np.ascontiguousarray(x, np.float32)})))
        q = out.get("quality")
        return out["embedding"], (None if q is None else np.asarray(q).reshape(-1))

    return Embedder(run, f"{graph.name} (onnxruntime CPU)", _file_hash(graph), "quality" in wanted)


def torch_embedder(path: Path, threads: int = 0) -> Embedder:
    import torch

    from facerec.export.torch_artifact import load_model_file

    if threads:
        torch.set_num_threads(threads)
    source = load_model_file(path)
    model = source.model.eval()
    probe = model(torch.zeros(1, 3, 112, 112))
    has_quality = getattr(probe, "quality", None) is not None

    @torch.no_grad()
    def run(x: np.ndarray):
        out = model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        q = out.quality.reshape(-1).numpy() if has_quality else None
        return out.embedding.numpy(), q

    weights = path / "model.pt" if path.is_dir() and (path / "model.pt").exists() else path
    fingerprint = _file_hash(weights) if weights.is_file() else source.name
    return Embedder(run, f"{source.name} ({path}, torch CPU)", fingerprint, has_quality)


def load_embedder(path: str | os.PathLike, threads: int = 0) -> Embedder:
    """An export folder or ``.onnx`` -> onnxruntime; a checkpoint / torch artefact -> torch."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    if path.suffix == ".onnx" or (path.is_dir() and any(path.glob("*.onnx"))):
        return onnx_embedder(find_graph(path), threads)
    import torch

    with torch.no_grad():
        return torch_embedder(path, threads)


@dataclass
class EmbeddedSet:
    """Per-image arrays, rows in the order of the image list."""

    embedding: np.ndarray  # (N, D) raw (un-normalised) embedding of the image
    embedding_flip: np.ndarray | None  # (N, D) raw embedding of the mirrored image
    quality: np.ndarray | None  # (N,) the model's quality output for the unflipped image
    image_stats: np.ndarray  # (N, 3) sharpness, contrast, mean grey (facerec.eval.image_measures)

    def normalised(self, flip: bool) -> np.ndarray:
        """L2-normalised embeddings; with ``flip`` the normalised sum of both views' normalised
        embeddings (the usual test-time flip augmentation)."""
        e = _l2(self.embedding)
        if flip:
            if self.embedding_flip is None:
                raise ValueError("these embeddings were computed without the mirrored images")
            e = _l2(e + _l2(self.embedding_flip))
        return e


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def normalise_images(images: np.ndarray) -> np.ndarray:
    """(N, 112, 112, 3) uint8 RGB -> the model input (N, 3, 112, 112) float32, (x - 127.5) / 127.5."""
    x = np.asarray(images, dtype=np.float32)
    return ((x - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()


def embed_set(embedder: Embedder, paths: Sequence[Path] | np.ndarray, flip: bool = True, batch: int = 64,
              progress: bool = True) -> EmbeddedSet:
    """``paths``: image files, or an (N, 112, 112, 3) uint8 RGB array of aligned faces."""
    from facerec.eval.image_measures import image_statistics

    is_array = isinstance(paths, np.ndarray)
    embs, flips, quals, stats = [], [], [], []
    for start in tqdm(range(0, len(paths), batch), desc="embedding", unit="batch", disable=not progress):
        chunk = paths[start : start + batch]
        x = normalise_images(chunk) if is_array else load_batch(chunk)
        emb, q = embedder.run(x)
        embs.append(np.asarray(emb, dtype=np.float32))
        if flip:
            flips.append(np.asarray(embedder.run(x[:, :, :, ::-1].copy())[0], dtype=np.float32))
        if q is not None:
            quals.append(np.asarray(q, dtype=np.float64))
        stats.append(image_statistics(x))
    if len(paths) == 0:
        raise ValueError("no images to embed")
    return EmbeddedSet(np.concatenate(embs), np.concatenate(flips) if flips else None,
                       np.concatenate(quals) if quals else None, np.concatenate(stats))


def _cache_key(embedder: Embedder, paths: Sequence[Path] | np.ndarray, flip: bool) -> str:
    h = hashlib.sha256(embedder.fingerprint.encode())
    if isinstance(paths, np.ndarray):
        h.update(np.ascontiguousarray(paths).tobytes())
    else:
        for p in paths:
            h.update(str(Path(p).resolve()).encode() + b"\0")
    h.update(b"flip" if flip else b"noflip")
    return h.hexdigest()[:20]


def embed_cached(embedder: Embedder, paths: Sequence[Path] | np.ndarray, cache: str | os.PathLike | None,
                 flip: bool = True, batch: int = 64, progress: bool = True) -> EmbeddedSet:
    """:func:`embed_set`, reusing ``cache`` when it holds the same model and image list (a cache
    made with ``flip`` also serves a request without it). The cache is rewritten otherwise."""
    if cache:
        cache = Path(cache)
        for key_flip in ((True, False) if not flip else (True,)):
            key = _cache_key(embedder, paths, key_flip)
            if cache.exists():
                with np.load(cache) as z:
                    if str(z["key"]) == key:
                        return EmbeddedSet(z["embedding"], z["embedding_flip"] if key_flip else None,
                                           z["quality"] if z["quality"].size else None, z["image_stats"])
    out = embed_set(embedder, paths, flip=flip, batch=batch, progress=progress)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, key=_cache_key(embedder, paths, flip), embedding=out.embedding,
                 embedding_flip=out.embedding_flip if flip else np.zeros(0),
                 quality=out.quality if out.quality is not None else np.zeros(0),
                 image_stats=out.image_stats)
        os.replace(tmp, cache)
    return out
