"""Verification metrics from pair scores: k-fold accuracy, ROC and TAR at FAR.

Scores are similarities (higher = more likely the same person); a pair is accepted when its score
is strictly above the threshold. Everything here works on numpy arrays of scores and boolean
labels, so any embedding model, pair list or fusion rule can feed it.

k-fold accuracy follows the LFW rule: the threshold used on fold k is the one that maximises
accuracy on all the *other* folds, so no fold is scored with a threshold fitted on itself.
TAR at FAR picks, for each target FAR, the threshold that lets through at most that fraction of
impostors. With N impostors the smallest FAR that means anything is 1/N; a target below that is
reported as unsupported rather than silently as a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def cosine_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays (they need not be normalised)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores for {labels.shape[0]} labels")
    if scores.size == 0:
        raise ValueError("no pairs")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    return scores, labels


def best_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``score > threshold`` on these pairs.

    All distinct cut points are tried at once from cumulative counts (O(N log N)). The threshold
    is the midpoint between neighbouring distinct scores, so it generalises to unseen pairs
    rather than sitting exactly on a training score.
    """
    scores, labels = _check(scores, labels)
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct value
    # Cutting after index i rejects s[:i+1]: correct = negatives at or below + positives above.
    neg_below = np.cumsum(~y)[distinct]
    pos_above = y.sum() - np.cumsum(y)[distinct]
    correct = np.r_[y.sum(), neg_below + pos_above]  # first entry: threshold below every score
    best = int(np.argmax(correct))
    if best == 0:
        threshold = s[0] - 1e-6
    else:
        i = distinct[best - 1]
        threshold = s[i] if i + 1 >= s.size else 0.5 * (s[i] + s[i + 1])
    return float(threshold), float(correct[best] / s.size)


@dataclass
class KFoldResult:
    accuracies: np.ndarray  # (K,) accuracy on each fold with the threshold of the other folds
    thresholds: np.ndarray  # (K,)

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def std(self) -> float:
        return float(self.accuracies.std())

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f}% ± {100 * self.std:.2f} ({len(self.accuracies)} folds)"


def contiguous_folds(num_pairs: int, num_folds: int) -> np.ndarray:
    """Fold id per pair for pairs listed fold after fold (LFW ``pairs.txt`` order)."""
    if not 2 <= num_folds <= num_pairs:
        raise ValueError(f"need 2 <= folds <= pairs, got {num_folds} folds for {num_pairs} pairs")
    return (np.arange(num_pairs) * num_folds) // num_pairs


def stratified_folds(labels, num_folds: int) -> np.ndarray:
    """Fold id per pair that spreads genuine and impostor pairs, each in list order, evenly over folds.

    Every fold holds the same share of genuine pairs, whatever the order of the list. For LFW's full
    ``pairs.txt`` (10 sets, each 300 genuine then 300 impostor pairs) this gives exactly the official
    folds; for a list sorted by label (one LFW set, 300 genuine then 300 impostor pairs), contiguous
    folds would hold one class each and their accuracies would say nothing.
    """
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    counts = (int(labels.sum()), int((~labels).sum()))
    if not 2 <= num_folds <= labels.size:
        raise ValueError(f"need 2 <= folds <= pairs, got {num_folds} folds for {labels.size} pairs")
    if min(counts) and num_folds > min(counts):
        raise ValueError(f"{num_folds} folds need at least {num_folds} genuine and {num_folds} impostor "
                         f"pairs, got {counts[0]} and {counts[1]}")
    folds = np.zeros(labels.size, dtype=np.int64)
    for value in (True, False):
        idx = np.flatnonzero(labels == value)
        folds[idx] = (np.arange(idx.size) * num_folds) // max(idx.size, 1)
    return folds


