"""EDC / pAUC / bootstrap on small hand-made inputs (facerec.eval.quality)."""

import math

import numpy as np
import pytest

from facerec.eval.quality import (
    _bootstrap_thresholds,
    bootstrap_ci,
    edc_curve,
    fixed_threshold,
    pair_quality,
    partial_auc,
    plot_edc,
)
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
