"""Embedding a face set, all-pairs scores, and the operating points a deployment ships.

Used by ``facerec calibrate`` (threshold + quality mapping written into an exported model, chosen
on the validation split only) and by ``benchmarks/evaluate_lfw.py`` (the final LFW-H2 report).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

# (N, 3, 112, 112) float32 normalised batch -> (embeddings (N, D), quality (N,) or None)
EmbedFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def load_batch(paths: Sequence[Path]) -> np.ndarray:
    """Aligned 112x112 images -> (N, 3, 112, 112) float32 RGB, (x - 127.5) / 127.5."""
    from facerec.data.datasets import read_rgb

    images = np.stack([read_rgb(p) for p in paths]).astype(np.float32)
    return ((images - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed_images(
    run: EmbedFn, paths: Sequence[Path], batch: int = 128, flip: bool = True, progress: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """L2-normalised embeddings (the normalised sum with the mirror image's when ``flip``) and the
    raw quality of the unflipped image (None for models without a quality head)."""
    embeddings, qualities = [], []
    starts = range(0, len(paths), batch)
    for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress):
        x = load_batch(paths[start : start + batch])
        emb, quality = run(x)
        emb = _normalise(emb)
        if flip:
            emb = _normalise(emb + _normalise(run(x[:, :, :, ::-1].copy())[0]))
        embeddings.append(emb)
        if quality is not None:
            qualities.append(quality)
    return np.concatenate(embeddings), (np.concatenate(qualities) if qualities else None)


def all_pairs_scores(embeddings: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) cosine scores over every unordered pair of images."""
    sims = embeddings @ embeddings.T
    ids = np.unique(np.asarray(names), return_inverse=True)[1]
    upper = np.triu_indices(len(names), k=1)
    same = ids[upper[0]] == ids[upper[1]]
    scores = sims[upper]
    return scores[same], scores[~same]


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """The threshold t with FAR(score > t) <= far on these impostor scores."""
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}")
    if far * len(impostor) < 1:
        raise ValueError(
            f"FAR {far:g} needs at least {int(np.ceil(1 / far))} impostor pairs; there are "
            f"{len(impostor)}"
        )
    ordered = np.sort(impostor)[::-1]
    return float(ordered[int(np.floor(far * len(ordered)))])


def quality_percentiles(quality: np.ndarray) -> list[float]:
    """Raw quality at percentiles 0..100: the mapping to the service's 0-100 quality score."""
    return np.percentile(quality, np.arange(101)).astype(float).tolist()
