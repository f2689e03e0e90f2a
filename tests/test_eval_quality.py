"""EDC / pAUC / bootstrap on small hand-made inputs (facerec.eval.quality)."""

import math

import numpy as np
import pytest

from facerec.eval.allpairs import genuine_pairs, identity_ids, impostor_scores
from facerec.eval.cluster_bootstrap import identity_bootstrap
from facerec.eval.quality import (
    _bootstrap_thresholds,
    bootstrap_ci,
    edc_curve,
    fixed_threshold,
    identity_balanced_weights,
    pair_quality,
    partial_auc,
    weighted_fixed_threshold,
    weighted_fnmr,
    weighted_threshold,
)
from facerec.eval.quality_report import plot_edc
from facerec.eval.verification import tar_at_far

# 1000 impostors 0.000 .. 0.999: FMR 1e-2 allows 10 above -> threshold = 11th highest = 0.989
IMPOSTOR = np.arange(1000) / 1000.0


def test_fixed_threshold_matches_tar_at_far():
    t, ok, allowed = fixed_threshold(IMPOSTOR, 1e-2)
    assert ok and allowed == 10
    assert t == pytest.approx(0.989)
    assert t == pytest.approx(tar_at_far([1.0], IMPOSTOR, [1e-2])[0].threshold)
    assert np.sum(IMPOSTOR > t) == 10


def test_edc_exact_when_quality_ranks_the_errors():
    # 10 genuine pairs, the 3 lowest-quality ones are false non-matches (score <= 0.989)
    scores = np.array([0.1, 0.5, 0.9, 0.995, 0.996, 0.997, 0.998, 0.999, 0.9995, 0.9999])
    quality = np.arange(10, dtype=float)
    discard = np.round(np.arange(0, 0.96, 0.05), 10)
    res = edc_curve(scores, IMPOSTOR, quality, fmr=1e-2, discard=discard)
    assert res.supported
    dropped = np.floor(discard * 10 + 1e-9)
    expected = np.maximum(0, 3 - dropped) / (10 - dropped)
    np.testing.assert_allclose(res.fnmr, expected)
    assert res.fnmr[0] == pytest.approx(0.3)
    assert np.all(res.fnmr[discard >= 0.3] == 0) and np.all(res.fnmr[discard < 0.3] > 0)
    # the reverse ranking never removes an error before the last pairs
    rev = edc_curve(scores, IMPOSTOR, -quality, fmr=1e-2, discard=discard)
    np.testing.assert_allclose(rev.fnmr, np.minimum(1, 3 / (10 - dropped)))


def test_random_quality_gives_flat_edc():
    rng = np.random.default_rng(1)
    n = 20000
    scores = np.where(rng.random(n) < 0.2, 0.5, 0.999)  # 20% false non-matches
    res = edc_curve(scores, IMPOSTOR, rng.random(n), fmr=1e-2)
    base = res.fnmr[0]
    assert base == pytest.approx(np.mean(scores <= 0.989))
    ok = res.discard <= 0.9
    assert np.max(np.abs(res.fnmr[ok] - base)) < 0.04
    # slope of a least-squares line is ~0
    assert abs(np.polyfit(res.discard[ok], res.fnmr[ok], 1)[0]) < 0.02


def test_threshold_does_not_move_with_discard():
    rng = np.random.default_rng(2)
    genuine = rng.normal(0.7, 0.1, 500)
    impostor = rng.normal(0.0, 0.1, 5000)
    gq = rng.random(500)
    iq = rng.random(5000) + np.linspace(0, 1, 5000)  # quality correlated with impostor order
    t0, _, _ = fixed_threshold(impostor, 1e-2)
    res = edc_curve(genuine, impostor, gq, impostor_quality=iq, fmr=1e-2)
    assert res.threshold == t0
    # FNMR at every step is computed against that single threshold
    order = np.argsort(gq, kind="stable")
    for k, u in enumerate(res.discard):
        kept = genuine[order][int(np.floor(u * 500 + 1e-9)):]
        assert res.fnmr[k] == pytest.approx(np.mean(kept <= t0))
    # the impostors' FMR drifts with discard (the threshold was not re-estimated)
    assert res.fmr_remaining[0] == pytest.approx(np.mean(impostor > t0))
    assert np.nanmax(np.abs(res.fmr_remaining - res.fmr_remaining[0])) > 0


