"""All-pairs protocols: every same-identity pair of a set's images is genuine, every
cross-identity pair an impostor.

A set of n images gives about n^2 / 2 impostors (LFW-H2's 7,068 images: 24.8 million), enough to
measure TAR at FAR 1e-4, which a 3,000-pair list cannot. Scores are computed in row chunks so the
n x n similarity matrix never exists at once; impostor scores are kept as float32 (100 MB for
LFW-H2). Optionally each pair gets a group (the max of its two images' groups, e.g. pose bins
ordered from frontal to profile; -1 when either image's group is unknown), and the highest
impostors are kept with their image indices (for the identity bootstrap).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def identity_ids(names) -> np.ndarray:
    """Dense integer ids (0..K-1, sorted by name) for a list of identity names."""
    return np.unique(np.asarray(names), return_inverse=True)[1].astype(np.int64)


def genuine_pairs(ids) -> tuple[np.ndarray, np.ndarray]:
    """Image indices (a, b), a < b, of every same-identity pair, grouped by identity."""
    ids = np.asarray(ids)
    a, b = [], []
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    for idx in np.split(order, bounds):
        if idx.size > 1:
            idx = np.sort(idx)
            i, j = np.triu_indices(idx.size, k=1)
            a.append(idx[i])
            b.append(idx[j])
    if not a:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(a), np.concatenate(b)


def pair_group(group_a, group_b) -> np.ndarray:
    """max of the two images' groups, -1 when either is -1 (unknown)."""
    ga, gb = np.asarray(group_a), np.asarray(group_b)
    return np.where((ga < 0) | (gb < 0), -1, np.maximum(ga, gb))


@dataclass
class ImpostorScores:
    scores: np.ndarray  # (M,) float32, every cross-identity pair
    groups: np.ndarray | None  # (M,) int8 pair group, when image groups were given
    top_scores: np.ndarray | None  # (K,) the K highest, descending
    top_a: np.ndarray | None  # (K,) image indices of those pairs
    top_b: np.ndarray | None


def impostor_scores(emb: np.ndarray, ids, image_groups=None, keep_top: int = 0,
                    chunk: int = 1024) -> ImpostorScores:
    """Cosine scores of every unordered cross-identity pair of L2-normalised ``emb``."""
    emb = np.asarray(emb, dtype=np.float32)
    ids = np.asarray(ids)
    n = len(emb)
    cols = np.arange(n)
    parts, gparts = [], []
    top_s = np.zeros(0, np.float32)
    top_a = top_b = np.zeros(0, np.int64)
    groups = None if image_groups is None else np.asarray(image_groups)
    for s in range(0, n, chunk):
        rows = np.arange(s, min(s + chunk, n))
        sims = emb[rows] @ emb.T
        mask = (cols[None, :] > rows[:, None]) & (ids[rows, None] != ids[None, :])
        ri, ci = np.nonzero(mask)
        vals = sims[ri, ci]
        parts.append(vals)
        if groups is not None:
            gparts.append(pair_group(groups[rows][ri], groups[ci]).astype(np.int8))
        if keep_top:
            cand_s = np.r_[top_s, vals]
            cand_a = np.r_[top_a, rows[ri]]
            cand_b = np.r_[top_b, ci]
            if cand_s.size > keep_top:
                keep = np.argpartition(-cand_s, keep_top - 1)[:keep_top]
                cand_s, cand_a, cand_b = cand_s[keep], cand_a[keep], cand_b[keep]
            top_s, top_a, top_b = cand_s, cand_a, cand_b
    scores = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    out = ImpostorScores(scores, np.concatenate(gparts) if groups is not None and gparts else None,
                         None, None, None)
    if keep_top:
        order = np.argsort(-top_s, kind="stable")
        out.top_scores, out.top_a, out.top_b = top_s[order], top_a[order], top_b[order]
    return out
