"""Identity-level (cluster) bootstrap for EDC / pAUC confidence intervals.

Pairs are not independent: a person with 30 images contributes 435 genuine pairs, and every
impostor pair involves two people. Resampling pairs as if independent (``quality.bootstrap_ci``)
therefore gives intervals that are too narrow. Here the resampled unit is the identity: each
replicate draws K of the K identities with replacement, and an identity drawn ``m`` times brings
its images ``m`` times. Hence

- a genuine pair of identity ``k`` (both images are ``k``'s) counts ``m_k`` times;
- an impostor pair of identities ``a != b`` counts ``m_a * m_b`` times (the copies of ``a``'s and
  ``b``'s images make that many cross pairs; copies of one identity never make impostors);

and the EDC of the replicate is the EDC of that weighted multiset, computed exactly from prefix
sums (no expansion). The FMR threshold is re-estimated on each replicate's weighted impostors
(only the highest impostors can set it, so only those are kept); with ``resample_impostors=False``
it stays at the full-set value. When every genuine pair is its own identity and the threshold is
fixed, the replicates are exactly ``bootstrap_ci``'s pair resamples (same seed, same draws).

Every quality measure is scored on the same replicates (paired), so differences between
measures get their own intervals (``difference_ci``).

With ``balance=True`` the replicates are those of the **identity-balanced** EDC
(``quality.identity_balanced_weights``): the multiplicities are multiplied by the balancing
weights, so a genuine pair of identity ``k`` weighs ``m_k / G_k`` (an identity drawn ``m`` times
weighs ``m``, however many pairs it has) and an impostor pair of identities ``a != b`` weighs
``m_a m_b / (n_a n_b)`` (an identity-pair drawn ``m_a m_b`` times weighs that much), the total
impostor weight being ``sum_{a<b} m_a m_b`` over the identities with images. The weighted EDC and
threshold are the same functions (``quality.weighted_fnmr`` / ``weighted_threshold``) with real
weights; with the same seed the identity draws are the same as without balancing, so the two
views are paired too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from facerec.eval.quality import (
    DEFAULT_DISCARD,
    BootstrapResult,
    _as_pair_quality,
    edc_curve,
    fixed_threshold,
    identity_balanced_weights,
    partial_auc,
    weighted_fnmr,
    weighted_threshold,
)

__all__ = ["difference_ci", "identity_bootstrap", "weighted_fnmr", "weighted_threshold"]


def identity_bootstrap(
    genuine_scores,
    genuine_identity,
    qualities: Mapping[str, np.ndarray],
    impostor_scores,
    top_scores,
    top_identity_a,
    top_identity_b,
    images_per_identity=None,
    fmr: float = 1e-2,
    discard=DEFAULT_DISCARD,
    uppers: Sequence[float] = (0.3, 0.95),
    num_resamples: int = 200,
    seed: int = 0,
    level: float = 0.95,
    resample_impostors: bool = True,
    progress: bool = False,
    balance: bool = False,
) -> dict[str, BootstrapResult]:
    """Percentile intervals of pAUC (each ``upper``) and FNMR at 0% discard, resampling identities.

    - ``genuine_identity``: the identity (0..K-1) of each genuine pair;
    - ``qualities``: name -> pair quality per genuine pair (or (n, 2) image qualities, min-reduced);
    - ``impostor_scores``: all impostor scores (for the point estimate's threshold);
    - ``top_scores`` (descending) with ``top_identity_a/b``: the highest impostors and their two
      identities, enough of them to hold the threshold of every replicate;
    - ``images_per_identity``: (K,) image counts when the impostors are *all* cross-identity pairs
      of the images (then a replicate's impostor total is known in closed form); None when the
      top list is the complete impostor list (a pair-list protocol);
    - ``balance``: the identity-balanced EDC (module docstring); point estimates, threshold and
      replicates all use the balanced weights times the multiplicities.
    """
    genuine = np.asarray(genuine_scores, dtype=np.float64).ravel()
    gid = np.asarray(genuine_identity, dtype=np.int64).ravel()
    impostor = np.asarray(impostor_scores).ravel()
    top = np.asarray(top_scores, dtype=np.float64).ravel()
    ta = np.asarray(top_identity_a, dtype=np.int64).ravel()
    tb = np.asarray(top_identity_b, dtype=np.int64).ravel()
    if gid.shape != genuine.shape:
        raise ValueError("one identity per genuine pair is needed")
    if np.any(np.diff(top) > 0):
        raise ValueError("top_scores must be in descending order")
    if np.any(ta == tb):
        raise ValueError("an impostor pair's two identities must differ")
    k = int(max(gid.max(initial=-1), ta.max(initial=-1), tb.max(initial=-1)) + 1)
    if images_per_identity is not None:
        n_img = np.asarray(images_per_identity, dtype=np.int64)
        k = max(k, n_img.size)
        if n_img.size != k:
            raise ValueError(f"images_per_identity has {n_img.size} entries for {k} identities")
        if (n_img.sum() ** 2 - np.sum(n_img ** 2)) // 2 != impostor.size:
            raise ValueError("images_per_identity does not match an all-pairs impostor set")
    elif top.size != impostor.size:
        raise ValueError("without images_per_identity the top list must hold every impostor")
    discard = np.asarray(discard, dtype=np.float64)
    if balance:
        bw = identity_balanced_weights(gid, ta, tb, images_per_identity)
        g_bal, t_bal = bw.genuine, bw.impostor
        has_img = None if images_per_identity is None else (n_img > 0).astype(np.int64)
        base_thr = weighted_threshold(top, t_bal, bw.impostor_total, fmr)
        supported = not math.isnan(base_thr)
    else:
        base_thr, supported, _ = fixed_threshold(impostor, fmr)
    keys = [f"pauc_{u:g}" for u in uppers] + ["fnmr_0"]
    prepared = {}
    for name, q in qualities.items():
        pq = _as_pair_quality(q)
        if pq.shape != genuine.shape:
            raise ValueError(f"quality {name!r} has {pq.shape[0]} values for {genuine.size} pairs")
        prepared[name] = (pq, np.argsort(pq, kind="stable"))
    if not supported:
        nan = {key: math.nan for key in keys}
        return {name: BootstrapResult(dict(nan), dict(nan), dict(nan), 0, seed, level) for name in qualities}
    points = {}
    for name, (pq, _) in prepared.items():
        curve = edc_curve(genuine, impostor, pq, fmr=fmr, discard=discard, threshold=base_thr,
                          genuine_weights=g_bal if balance else None)
        points[name] = {**{f"pauc_{u:g}": partial_auc(discard, curve.fnmr, u) for u in uppers},
                        "fnmr_0": float(curve.fnmr[0])}
    rng = np.random.default_rng(seed)
    samples = {name: {key: np.empty(num_resamples) for key in keys} for name in qualities}
    from tqdm import tqdm

    for b in tqdm(range(num_resamples), desc=f"identity bootstrap, FMR {fmr:g}", disable=not progress):
        m = np.bincount(rng.integers(0, k, size=k), minlength=k)
        if resample_impostors and balance:
            w = (m[ta] * m[tb]) * t_bal
            if images_per_identity is not None:
                s = m * has_img  # every identity pair (a, b) with images weighs m_a m_b
                total = float((s.sum() ** 2 - np.sum(s ** 2)) // 2)
            else:
                total = float(w.sum())
            thr = weighted_threshold(top, w, total, fmr)
        elif resample_impostors:
            w = m[ta] * m[tb]
            if images_per_identity is not None:
                s = m * n_img
                total = int((s.sum() ** 2 - np.sum(s ** 2)) // 2)
            else:
                total = int(w.sum())
            thr = weighted_threshold(top, w, total, fmr)
        else:
            thr = base_thr
        for name, (_, order) in prepared.items():
            if math.isnan(thr):
                f = np.full(discard.shape, np.nan)
            elif balance:
                f = weighted_fnmr(genuine[order] <= thr, m[gid[order]] * g_bal[order], discard)
            else:
                f = weighted_fnmr(genuine[order] <= thr, m[gid[order]], discard)
            for u in uppers:
                samples[name][f"pauc_{u:g}"][b] = partial_auc(discard, f, u)
            samples[name]["fnmr_0"][b] = f[0]
    alpha = (1 - level) / 2
    out = {}
    for name in qualities:
        s = samples[name]
        low = {key: float(np.nanquantile(v, alpha)) for key, v in s.items()}
        high = {key: float(np.nanquantile(v, 1 - alpha)) for key, v in s.items()}
        out[name] = BootstrapResult(points[name], low, high, num_resamples, seed, level, s)
    return out


def difference_ci(a: BootstrapResult, b: BootstrapResult, key: str = "pauc_0.3",
                  level: float | None = None) -> tuple[float, float, float]:
    """(point, low, high) of ``a - b`` for two measures bootstrapped on the same replicates."""
    if a.num_resamples != b.num_resamples or a.seed != b.seed:
        raise ValueError("the two results were not computed on the same replicates")
    level = a.level if level is None else level
    d = a.samples[key] - b.samples[key]
    alpha = (1 - level) / 2
    return (a.point[key] - b.point[key], float(np.nanquantile(d, alpha)), float(np.nanquantile(d, 1 - alpha)))