def test_partial_auc_by_hand():
    u = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    f = np.array([0.4, 0.2, 0.1, 0.0, 0.0])
    # trapezoids: 0.1*(0.4+0.2)/2 + 0.1*(0.2+0.1)/2 + 0.1*(0.1+0)/2 = 0.03 + 0.015 + 0.005
    assert partial_auc(u, f, 0.3) == pytest.approx(0.05)
    assert partial_auc(u, f, 0.3, normalise=True) == pytest.approx(0.05 / 0.3)
    # non-grid upper: f(0.25) = 0.05 by interpolation -> 0.03 + 0.015 + 0.05*(0.1+0.05)/2
    assert partial_auc(u, f, 0.25) == pytest.approx(0.04875)
    assert partial_auc(u, f, 0.4) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        partial_auc(u, f, 0.5)


def test_pair_quality_is_the_min():
    qa = np.array([0.9, 0.1, 0.5])
    qb = np.array([0.2, 0.8, 0.5])
    np.testing.assert_array_equal(pair_quality(qa, qb), [0.2, 0.1, 0.5])
    # a pair with one poor image must be discarded first even if the other image is excellent
    scores = np.array([0.5, 0.999, 0.999, 0.999])  # pair 0 is the only error
    per_image = np.array([[0.05, 1.0], [0.4, 0.5], [0.3, 0.6], [0.2, 0.7]])
    res = edc_curve(scores, IMPOSTOR, per_image, fmr=1e-2, discard=[0.0, 0.25])
    np.testing.assert_allclose(res.fnmr, [0.25, 0.0])
    same = edc_curve(scores, IMPOSTOR, pair_quality(per_image[:, 0], per_image[:, 1]), fmr=1e-2,
                     discard=[0.0, 0.25])
    np.testing.assert_array_equal(res.fnmr, same.fnmr)
    # with a max rule pair 0 would be kept (quality 1.0) and the error stays
    res_max = edc_curve(scores, IMPOSTOR, per_image.max(axis=1), fmr=1e-2, discard=[0.0, 0.25])
    assert res_max.fnmr[1] == pytest.approx(1 / 3)


def test_bootstrap_contains_point_and_is_deterministic():
    rng = np.random.default_rng(3)
    genuine = rng.normal(0.6, 0.15, 2000)
    impostor = rng.normal(0.0, 0.15, 20000)
    quality = genuine + rng.normal(0, 0.1, 2000)  # informative quality
    kw = {"fmr": 1e-2, "uppers": (0.3, 0.95), "num_resamples": 60, "seed": 7}
    a = bootstrap_ci(genuine, impostor, quality, **kw)
    b = bootstrap_ci(genuine, impostor, quality, **kw)
    assert a.as_dict() == b.as_dict()
    for k in ("pauc_0.3", "pauc_0.95", "fnmr_0"):
        assert a.low[k] <= a.point[k] <= a.high[k]
        assert a.high[k] > a.low[k]
    c = bootstrap_ci(genuine, impostor, quality, **{**kw, "seed": 8})
    assert c.low != a.low
    base = edc_curve(genuine, impostor, quality, fmr=1e-2)
    assert a.point["pauc_0.3"] == pytest.approx(partial_auc(base.discard, base.fnmr, 0.3))


def test_bootstrap_thresholds_match_brute_force():
    rng = np.random.default_rng(4)
    impostor = rng.normal(size=3000)
    fast = _bootstrap_thresholds(impostor, 1e-2, 400, np.random.default_rng(5))
    brute = np.array([fixed_threshold(rng.choice(impostor, impostor.size), 1e-2)[0] for _ in range(400)])
    assert fast.mean() == pytest.approx(brute.mean(), abs=0.03)
    assert fast.std() == pytest.approx(brute.std(), rel=0.25)


