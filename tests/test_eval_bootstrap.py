"""Identity-level bootstrap (facerec.eval.cluster_bootstrap) and the all-pairs helpers it uses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facerec.eval.allpairs import (
    genuine_pairs,
    identity_ids,
    impostor_scores,
    pair_group,
)
from facerec.eval.cluster_bootstrap import (
    difference_ci,
    identity_bootstrap,
    weighted_fnmr,
    weighted_threshold,
)
from facerec.eval.quality import _fnmr_from_sorted, bootstrap_ci, fixed_threshold

pytestmark = pytest.mark.timeout(60)
DISCARD = np.round(np.arange(0, 0.951, 0.05), 10)


def test_weighted_fnmr_equals_the_expanded_list():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 40))
        err = rng.random(n) < 0.3
        w = rng.integers(0, 4, n)
        if w.sum() == 0:
            w[0] = 1
        expanded = np.repeat(err, w).astype(np.int64)
        np.testing.assert_allclose(weighted_fnmr(err, w, DISCARD), _fnmr_from_sorted(expanded, DISCARD))
    # by hand: errors [1, 0, 1] with weights [2, 1, 1] -> copies 1 1 0 1; drop 1 -> 2/3, drop 2 -> 1/2
    np.testing.assert_allclose(weighted_fnmr([1, 0, 1], [2, 1, 1], [0.0, 0.25, 0.5, 0.75]),
                               [3 / 4, 2 / 3, 1 / 2, 1.0])


def test_weighted_threshold_equals_the_expanded_multiset():
    rng = np.random.default_rng(1)
    scores = np.sort(rng.normal(size=500))[::-1]
    w = rng.integers(0, 3, 500)
    expanded = np.repeat(scores, w)
    for fmr in (1e-2, 5e-2, 0.2):
        t, ok, _ = fixed_threshold(expanded, fmr)
        assert ok and weighted_threshold(scores, w, int(w.sum()), fmr) == t
    assert math.isnan(weighted_threshold(scores, w, 50, 1e-2))  # floor(0.5) = 0 allowed: unsupported


def _singletons(n=300, seed=2):
    rng = np.random.default_rng(seed)
    genuine = rng.normal(0.5, 0.2, n)
    quality = np.arange(n, dtype=float)  # pair k is identity k and k-th in quality order
    impostor = rng.normal(0.0, 0.2, 2000)
    return genuine, quality, impostor


def test_equals_the_pair_bootstrap_when_every_pair_is_its_own_identity():
    genuine, quality, impostor = _singletons()
    kw = {"fmr": 1e-2, "discard": DISCARD, "uppers": (0.3, 0.95), "num_resamples": 50, "seed": 3}
    pair = bootstrap_ci(genuine, impostor, quality, resample_impostors=False, **kw)
    ids = np.arange(genuine.size)
    top = np.sort(impostor)[::-1]
    ta = np.arange(top.size) % genuine.size
    res = identity_bootstrap(genuine, ids, {"q": quality}, impostor, top, ta, (ta + 1) % genuine.size,
                             resample_impostors=False, **kw)["q"]
    for key in ("pauc_0.3", "pauc_0.95", "fnmr_0"):
        np.testing.assert_allclose(res.samples[key], pair.samples[key], rtol=0, atol=1e-12)
        assert res.point[key] == pytest.approx(pair.point[key])
        assert res.low[key] == pytest.approx(pair.low[key]) and res.high[key] == pytest.approx(pair.high[key])


def _clustered_set(num_ids=40, images=6, seed=4):
    """Embeddings where some identities are hard (their genuine pairs score low): errors cluster."""
    rng = np.random.default_rng(seed)
    d = 16
    centres = rng.normal(size=(num_ids, d))
    spread = np.where(rng.random(num_ids) < 0.3, 1.6, 0.5)  # 30% of people are hard
    names = np.repeat(np.arange(num_ids), images)
    emb = centres[names] + rng.normal(size=(names.size, d)) * spread[names, None]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    quality = rng.random(names.size)  # uninformative: only the spread of the intervals matters
    return emb, names, quality


def test_wider_than_the_pair_bootstrap_when_pairs_share_identities():
    emb, names, q = _clustered_set()
    ids = identity_ids(names)
    a, b = genuine_pairs(ids)
    genuine = np.sum(emb[a] * emb[b], axis=1)
    imp = impostor_scores(emb, ids, keep_top=10**6)
    counts = np.bincount(ids)
    assert imp.scores.size == (counts.sum() ** 2 - np.sum(counts ** 2)) // 2
    gq = np.minimum(q[a], q[b])
    kw = {"fmr": 1e-2, "discard": DISCARD, "num_resamples": 300, "seed": 5}
    pair = bootstrap_ci(genuine, imp.scores, gq, **kw)
    clus = identity_bootstrap(genuine, ids[a], {"q": gq}, imp.scores, imp.top_scores, ids[imp.top_a],
                              ids[imp.top_b], images_per_identity=counts, **kw)["q"]
    for key in ("pauc_0.3", "fnmr_0"):
        assert clus.point[key] == pytest.approx(pair.point[key])
        assert clus.low[key] <= clus.point[key] <= clus.high[key]
        assert clus.high[key] - clus.low[key] > 1.5 * (pair.high[key] - pair.low[key])


def test_closed_form_impostor_total_and_paired_differences():
    emb, names, q = _clustered_set(num_ids=12, images=4, seed=6)
    ids = identity_ids(names)
    a, b = genuine_pairs(ids)
    genuine = np.sum(emb[a] * emb[b], axis=1)
    imp = impostor_scores(emb, ids, keep_top=10**5)
    counts = np.bincount(ids)
    gq = {"q": np.minimum(q[a], q[b]), "score": genuine, "same": np.minimum(q[a], q[b])}
    kw = {"fmr": 5e-2, "discard": DISCARD, "num_resamples": 100, "seed": 7}
    full = identity_bootstrap(genuine, ids[a], gq, imp.scores, imp.top_scores, ids[imp.top_a],
                              ids[imp.top_b], images_per_identity=counts, **kw)
    # the same replicates with the complete impostor list and no closed form: identical
    alt = identity_bootstrap(genuine, ids[a], gq, imp.scores, imp.top_scores, ids[imp.top_a],
                             ids[imp.top_b], images_per_identity=None, **kw)
    np.testing.assert_allclose(full["q"].samples["pauc_0.3"], alt["q"].samples["pauc_0.3"])
    # a measure against itself: difference exactly 0. The genuine score itself as the quality
    # discards every error first, the best possible order: never worse in any replicate
    assert difference_ci(full["q"], full["same"]) == (0.0, 0.0, 0.0)
    point, low, high = difference_ci(full["score"], full["q"])
    assert point < 0 and low < 0 and high <= 0
    assert np.all(full["score"].samples["pauc_0.3"] <= full["q"].samples["pauc_0.3"] + 1e-12)
    with pytest.raises(ValueError):
        identity_bootstrap(genuine, ids[a], gq, imp.scores, imp.top_scores, ids[imp.top_a],
                           ids[imp.top_b], images_per_identity=counts + 1, **kw)


def test_allpairs_helpers_by_hand():
    ids = np.array([0, 1, 0, 2, 1, 0])
    a, b = genuine_pairs(ids)
    assert sorted(zip(a.tolist(), b.tolist())) == [(0, 2), (0, 5), (1, 4), (2, 5)]
    emb = np.eye(6)[:, :6]
    emb[5] = emb[0]  # images 0 and 5 identical -> genuine score 1, not an impostor
    res = impostor_scores(emb, ids, image_groups=np.array([0, 1, 2, -1, 0, 1]), keep_top=3, chunk=2)
    assert res.scores.size == 15 - 4
    assert res.groups.tolist().count(-1) == 5  # image 3 is in 5 impostor pairs
    assert pair_group(np.array([0, 2, -1]), np.array([1, 1, 0])).tolist() == [1, 2, -1]
    assert res.top_scores.size == 3 and np.all(np.diff(res.top_scores) <= 0)
    assert np.all(ids[res.top_a] != ids[res.top_b])
