"""Pose bins for verification reports: images by |yaw|, pairs by the larger |yaw| of the two.

Yaw comes from ``facerec.data.pose.head_poses`` (a mean 3-D face fitted to the five detector
landmarks under weak perspective): a rough angle, good enough to separate frontal, turned and
strongly turned faces. A pair is as hard as its more turned image, so its bin is that of
``max(|yaw_a|, |yaw_b|)``; an image whose face (or landmarks) was not found has bin -1 and so has
every pair that uses it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

#: Default bin edges in degrees of |yaw|: [0, 15), [15, 30), [30, 90].
YAW_BIN_EDGES: tuple[float, ...] = (15.0, 30.0)


def yaw_bin(yaw, edges: Sequence[float] = YAW_BIN_EDGES) -> np.ndarray:
    """Bin index (0 .. len(edges)) of each |yaw| in degrees; -1 where the yaw is NaN."""
    a = np.abs(np.asarray(yaw, dtype=np.float64))
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size == 0 or np.any(np.diff(e) <= 0) or np.any(e <= 0):
        raise ValueError(f"bin edges must be positive and increasing, got {list(edges)}")
    return np.where(np.isnan(a), -1, np.searchsorted(e, np.nan_to_num(a), side="right"))


def yaw_bin_labels(edges: Sequence[float] = YAW_BIN_EDGES) -> dict[int, str]:
    """{bin: name} for bins of |yaw| ('< 15°', '15–30°', '≥ 30°'), with -1 for 'pose unknown'.
    (No '|' in the names: they go into Markdown tables.)"""
    e = [f"{x:g}" for x in edges]
    middle = [f"{a}–{b}°" for a, b in itertools.pairwise(e)]
    names = [f"< {e[0]}°", *middle, f"≥ {e[-1]}°"]
    return {-1: "pose unknown", **dict(enumerate(names))}


def image_yaw(landmarks) -> np.ndarray:
    """(N,) yaw in degrees of (N, 5, 2) landmarks (NaN rows stay NaN)."""
    from facerec.data.pose import head_poses

    return head_poses(np.asarray(landmarks, dtype=np.float64))[:, 0]