def test_unsupported_fmr_is_reported():
    impostor = np.linspace(0, 1, 50)
    t, ok, allowed = fixed_threshold(impostor, 1e-3)
    assert not ok and allowed == 0 and math.isnan(t)
    res = edc_curve(np.array([0.5, 0.9]), impostor, np.array([1.0, 2.0]), fmr=1e-3)
    assert not res.supported and np.all(np.isnan(res.fnmr))
    assert "unsupported" in res.note and "1000" in res.note
    boot = bootstrap_ci(np.array([0.5, 0.9]), impostor, np.array([1.0, 2.0]), fmr=1e-3)
    assert math.isnan(boot.point["pauc_0.3"]) and boot.num_resamples == 0
    # 1e-2 over 100 impostors is supported (exactly one may score above)
    assert fixed_threshold(np.linspace(0, 1, 100), 1e-2)[1]


def test_plot_writes_png(tmp_path):
    res = edc_curve(np.array([0.5, 0.999, 0.999]), IMPOSTOR, np.array([0.0, 1.0, 2.0]))
    out = plot_edc({"q": res}, tmp_path / "edc.png", title="t")
    assert out.exists() and out.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------- identity-balanced EDC
# Direct re-derivations, independent of the prefix-sum code: a pair of weight w is a mass w laid
# out in ascending quality; discarding u removes the first u * W of that mass (a pair straddling
# the line keeps the part above it); the threshold is the lowest impostor score with at most
# fmr * W_imp impostor weight strictly above it.
def _direct_fnmr(scores, quality, weights, thr, u):
    order = sorted(range(len(scores)), key=lambda i: (quality[i], i))
    drop = u * float(np.sum(weights))
    before = kept = err = 0.0
    for i in order:
        w = float(weights[i])
        keep = w - min(w, max(0.0, drop - before))
        before += w
        kept += keep
        err += keep * (scores[i] <= thr)
    return err / kept


def _direct_threshold(scores, weights, total, fmr):
    scores, weights = np.asarray(scores, float), np.asarray(weights, float)
    cand = np.unique(scores)
    above = (scores[None, :] > cand[:, None]).astype(float) @ weights
    return float(cand[above <= fmr * total * (1 + 1e-12)].min())


# four people: A 3 images (3 genuine pairs), B 2 images (1 pair), C and D 1 image each
# -> 6 pairs of people: A-B 6 impostors, A-C 3, A-D 3, B-C 2, B-D 2, C-D 1
HAND_IMP_IDS = [("C", "D")] + [("A", "C")] * 3 + [("A", "B")] * 6 + [("A", "D")] * 3 + [("B", "C")] * 2 \
    + [("B", "D")] * 2
HAND_IMP = np.array([0.90, 0.85, 0.84, 0.83, 0.50, 0.45, 0.40, 0.35, 0.30, 0.25, 0.20, 0.15, 0.10,
                     0.05, 0.04, 0.03, 0.02])
HAND_COUNTS = np.array([3, 2, 1, 1])  # A, B, C, D
HAND_GEN = np.array([0.50, 0.60, 0.95, 0.97])  # A1, B, A2, A3
HAND_GEN_ID = np.array([0, 1, 0, 0])
HAND_Q = np.array([0.1, 0.2, 0.3, 0.4])


def test_balanced_weights_by_hand():
    ia = np.array(["ABCD".index(x) for x, _ in HAND_IMP_IDS])
    ib = np.array(["ABCD".index(y) for _, y in HAND_IMP_IDS])
    bw = identity_balanced_weights(HAND_GEN_ID, ia, ib, images_per_identity=HAND_COUNTS)
    np.testing.assert_allclose(bw.genuine, [1 / 3, 1, 1 / 3, 1 / 3])
    np.testing.assert_allclose(bw.impostor, [1] + [1 / 3] * 3 + [1 / 6] * 6 + [1 / 3] * 3 + [1 / 2] * 4)
    assert bw.impostor_total == 6 and bw.genuine_identities == 2
    # the complete list, weights counted from it (a pair-list protocol): the same here
    listed = identity_balanced_weights(HAND_GEN_ID, ia, ib)
    np.testing.assert_allclose(listed.impostor, bw.impostor)
    assert listed.impostor_total == 6
    # every identity pair's impostors together weigh 1
    for pair in set(HAND_IMP_IDS):
        assert sum(w for p, w in zip(HAND_IMP_IDS, bw.impostor, strict=True) if p == pair) == pytest.approx(1)


