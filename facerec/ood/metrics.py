"""Detection metrics for OOD scores, computed directly (no sklearn).

Convention throughout ``facerec.ood``: a score is *higher for in-distribution* inputs (genuine
faces), and the positive class is in-distribution, as in the Mahalanobis paper's
``calculate_log.py``: TPR is the fraction of genuine faces that pass, TNR the fraction of OOD inputs
that are flagged. A threshold ``t`` passes an input when ``score >= t``.
"""

from __future__ import annotations

import numpy as np


def _as_1d(scores) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError("empty score array")
    if not np.all(np.isfinite(a)):
        raise ValueError("scores contain NaN or inf")
    return a


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (what the Mann-Whitney U needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Start index of each run of equal values, and each element's run.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    run_id = np.cumsum(np.r_[0, np.diff(sorted_vals) != 0])
    ends = np.r_[starts[1:], len(values)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = avg[run_id]
    return ranks


def auroc(scores_in, scores_out) -> float:
    """P(score_in > score_out) + ½ P(tie): the area under the trapezoid ROC, exactly."""
    s_in, s_out = _as_1d(scores_in), _as_1d(scores_out)
    ranks = _average_ranks(np.concatenate([s_in, s_out]))
    n_in, n_out = len(s_in), len(s_out)
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0
    return float(u / (n_in * n_out))


def threshold_at_tpr(scores_in, tpr: float = 0.95) -> float:
    """The largest threshold that passes at least ``tpr`` of ``scores_in`` (``score >= t``).

    Without ties exactly ceil(tpr * n) scores pass, so the realised TPR lies in [tpr, tpr + 1/n).
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s = np.sort(_as_1d(scores_in))
    n = len(s)
    # Number allowed to fail; the small tolerance keeps e.g. 0.95*20 = 19.000000000000004 at 19.
    k = int(np.floor((1.0 - tpr) * n + 1e-9))
    return float(s[min(k, n - 1)])


def tnr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """Fraction of OOD scores below the threshold that keeps ``tpr`` of the in-distribution ones."""
    t = threshold_at_tpr(scores_in, tpr)
    return float(np.mean(_as_1d(scores_out) < t))


def rates_at_threshold(scores_in, scores_out, threshold: float) -> tuple[float, float]:
    """(TPR, TNR) of a fixed threshold, e.g. one calibrated on validation faces."""
    return (
        float(np.mean(_as_1d(scores_in) >= threshold)),
        float(np.mean(_as_1d(scores_out) < threshold)),
    )


def detection_accuracy(scores_in, scores_out) -> float:
    """max over thresholds of ½ (TPR + TNR) (balanced accuracy; 0.5 for a useless score)."""
    s_in, s_out = np.sort(_as_1d(scores_in)), np.sort(_as_1d(scores_out))
    candidates = np.unique(np.concatenate([s_in, s_out]))
    # For t = candidate: TPR = #(in >= t)/n_in, TNR = #(out < t)/n_out; t = +inf adds (0, 1).
    tpr = 1.0 - np.searchsorted(s_in, candidates, side="left") / len(s_in)
    tnr = np.searchsorted(s_out, candidates, side="left") / len(s_out)
    return float(max(0.5, np.max(0.5 * (tpr + tnr))))


def average_precision(scores_pos, scores_neg) -> float:
    """Area under the precision-recall curve as a step function over distinct thresholds.

    Tied scores enter at one threshold together (no arbitrary order inside a tie), the
    convention of sklearn's ``average_precision_score``.
    """
    pos, neg = _as_1d(scores_pos), _as_1d(scores_neg)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]  # descending
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tp = len(pos) - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg_sorted, thresholds, side="left")
    precision = tp / (tp + fp)
    recall = tp / len(pos)
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def aupr_in(scores_in, scores_out) -> float:
    """AUPR with in-distribution as the positive class (high score = positive)."""
    return average_precision(scores_in, scores_out)


def aupr_out(scores_in, scores_out) -> float:
    """AUPR with OOD as the positive class: scores are negated so low scores rank first."""
    return average_precision(-_as_1d(scores_out), -_as_1d(scores_in))


def ood_report(scores_in, scores_out, tpr: float = 0.95) -> dict[str, float]:
    """All of the paper's metrics for one (in-distribution, OOD) score pair."""
    return {
        "auroc": auroc(scores_in, scores_out),
        f"tnr_at_tpr{round(tpr * 100)}": tnr_at_tpr(scores_in, scores_out, tpr),
        "detection_accuracy": detection_accuracy(scores_in, scores_out),
        "aupr_in": aupr_in(scores_in, scores_out),
        "aupr_out": aupr_out(scores_in, scores_out),
        "n_in": int(np.size(scores_in)),
        "n_out": int(np.size(scores_out)),
    }
