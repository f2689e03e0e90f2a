"""facerec.eval.verification: k-fold accuracy, ROC, TAR at FAR."""

from __future__ import annotations

import numpy as np
import pytest

from facerec.eval import (
    best_threshold,
    contiguous_folds,
    cosine_scores,
    evaluate_pairs,
    kfold_accuracy,
    roc_curve,
    tar_at_far,
)

pytestmark = pytest.mark.timeout(30)


def brute_best(scores, labels):
    cands = np.r_[scores.min() - 1, np.sort(scores)]
    return max(np.mean((scores > t) == labels) for t in cands)


def test_best_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.random(50) < 0.5
        scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounding creates ties
        t, acc = best_threshold(scores, labels)
        assert acc == pytest.approx(brute_best(scores, labels))
        assert np.mean((scores > t) == labels) == pytest.approx(acc)


def test_kfold_threshold_comes_from_the_other_folds():
    # Fold 0's own best threshold would be 0.5; the other folds all want 0.05.
    scores = np.array([0.6, 0.4, 0.1, 0.0] + [0.1, 0.0] * 6)
    labels = np.array([True, False, True, False] + [True, False] * 6)
    folds = np.r_[[0] * 4, np.repeat([1, 2, 3], 4)]
    res = kfold_accuracy(scores, labels, folds)
    assert 0.0 <= res.thresholds[0] < 0.1
    # Its own threshold (0.5) would score 1.0; with 0.05, 0.4 is a false accept: 3 of 4.
    assert res.accuracies[0] == pytest.approx(0.75)
    assert res.accuracies[1:] == pytest.approx([1.0, 1.0, 1.0])
    assert res.mean == pytest.approx(np.mean(res.accuracies))


def test_contiguous_folds_like_lfw():
    f = contiguous_folds(6000, 10)
    assert np.bincount(f).tolist() == [600] * 10 and np.all(np.diff(f) >= 0)


def test_roc_is_monotone_and_ends_at_one():
    rng = np.random.default_rng(1)
    labels = rng.random(500) < 0.3
    scores = rng.normal(labels * 2.0, 1.0)
    far, tar, thr = roc_curve(scores, labels)
    assert far[0] == 0 and tar[0] == 0 and far[-1] == 1 and tar[-1] == 1
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0) and np.all(np.diff(thr) < 0)


def test_tar_at_far_exact_and_unsupported():
    impostor = np.arange(100) / 100.0  # 0.00 .. 0.99
    genuine = np.array([0.995, 0.985, 0.975, 0.5])
    res = {r.far: r for r in tar_at_far(genuine, impostor, fars=(0.01, 0.02, 1e-3))}
    # FAR 1%: one impostor (0.99) may pass, so the threshold is 0.98: 0.995 and 0.985 pass.
    assert res[0.01].threshold == pytest.approx(0.98) and res[0.01].achieved_far == pytest.approx(0.01)
    assert res[0.01].tar == pytest.approx(0.5) and res[0.01].supported
    assert res[0.02].tar == pytest.approx(0.75)
    # 100 impostors cannot measure FAR 1e-3: flagged, not a number.
    assert not res[1e-3].supported and np.isnan(res[1e-3].tar) and "unsupported" in str(res[1e-3])


def test_tar_at_far_never_exceeds_target_with_ties():
    impostor = np.r_[np.full(10, 0.9), np.zeros(990)]
    genuine = np.full(5, 0.9)
    (r,) = tar_at_far(genuine, impostor, fars=(0.005,))
    assert r.achieved_far <= 0.005 and r.tar == 0.0  # ties at 0.9 are rejected


def test_evaluate_pairs_perfect_separation():
    a = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    b = np.eye(4)[[0, 1, 2, 3, 1, 2]]
    scores = cosine_scores(a, b)
    labels = np.array([True, True, True, True, False, False])
    res = evaluate_pairs(np.tile(scores, 5), np.tile(labels, 5), folds=5, fars=(0.1,))
    assert res.kfold.mean == 1.0 and res.tar[0].tar == 1.0
    assert res.as_dict()["accuracy"] == 1.0 and "tar@far=0.1" in res.as_dict()