def test_balanced_edc_and_threshold_by_hand():
    ia = np.array(["ABCD".index(x) for x, _ in HAND_IMP_IDS])
    ib = np.array(["ABCD".index(y) for _, y in HAND_IMP_IDS])
    bw = identity_balanced_weights(HAND_GEN_ID, ia, ib, images_per_identity=HAND_COUNTS)
    fmr = 0.25
    # plain: floor(0.25 * 17) = 4 impostors may score above -> 5th highest, 0.50
    plain_thr, ok, allowed = fixed_threshold(HAND_IMP, fmr)
    assert ok and allowed == 4 and plain_thr == 0.50
    # balanced: 0.25 * 6 = 1.5 identity pairs may score above: C-D (1) + one A-C (1/3) = 4/3 <= 1.5,
    # a second A-C would make 5/3 > 1.5 -> threshold 0.84
    thr = weighted_threshold(HAND_IMP, bw.impostor, bw.impostor_total, fmr)
    assert thr == 0.84 == _direct_threshold(HAND_IMP, bw.impostor, 6, fmr)
    assert weighted_fixed_threshold(HAND_IMP[::-1], bw.impostor[::-1], fmr) == 0.84
    # genuine weights A 1/3 each, B 1 (total 2); errors at 0.84: A1 (q .1) and B (q .2)
    u = np.array([0.0, 0.1, 0.25, 0.5, 0.75])
    res = edc_curve(HAND_GEN, HAND_IMP, HAND_Q, fmr=fmr, discard=u, genuine_weights=bw.genuine,
                    impostor_weights=bw.impostor)
    assert res.supported and res.threshold == 0.84
    # u=0: (1/3 + 1) / 2; u=.1: drop 0.2 of A1 -> (2/15 + 1) / 1.8; u=.25: A1 and 1/6 of B gone ->
    # (5/6) / 1.5; u=.5: A1 and 2/3 of B gone -> (1/3) / 1; u=.75: both errors gone -> 0
    expected = [2 / 3, 17 / 27, 5 / 9, 1 / 3, 0.0]
    np.testing.assert_allclose(res.fnmr, expected, rtol=0, atol=1e-12)
    direct = [_direct_fnmr(HAND_GEN, HAND_Q, bw.genuine, 0.84, x) for x in u]
    np.testing.assert_allclose(res.fnmr, direct, rtol=0, atol=1e-12)
    # the plain EDC at the same threshold counts pairs: 2/4, then floor(u * 4) pairs dropped
    same_thr = edc_curve(HAND_GEN, HAND_IMP, HAND_Q, fmr=fmr, discard=u, threshold=0.84)
    np.testing.assert_allclose(same_thr.fnmr, [1 / 2, 1 / 2, 1 / 3, 0, 0])
    # and the plain EDC proper (threshold 0.50): only A1 is an error
    plain = edc_curve(HAND_GEN, HAND_IMP, HAND_Q, fmr=fmr, discard=u)
    np.testing.assert_allclose(plain.fnmr, [1 / 4, 1 / 4, 0, 0, 0])
    # 0.1 of the 6 identity pairs is less than one: unsupported
    assert math.isnan(weighted_threshold(HAND_IMP, bw.impostor, 6, 0.1))


def test_weighted_fnmr_and_threshold_real_weights_match_direct():
    rng = np.random.default_rng(11)
    u = np.round(np.arange(0, 0.951, 0.05), 10)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        scores, quality = rng.random(n), rng.random(n)
        w = rng.random(n) * (rng.random(n) < 0.8)
        w[0] += 0.1
        order = np.argsort(quality, kind="stable")
        err = scores[order] <= 0.4
        got = weighted_fnmr(err, w[order], u)
        want = [_direct_fnmr(scores, quality, w, 0.4, x) for x in u]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        imp = np.round(rng.random(200), 2)  # ties
        iw = rng.random(200)
        total = float(iw.sum())
        for fmr in (0.05, 0.2):
            if fmr * total >= 1:
                assert weighted_fixed_threshold(imp, iw, fmr) == _direct_threshold(imp, iw, total, fmr)
    # integer-valued real weights equal the expanded list where u * W is whole
    err, w = np.array([1, 0, 1, 1]), np.array([2, 1, 1, 1])
    np.testing.assert_allclose(weighted_fnmr(err, w.astype(float), [0, 0.2, 0.4, 0.6, 0.8]),
                               weighted_fnmr(err, w, [0, 0.2, 0.4, 0.6, 0.8]))