def kfold_accuracy(scores, labels, folds: int | Sequence[int] = 10) -> KFoldResult:
    """Accuracy per fold with the threshold chosen on the other folds.

    ``folds`` is either a number of folds, stratified by label (:func:`stratified_folds`: each fold
    has the same share of genuine pairs; the official folds for LFW's ``pairs.txt``), or a fold id
    per pair (e.g. ``Pair.fold``).
    """
    scores, labels = _check(scores, labels)
    fold_ids = stratified_folds(labels, folds) if isinstance(folds, int) else np.asarray(folds)
    if fold_ids.shape != scores.shape:
        raise ValueError("one fold id per pair is needed")
    names = np.unique(fold_ids)
    if names.size < 2:
        raise ValueError("k-fold accuracy needs at least two folds")
    accuracies, thresholds = [], []
    for k in names:
        test = fold_ids == k
        threshold, _ = best_threshold(scores[~test], labels[~test])
        accuracies.append(np.mean((scores[test] > threshold) == labels[test]))
        thresholds.append(threshold)
    return KFoldResult(np.asarray(accuracies, dtype=np.float64), np.asarray(thresholds))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds): one point per distinct score, thresholds descending.

    Point i accepts the pairs with ``score >= thresholds[i]`` (equivalently ``> `` the next lower
    distinct score). A first point (0, 0) at +inf is included so curves start at the origin.
    """
    scores, labels = _check(scores, labels)
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError("a ROC needs both genuine and impostor pairs")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tar = np.r_[0.0, np.cumsum(y)[last] / num_pos]
    far = np.r_[0.0, np.cumsum(~y)[last] / num_neg]
    return far, tar, np.r_[np.inf, s[last]]


@dataclass
class EqualErrorRate:
    eer: float  # the rate where FAR = FRR on the linearly interpolated ROC
    threshold: float  # accept score >= threshold: the ROC point where FAR - FRR turns >= 0
    num_genuine: int
    num_impostors: int

    def __str__(self) -> str:
        return f"EER {100 * self.eer:.2f}% (threshold {self.threshold:.4f})"


def equal_error_rate(scores, labels) -> EqualErrorRate:
    """The equal error rate, where the false accept and false reject rates are equal.

    The ROC is a staircase of points, one per distinct score; FAR - FRR increases along it from -1
    to +1. Between the last point where it is negative and the first where it is not, the two
    rates are interpolated linearly (the straight segment between the points, which is what ties
    or a randomised threshold achieve), and the EER is where they meet. A curve that passes through
    a point with FAR = FRR gives that value exactly.
    """
    far, tar, thresholds = roc_curve(scores, labels)
    frr = 1.0 - tar
    diff = far - frr
    i = int(np.argmax(diff >= -1e-12))  # first point at or past the crossing; diff[0] = -1
    d0, d1 = diff[i - 1], diff[i]
    t = 0.0 if d1 == d0 else -d0 / (d1 - d0)
    eer = far[i - 1] + t * (far[i] - far[i - 1])
    # Every point of the segment from point i-1 to i is reached by accepting some of the pairs
    # that score exactly thresholds[i] (all of them at point i), so that is the threshold.
    threshold = thresholds[i]
    labels = np.asarray(labels, dtype=bool).ravel()
    return EqualErrorRate(float(eer), float(threshold), int(labels.sum()), int((~labels).sum()))


@dataclass
class TarAtFar:
    far: float  # the target
    tar: float  # NaN when unsupported
    threshold: float  # accept score > threshold
    achieved_far: float
    supported: bool  # False when the target is below 1 / number of impostors
    num_impostors: int

    def __str__(self) -> str:
        if not self.supported:
            return f"TAR@FAR={self.far:g}: unsupported ({self.num_impostors} impostors)"
        return f"TAR@FAR={self.far:g}: {100 * self.tar:.2f}%"


def min_supported_far(num_impostors: int) -> float:
    return math.inf if num_impostors == 0 else 1.0 / num_impostors


def tar_at_far(genuine, impostor, fars: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4)) -> list[TarAtFar]:
    """TAR at each target FAR from genuine and impostor score arrays.

    The threshold is the k-th highest impostor score with k = floor(far * N) + 1, so at most
    floor(far * N) impostors score above it (ties at the threshold are rejected, never accepted,
    so the achieved FAR never exceeds the target).
    """
    genuine = np.asarray(genuine, dtype=np.float64).ravel()
    impostor = np.sort(np.asarray(impostor, dtype=np.float64).ravel())[::-1]
    if genuine.size == 0:
        raise ValueError("no genuine scores")
    n = impostor.size
    out = []
    for far in fars:
        allowed = math.floor(far * n + 1e-9)  # impostors allowed above the threshold
        supported = n > 0 and allowed >= 1 and far < 1
        if n == 0 or allowed >= n:
            threshold = -math.inf
        else:
            threshold = float(impostor[allowed])
        achieved = float(np.mean(impostor > threshold)) if n else math.nan
        tar = float(np.mean(genuine > threshold)) if supported else math.nan
        out.append(TarAtFar(float(far), tar, threshold, achieved, bool(supported), n))
    return out


@dataclass
class VerificationResult:
    """Everything a training run logs about one validation set."""

    kfold: KFoldResult
    tar: list[TarAtFar] = field(default_factory=list)
    num_genuine: int = 0
    num_impostors: int = 0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}accuracy": self.kfold.mean, f"{prefix}accuracy_std": self.kfold.std}
        for t in self.tar:
            if t.supported:
                out[f"{prefix}tar@far={t.far:g}"] = t.tar
        return out


def evaluate_pairs(
    scores, labels, folds: int | Sequence[int] = 10, fars: Sequence[float] = (1e-2, 1e-3)
) -> VerificationResult:
    scores, labels = _check(scores, labels)
    return VerificationResult(
        kfold=kfold_accuracy(scores, labels, folds),
        tar=tar_at_far(scores[labels], scores[~labels], fars),
        num_genuine=int(labels.sum()),
        num_impostors=int((~labels).sum()),
    )


# ------------------------------------------------------------------ results split by a pair attribute
def accuracy_by_group(scores, labels, folds: int | Sequence[int], groups) -> dict[int, dict[str, float]]:
    """k-fold accuracy restricted to each group of pairs (e.g. a pose bin).

    The threshold for fold k is chosen on *all* pairs of the other folds, as in
    :func:`kfold_accuracy`; only the counting is split, so the groups' correct counts add up to the
    overall result. Returns {group: {"accuracy", "pairs", "genuine", "impostors"}}.
    """
    scores, labels = _check(scores, labels)
    groups = np.asarray(groups).ravel()
    if groups.shape != scores.shape:
        raise ValueError("one group id per pair is needed")
    fold_ids = stratified_folds(labels, folds) if isinstance(folds, int) else np.asarray(folds)
    correct = np.zeros(scores.size, dtype=bool)
    for k in np.unique(fold_ids):
        test = fold_ids == k
        threshold, _ = best_threshold(scores[~test], labels[~test])
        correct[test] = (scores[test] > threshold) == labels[test]
    out = {}
    for g in np.unique(groups):
        m = groups == g
        out[int(g)] = {"accuracy": float(correct[m].mean()), "pairs": int(m.sum()),
                       "genuine": int(labels[m].sum()), "impostors": int((~labels[m]).sum())}
    return out


def tar_by_group(
    genuine, genuine_groups, impostor, impostor_groups, fars: Sequence[float] = (1e-2, 1e-3, 1e-4)
) -> dict[int, dict]:
    """TAR at FAR within each group, and at the operating point fixed on all impostors.

    For each group: ``within`` = TAR at FAR on that group's genuine pairs against that group's
    impostors (unsupported when the group has fewer than 1 / FAR impostors); ``at_global`` = the
    group's TAR and FAR at the thresholds that give each FAR over *all* impostors (how a deployed
    threshold behaves on that kind of pair).
    """
    genuine = np.asarray(genuine, dtype=np.float64).ravel()
    impostor = np.asarray(impostor, dtype=np.float64).ravel()
    gg, ig = np.asarray(genuine_groups).ravel(), np.asarray(impostor_groups).ravel()
    if gg.shape != genuine.shape or ig.shape != impostor.shape:
        raise ValueError("one group id per genuine and per impostor score is needed")
    overall = tar_at_far(genuine, impostor, fars)
    out = {}
    for g in np.unique(np.r_[gg, ig]):
        gen, imp = genuine[gg == g], impostor[ig == g]
        entry: dict = {"genuine": int(gen.size), "impostors": int(imp.size)}
        if gen.size:
            entry["within"] = tar_at_far(gen, imp, fars)
        else:
            entry["within"] = [TarAtFar(float(f), math.nan, math.nan, math.nan, False, int(imp.size))
                               for f in fars]
        entry["at_global"] = [
            {"far": t.far, "threshold": t.threshold, "supported": t.supported,
             "tar": float(np.mean(gen > t.threshold)) if gen.size and t.supported else math.nan,
             "far_in_group": float(np.mean(imp > t.threshold)) if imp.size and t.supported else math.nan}
            for t in overall
        ]
        out[int(g)] = entry
    return out
