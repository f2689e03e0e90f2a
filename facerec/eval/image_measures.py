"""Model-free image quality heuristics: the baselines a learned quality score has to beat.

All work on the aligned crop as the model sees it, a normalised (N, 3, H, W) batch with
``(x - 127.5) / 127.5`` pixels, through its grey level (the mean of R, G, B):

- sharpness: variance of the 4-neighbour Laplacian (blur lowers it);
- contrast: standard deviation of the grey levels;
- exposure: minus the distance of the mean grey level from mid-grey (127.5), so that both
  under- and over-exposed crops rank low;
- face size (from the detector's box on the original image, see ``facerec.eval.face_meta``):
  small faces were upsampled into the crop and carry less detail.

``combined_heuristic`` averages the percentile ranks of several such measures, a simple
"image heuristic" that needs no training and no choice of weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STAT_NAMES = ("sharpness", "contrast", "mean_grey")


def image_statistics(x: np.ndarray) -> np.ndarray:
    """(N, 3): Laplacian-variance sharpness, grey-level std and mean grey of a normalised batch."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (N, 3, H, W) batch, got {x.shape}")
    grey = x.mean(axis=1) * 127.5 + 127.5
    lap = (-4 * grey[:, 1:-1, 1:-1] + grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1]
           + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:])
    flat = grey.reshape(len(x), -1)
    return np.stack([lap.reshape(len(x), -1).var(axis=1), flat.std(axis=1), flat.mean(axis=1)], axis=1)


def exposure(mean_grey: np.ndarray, target: float = 127.5) -> np.ndarray:
    """Higher is better: ``-|mean grey - target|``."""
    return -np.abs(np.asarray(mean_grey, dtype=np.float64) - target)


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Average rank of each value scaled to [0, 1] (ties share their mean rank; NaN ranks lowest)."""
    v = np.asarray(values, dtype=np.float64)
    filled = np.where(np.isnan(v), -np.inf, v)
    order = np.argsort(filled, kind="stable")
    ranks = np.empty(v.size)
    ranks[order] = np.arange(v.size, dtype=np.float64)
    # average the ranks of ties
    _, inverse = np.unique(filled, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    ranks = (sums / counts)[inverse]
    return ranks / max(v.size - 1, 1)


def combined_heuristic(measures: Sequence[np.ndarray]) -> np.ndarray:
    """Mean percentile rank of the given per-image measures (each: higher = better)."""
    if not measures:
        raise ValueError("no measures to combine")
    return np.mean([percentile_rank(m) for m in measures], axis=0)