def _people(counts, spread, seed, d=16):
    rng = np.random.default_rng(seed)
    names = np.repeat(np.arange(len(counts)), counts)
    noise = rng.normal(size=(names.size, d)) * np.asarray(spread)[names, None]
    emb = rng.normal(size=(len(counts), d))[names] + noise
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = identity_ids(names)
    a, b = genuine_pairs(ids)
    imp = impostor_scores(emb.astype(np.float32), ids, keep_top=10**6)
    q = rng.random(names.size)
    return ids, np.sum(emb[a] * emb[b], axis=1), np.minimum(q[a], q[b]), a, imp


def test_balanced_equals_plain_with_one_pair_per_identity_and_equal_image_counts():
    ids, genuine, gq, a, imp = _people([2] * 20, [0.9] * 20, seed=12)
    counts = np.bincount(ids)
    bw = identity_balanced_weights(ids[a], ids[imp.top_a], ids[imp.top_b], images_per_identity=counts)
    np.testing.assert_array_equal(bw.genuine, 1.0)
    np.testing.assert_array_equal(bw.impostor, 0.25)
    u = np.round(np.arange(0, 0.951, 0.05), 10)  # u * 20 pairs is whole
    for fmr in (0.05, 0.1):
        plain = edc_curve(genuine, imp.scores, gq, fmr=fmr, discard=u)
        thr = weighted_threshold(imp.top_scores, bw.impostor, bw.impostor_total, fmr)
        assert thr == plain.threshold
        bal = edc_curve(genuine, imp.scores, gq, fmr=fmr, discard=u, threshold=thr,
                        genuine_weights=bw.genuine)
        assert 0 < plain.fnmr[0] < 1
        np.testing.assert_allclose(bal.fnmr, plain.fnmr, rtol=0, atol=1e-12)
        # and so are the bootstrap replicates (same seed: same identity draws)
        kw = {"images_per_identity": counts, "fmr": fmr, "discard": u, "num_resamples": 30, "seed": 1}
        p = identity_bootstrap(genuine, ids[a], {"q": gq}, imp.scores, imp.top_scores, ids[imp.top_a],
                               ids[imp.top_b], **kw)["q"]
        b = identity_bootstrap(genuine, ids[a], {"q": gq}, imp.scores, imp.top_scores, ids[imp.top_a],
                               ids[imp.top_b], balance=True, **kw)["q"]
        for key in ("pauc_0.3", "pauc_0.95", "fnmr_0"):
            np.testing.assert_allclose(b.samples[key], p.samples[key], rtol=0, atol=1e-12)


def test_duplicating_one_persons_images_changes_plain_not_balanced():
    counts = [6, 3, 2, 4, 1, 2, 3, 2, 1, 3]
    ids, genuine, gq, a, imp = _people(counts, [1.4] + [0.6] * 9, seed=13)  # person 0: hard, many pairs
    gid, ia, ib = ids[a], ids[imp.top_a], ids[imp.top_b]
    # person 0's photos twice (as an identity drawn twice by the bootstrap: each copy makes the
    # same genuine pairs and the same impostors; copies do not pair with each other). Each copy
    # sits next to its original, so that ties in pair quality keep their order (list order).
    g_dup, i_dup = 1 + (gid == 0), 1 + ((ia == 0) | (ib == 0))
    genuine2, gq2, gid2 = (np.repeat(x, g_dup) for x in (genuine, gq, gid))
    imp2, ia2, ib2 = (np.repeat(x, i_dup) for x in (imp.top_scores, ia, ib))
    counts2 = np.bincount(ids) * np.where(np.arange(len(counts)) == 0, 2, 1)
    u = np.round(np.arange(0, 0.951, 0.01), 10)
    fmr = 0.05
    curves = {}
    sets = {"base": (genuine, gq, gid, imp.top_scores, ia, ib, np.bincount(ids)),
            "dup": (genuine2, gq2, gid2, imp2, ia2, ib2, counts2)}
    for tag, (g, q, gi, s, xa, xb, n) in sets.items():
        for mode in (n, None):  # closed-form (all pairs) and counted (pair list) weights
            bw = identity_balanced_weights(gi, xa, xb, images_per_identity=mode)
            assert bw.impostor_total == 45
            thr = weighted_fixed_threshold(s, bw.impostor, fmr, total_weight=bw.impostor_total)
            bal = edc_curve(g, s, q, fmr=fmr, discard=u, threshold=thr, genuine_weights=bw.genuine)
            curves.setdefault(tag, []).append((thr, bal.fnmr))
        curves[tag + "_plain"] = edc_curve(g, s, q, fmr=fmr, discard=u)
    ref_thr, ref = curves["base"][0]
    for thr, f in curves["base"] + curves["dup"]:
        assert thr == ref_thr
        np.testing.assert_allclose(f, ref, rtol=0, atol=1e-12)
    # the plain curve moves: person 0's (error-prone) pairs count twice
    assert np.max(np.abs(curves["dup_plain"].fnmr - curves["base_plain"].fnmr)) > 0.02
    assert curves["dup_plain"].fnmr[0] > curves["base_plain"].fnmr[0]
    # a wrong balance (genuine weights 1/G_a but impostors unweighted) would move the threshold
    bad = weighted_fixed_threshold(imp2, np.ones(imp2.size), fmr)
    assert bad != ref_thr


