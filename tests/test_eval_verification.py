"""facerec.eval.verification: k-fold accuracy, ROC, TAR at FAR."""

from __future__ import annotations

import numpy as np
import pytest

from facerec.eval import (
    accuracy_by_group,
    best_threshold,
    contiguous_folds,
    cosine_scores,
    equal_error_rate,
    evaluate_pairs,
    kfold_accuracy,
    roc_curve,
    stratified_folds,
    tar_at_far,
    tar_by_group,
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


def test_integer_folds_are_stratified_for_a_list_sorted_by_label():
    # One LFW set: 300 genuine pairs, then 300 impostor pairs. Contiguous folds would each hold one
    # class (a fold of genuine pairs scored at the other folds' threshold says nothing about impostors).
    labels = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    folds = stratified_folds(labels, 10)
    for k in range(10):
        assert labels[folds == k].sum() == 30 and (~labels[folds == k]).sum() == 30
    rng = np.random.default_rng(3)
    scores = rng.normal(labels * 1.5, 1.0)
    res = kfold_accuracy(scores, labels, 10)
    np.testing.assert_array_equal(res.accuracies, kfold_accuracy(scores, labels, folds).accuracies)
    # Direct re-derivation of fold 0: threshold from the other 540 pairs, accuracy on its 60.
    test = folds == 0
    t, _ = best_threshold(scores[~test], labels[~test])
    assert res.accuracies[0] == pytest.approx(np.mean((scores[test] > t) == labels[test]))
    assert res.accuracies[0] != pytest.approx(kfold_accuracy(scores, labels, contiguous_folds(600, 10)).accuracies[0])


def test_stratified_folds_are_the_official_lfw_folds_for_the_full_list():
    # pairs.txt: 10 sets, each 300 genuine then 300 impostor pairs.
    labels = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], 10)
    np.testing.assert_array_equal(stratified_folds(labels, 10), contiguous_folds(6000, 10))


def test_stratified_folds_refuse_too_few_pairs_of_a_class():
    with pytest.raises(ValueError, match="10 folds need at least 10 genuine"):
        stratified_folds(np.r_[np.ones(5, bool), np.zeros(100, bool)], 10)


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


# ------------------------------------------------------------------ EER
def test_eer_on_a_roc_vertex_by_hand():
    # desc: .9G .8G .7I .4G .3I .2I -> ROC (far, frr): (0,1) (0,2/3) (0,1/3) (1/3,1/3) ...
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.2])
    labels = np.array([True, True, False, True, False, False])
    r = equal_error_rate(scores, labels)
    assert r.eer == pytest.approx(1 / 3)
    assert r.threshold == pytest.approx(0.7)  # accept >= 0.7: FAR 1/3, FRR 1/3
    assert np.mean(scores[~labels] >= r.threshold) == pytest.approx(np.mean(scores[labels] < r.threshold))


def test_eer_interpolates_across_a_tie():
    # genuine .9 .5 .5, impostor .5 .1: the tie at .5 makes a diagonal ROC segment from
    # (far 0, frr 2/3) to (far 1/2, frr 0); FAR = FRR where t*(1/2) = 2/3 - t*(2/3): t = 4/7
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    labels = np.array([True, True, True, False, False])
    r = equal_error_rate(scores, labels)
    assert r.eer == pytest.approx(2 / 7)
    # symmetric case: genuine .9 .5, impostor .5 .1 -> the segment (0, 1/2)-(1/2, 0) crosses at 1/4
    r2 = equal_error_rate(np.array([0.9, 0.5, 0.5, 0.1]), np.array([True, True, False, False]))
    assert r2.eer == pytest.approx(0.25) and r2.threshold == pytest.approx(0.5)


def test_eer_extremes_and_brute_force():
    assert equal_error_rate(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0], bool)).eer == 0.0
    assert equal_error_rate(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0], bool)).eer == 1.0
    rng = np.random.default_rng(5)
    labels = rng.random(4000) < 0.5
    scores = rng.normal(labels * 1.5, 1.0)
    r = equal_error_rate(scores, labels)
    grid = np.linspace(-3, 4, 20001)
    far = np.array([np.mean(scores[~labels] >= t) for t in grid[::20]])
    frr = np.array([np.mean(scores[labels] < t) for t in grid[::20]])
    i = np.argmin(np.abs(far - frr))
    assert r.eer == pytest.approx((far[i] + frr[i]) / 2, abs=2e-3)
    # for two unit-variance Gaussians 1.5 apart the EER is Phi(-0.75) = 0.2266
    assert r.eer == pytest.approx(0.2266, abs=0.02)


# ------------------------------------------------------------------ split by group
def test_accuracy_by_group_uses_the_global_fold_thresholds():
    scores = np.array([0.6, 0.4, 0.1, 0.0] + [0.1, 0.0] * 6)
    labels = np.array([True, False, True, False] + [True, False] * 6)
    folds = np.r_[[0] * 4, np.repeat([1, 2, 3], 4)]
    groups = np.r_[[1, 1, 0, 0], np.zeros(12, int)]
    res = accuracy_by_group(scores, labels, folds, groups)
    # fold 0's threshold (from folds 1-3) is ~0.05: group 1 = {0.6 G ok, 0.4 I false accept}
    assert res[1] == {"accuracy": 0.5, "pairs": 2, "genuine": 1, "impostors": 1}
    assert res[0]["accuracy"] == 1.0 and res[0]["pairs"] == 14
    total = sum(r["accuracy"] * r["pairs"] for r in res.values()) / len(scores)
    assert total == pytest.approx(kfold_accuracy(scores, labels, folds).accuracies.mean())


def test_tar_by_group_within_and_at_global_threshold():
    impostor = np.r_[np.arange(100) / 100.0, np.arange(10) / 10.0 + 0.005]
    igroups = np.r_[np.zeros(100, int), np.ones(10, int)]
    genuine = np.array([0.995, 0.985, 0.5, 0.95, 0.3])
    ggroups = np.array([0, 0, 0, 1, 1])
    res = tar_by_group(genuine, ggroups, impostor, igroups, fars=(0.01, 0.1))
    w0 = {t.far: t for t in res[0]["within"]}
    assert w0[0.01].supported and w0[0.01].tar == pytest.approx(2 / 3)  # threshold 0.98
    w1 = {t.far: t for t in res[1]["within"]}
    # group 1 has 10 impostors: FAR 0.01 is unsupported there, FAR 0.1 lets 0.905 through
    assert not w1[0.01].supported and np.isnan(w1[0.01].tar)
    assert w1[0.1].threshold == pytest.approx(0.805) and w1[0.1].tar == pytest.approx(0.5)
    g = {e["far"]: e for e in res[1]["at_global"]}
    # over all 110 impostors FAR 0.01 allows 1 above: threshold = 2nd highest = 0.98
    assert g[0.01]["threshold"] == pytest.approx(0.98)
    assert g[0.01]["tar"] == 0.0 and g[0.01]["far_in_group"] == 0.0
    assert res[1]["genuine"] == 2 and res[1]["impostors"] == 10