def test_balanced_bootstrap_equals_the_weighted_formula_with_product_weights():
    counts = [5, 4, 2, 3, 1, 2, 4, 2, 3, 2]
    ids, genuine, gq, a, imp = _people(counts, [1.2, 0.5] * 5, seed=14)
    gid, k = ids[a], len(counts)
    n_img = np.bincount(ids)
    G = np.bincount(gid, minlength=k)
    all_s, all_a, all_b = imp.top_scores, ids[imp.top_a], ids[imp.top_b]  # the complete list
    keep = 250  # the bootstrap only sees the highest 250 of the impostors
    u = np.round(np.arange(0, 0.951, 0.05), 10)
    fmr, seed, num = 0.1, 21, 25
    res = identity_bootstrap(genuine, gid, {"q": gq}, imp.scores, all_s[:keep], all_a[:keep], all_b[:keep],
                             images_per_identity=n_img, fmr=fmr, discard=u, num_resamples=num, seed=seed,
                             balance=True)["q"]
    # point estimate: the balanced EDC of the full set
    w_imp = 1.0 / (n_img[all_a] * n_img[all_b])
    thr0 = _direct_threshold(all_s, w_imp, w_imp.sum(), fmr)
    f0 = [_direct_fnmr(genuine, gq, 1.0 / G[gid], thr0, x) for x in u]
    assert res.point["pauc_0.3"] == pytest.approx(partial_auc(u, np.array(f0), 0.3), abs=1e-12)
    # replicates: identity multiplicities m (the same draws) times the balancing weights
    rng = np.random.default_rng(seed)
    for r in range(num):
        m = np.bincount(rng.integers(0, k, size=k), minlength=k)
        wi = m[all_a] * m[all_b] / (n_img[all_a] * n_img[all_b])
        thr = _direct_threshold(all_s, wi, wi.sum(), fmr)
        wg = m[gid] / G[gid]
        f = np.array([_direct_fnmr(genuine, gq, wg, thr, x) if wg.sum() > 0 else np.nan for x in u])
        assert res.samples["fnmr_0"][r] == pytest.approx(f[0], abs=1e-12, nan_ok=True)
        for upper in (0.3, 0.95):
            assert res.samples[f"pauc_{upper:g}"][r] == pytest.approx(partial_auc(u, f, upper), abs=1e-12,
                                                                      nan_ok=True)
    # the replicates differ from the unbalanced ones (same draws, other weights)
    plain = identity_bootstrap(genuine, gid, {"q": gq}, imp.scores, all_s[:keep], all_a[:keep],
                               all_b[:keep], images_per_identity=n_img, fmr=fmr, discard=u,
                               num_resamples=num, seed=seed)["q"]
    assert np.max(np.abs(plain.samples["pauc_0.3"] - res.samples["pauc_0.3"])) > 1e-3
