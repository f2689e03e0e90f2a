"""Face-image quality evaluation: Error-versus-Discard Characteristic (EDC), partial AUC, bootstrap CIs.

Conventions (see ``shared/reference/methods.md`` section 7):

- A pair's quality is the **lower** of its two images' qualities: ``min(q_a, q_b)``.
- Discarding a fraction ``u`` removes the ``floor(u * n)`` genuine pairs of lowest pair quality
  (stable sort; ties are broken by the pairs' original order, so the result is deterministic).
- The comparison threshold is **fixed once, at 0% discard**, for the target FMR over *all* impostor
  pairs (the ISO/IEC 29794-1 style EDC). CR-FIQA's ``ERC/erc.py`` instead re-estimates the threshold
  on the remaining pairs at every discard step; we do not.
- Accept when ``score > threshold``; the threshold is the ``k``-th highest impostor score with
  ``k = floor(fmr * N) + 1`` (as ``facerec.eval.verification.tar_at_far``), so at most
  ``floor(fmr * N)`` impostors score above it. The FMR is *unsupported* when ``floor(fmr * N) < 1``
  (fewer than ``1 / fmr`` impostors); the curve is then all NaN and ``supported`` is False.
- FNMR at discard ``u`` = fraction of the remaining genuine pairs with ``score <= threshold``.
- ``partial_auc`` is the trapezoid area under FNMR(u) for u in [0, upper], **not normalised** by
  default (units of FNMR x discard fraction, like ``sklearn.metrics.auc`` in CR-FIQA);
  ``normalise=True`` divides by ``upper`` (mean FNMR over the range).

Weighted pairs (one code path for the plain, the identity-bootstrap and the identity-balanced EDC,
:func:`weighted_fnmr` and :func:`weighted_threshold`): a genuine pair of weight ``w`` counts ``w``
times in the FNMR, an impostor of weight ``w`` counts ``w`` times in the FMR.

- **Integer weights** (the plain EDC: all 1; the identity bootstrap: multiplicities): a pair of
  weight ``w`` is ``w`` adjacent copies; discarding ``u`` drops ``floor(u * W)`` copies of the
  ``W = sum(w)``, so the pair at the boundary may lose only some of its copies. All-ones weights
  give the plain EDC bit for bit.
- **Real weights** (the identity-balanced EDC, alone or times bootstrap multiplicities): a pair of
  weight ``w`` is a mass ``w``; discarding ``u`` drops exactly ``u * W`` of the mass, lowest pair
  quality first, and the boundary pair (the one whose cumulative mass straddles ``u * W``) loses
  the part below ``u * W`` and keeps the rest, its error counting with the kept part. It is the
  integer rule without rounding down to whole copies: with equal weights it matches the plain
  EDC wherever ``u * n`` is whole (on the 1% grid: whenever n is a multiple of 100), elsewhere the
  plain EDC drops up to one pair less.
- Threshold: the lowest impostor score ``t`` such that the impostor weight scoring above ``t`` is
  at most ``fmr * W_imp`` (the ``(floor(fmr * N) + 1)``-th highest score for unit weights). The FMR
  is unsupported when ``fmr * W_imp < 1``: for real weights the unit is the weight of one identity
  pair's impostors (balanced weights), so the FMR must allow at least one identity pair.

**Identity-balanced** weights (:func:`identity_balanced_weights`): a genuine pair of identity
``a`` weighs ``1 / G_a`` (``G_a`` its genuine pairs), so every identity with genuine pairs weighs 1
in the FNMR; an impostor pair of identities ``a != b`` weighs ``1 / (n_a * n_b)`` (all-pairs
protocol, ``n`` images per identity) or ``1 / I_ab`` (a pair list with ``I_ab`` impostors of that
identity pair), so every identity pair weighs 1 in the FMR and the threshold is balanced too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_DISCARD = np.round(np.arange(0.0, 0.951, 0.01), 10)


def pair_quality(q_a: np.ndarray, q_b: np.ndarray) -> np.ndarray:
    """Pair quality = min of the two images' qualities."""
    return np.minimum(np.asarray(q_a, dtype=np.float64), np.asarray(q_b, dtype=np.float64))


def fixed_threshold(impostor_scores: np.ndarray, fmr: float) -> tuple[float, bool, int]:
    """(threshold, supported, allowed) for ``fmr`` over all impostors; ``allowed`` impostors may
    score above the threshold. Unsupported (threshold NaN) when ``floor(fmr * N) < 1``."""
    if not 0 < fmr < 1:
        raise ValueError(f"fmr must be in (0, 1), got {fmr}")
    impostor = np.asarray(impostor_scores, dtype=np.float64).ravel()
    n = impostor.size
    allowed = math.floor(fmr * n + 1e-9)
    if allowed < 1:
        return math.nan, False, allowed
    # k-th highest with k = allowed + 1 -> index n - allowed - 1 in ascending order
    kth = n - allowed - 1
    threshold = float(np.partition(impostor, kth)[kth])
    return threshold, True, allowed


def _integer_weights(w: np.ndarray) -> bool:
    return w.dtype == bool or np.issubdtype(w.dtype, np.integer)


def weighted_fnmr(errors_sorted, weights_sorted, discard) -> np.ndarray:
    """FNMR after discarding the fraction ``discard`` of the genuine weight, lowest quality first.

    ``errors_sorted`` / ``weights_sorted`` follow the pairs in ascending pair quality. Integer
    weights: a pair of weight ``w`` stands for ``w`` adjacent copies and ``floor(u * W)`` copies are
    dropped (``W = sum(weights)``; equals :func:`_fnmr_from_sorted` on the expanded list). Real
    weights: exactly ``u * W`` of the mass is dropped, the boundary pair keeping the part above it
    (see the module docstring). NaN where nothing remains.
    """
    err = np.asarray(errors_sorted, dtype=np.int64).ravel()
    w = np.asarray(weights_sorted)
    integer = _integer_weights(w)
    w = w.astype(np.int64 if integer else np.float64).ravel()
    if err.shape != w.shape or err.size == 0:
        raise ValueError("need one weight per pair and at least one pair")
    if not integer and np.any(w < 0):
        raise ValueError("weights must be non-negative")
    cw = np.cumsum(w)
    ce = np.cumsum(w * err)
    total_w, total_e = cw[-1], ce[-1]
    u = np.asarray(discard, dtype=np.float64)
    if integer:
        total_w, total_e = int(total_w), int(total_e)
        drop = np.floor(u * total_w + 1e-9).astype(np.int64)  # whole copies
    else:
        drop = u * total_w  # exact mass
    j = np.searchsorted(cw, drop, side="right")  # pairs [0, j) are dropped whole
    prev = np.maximum(j - 1, 0)
    full_w = np.where(j > 0, cw[prev], 0)
    full_e = np.where(j > 0, ce[prev], 0)
    err_j = np.where(j < err.size, err[np.minimum(j, err.size - 1)], 0)  # the pair cut in part
    dropped_e = full_e + (drop - full_w) * err_j
    remaining = total_w - drop
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (total_e - dropped_e) / remaining
    return np.where(remaining > 0, out, np.nan)


def _fnmr_from_sorted(errors_sorted: np.ndarray, discard: np.ndarray) -> np.ndarray:
    """FNMR after dropping the first floor(u n) entries of a quality-ascending error vector
    (:func:`weighted_fnmr` with unit weights)."""
    n = np.asarray(errors_sorted).size
    if n == 0:
        return np.full(np.shape(discard), np.nan)
    return weighted_fnmr(errors_sorted, np.ones(n, dtype=np.int64), discard)


def weighted_threshold(top_scores, top_weights, total_weight, fmr: float) -> float:
    """Threshold for ``fmr`` over a weighted impostor multiset; NaN when unsupported.

    ``top_scores`` (descending) with ``top_weights`` are its highest members (all of them, or
    enough to reach the threshold), ``total_weight`` the weight of the whole multiset. The result
    is the lowest score ``t`` with at most ``fmr * total_weight`` impostor weight above it. Integer
    weights: the ``(floor(fmr * W) + 1)``-th highest score of the expanded multiset. Real weights:
    the first score where the cumulative weight from the top exceeds ``fmr * W`` (equality up to
    1e-12 relative counts as not exceeding). Unsupported when ``floor(fmr * W) < 1``.
    """
    tw = np.asarray(top_weights)
    allowed = math.floor(fmr * total_weight + 1e-9)
    if allowed < 1:
        return math.nan
    if _integer_weights(tw):
        cum = np.cumsum(tw.astype(np.int64))
        j = int(np.searchsorted(cum, allowed + 1))
    else:
        cum = np.cumsum(tw.astype(np.float64))
        limit = fmr * float(total_weight)
        j = int(np.searchsorted(cum, limit * (1 + 1e-12), side="right"))  # first cum > limit
    if j >= cum.size:
        raise RuntimeError("the kept highest impostors do not reach the FMR threshold; keep more of them")
    return float(np.asarray(top_scores)[j])


def weighted_fixed_threshold(impostor_scores, impostor_weights, fmr: float,
                             total_weight=None) -> float:
    """:func:`weighted_threshold` over a complete impostor list (any order); NaN when unsupported."""
    s = np.asarray(impostor_scores, dtype=np.float64).ravel()
    w = np.asarray(impostor_weights).ravel()
    if w.shape != s.shape:
        raise ValueError("need one weight per impostor")
    order = np.argsort(-s, kind="stable")
    total = w.sum() if total_weight is None else total_weight
    return weighted_threshold(s[order], w[order], total, fmr)


@dataclass
class BalancedWeights:
    """Identity-balanced weights: per genuine pair, per listed impostor, and the impostor total."""

    genuine: np.ndarray  # 1 / G_a
    impostor: np.ndarray  # 1 / (n_a n_b) or 1 / I_ab, for the listed impostors
    impostor_total: float  # the number of identity pairs with impostors
    genuine_identities: int  # identities with genuine pairs (the genuine total weight)


def identity_balanced_weights(genuine_identity, impostor_identity_a, impostor_identity_b,
                              images_per_identity=None) -> BalancedWeights:
    """Weights that make every identity's genuine pairs weigh 1 and every identity pair's impostors
    weigh 1 (see the module docstring).

    ``images_per_identity`` (K,): the impostors are *all* cross-identity pairs of those images
    (all-pairs protocol), the listed ones may be only the highest; weight ``1 / (n_a * n_b)`` and
    total ``K' (K' - 1) / 2`` for the ``K'`` identities with images. None: the listed impostors are
    the complete list; weight ``1 / I_ab`` with ``I_ab`` the listed impostors of ``{a, b}``.
    """
    gid = np.asarray(genuine_identity, dtype=np.int64).ravel()
    ia = np.asarray(impostor_identity_a, dtype=np.int64).ravel()
    ib = np.asarray(impostor_identity_b, dtype=np.int64).ravel()
    if ia.shape != ib.shape:
        raise ValueError("one identity pair per impostor is needed")
    if np.any(ia == ib):
        raise ValueError("an impostor pair's two identities must differ")
    g_count = np.bincount(gid) if gid.size else np.zeros(0, np.int64)
    genuine = 1.0 / g_count[gid] if gid.size else np.zeros(0)
    if images_per_identity is not None:
        n_img = np.asarray(images_per_identity, dtype=np.int64)
        if ia.size and max(ia.max(), ib.max()) >= n_img.size:
            raise ValueError("an impostor identity is outside images_per_identity")
        if gid.size and gid.max() >= n_img.size:
            raise ValueError("a genuine identity is outside images_per_identity")
        if np.any(g_count > (n_img[:g_count.size] * (n_img[:g_count.size] - 1)) // 2):
            raise ValueError("more genuine pairs than images_per_identity allows")
        prod = n_img[ia] * n_img[ib]
        if np.any(prod == 0):
            raise ValueError("an impostor identity has no images in images_per_identity")
        impostor = 1.0 / prod
        k_img = int(np.count_nonzero(n_img))
        total = float(k_img * (k_img - 1) // 2)
    else:
        lo, hi = np.minimum(ia, ib), np.maximum(ia, ib)
        k = int(max(lo.max(initial=-1), hi.max(initial=-1)) + 1)
        key = lo * max(k, 1) + hi
        uniq, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
        impostor = 1.0 / cnt[inv]
        total = float(uniq.size)
    return BalancedWeights(genuine, impostor, total, int(np.count_nonzero(g_count)))


@dataclass
class EDCResult:
    fmr: float
    threshold: float
    supported: bool
    num_genuine: int
    num_impostor: int
    discard: np.ndarray
    fnmr: np.ndarray
    # achieved FMR on the impostors kept at each discard step (only when impostor quality is given)
    fmr_remaining: np.ndarray | None = None
    note: str = ""

    def as_dict(self) -> dict:
        d = {
            "fmr": self.fmr,
            "threshold": self.threshold,
            "supported": self.supported,
            "num_genuine": self.num_genuine,
            "num_impostor": self.num_impostor,
            "discard": [round(float(u), 6) for u in self.discard],
            "fnmr": [None if np.isnan(v) else float(v) for v in self.fnmr],
            "note": self.note,
        }
        if self.fmr_remaining is not None:
            d["fmr_remaining"] = [None if np.isnan(v) else float(v) for v in self.fmr_remaining]
        return d


def edc_curve(
    genuine_scores,
    impostor_scores,
    genuine_quality,
    impostor_quality=None,
    fmr: float = 1e-2,
    discard: Sequence[float] | np.ndarray = DEFAULT_DISCARD,
    threshold: float | None = None,
    genuine_weights=None,
    impostor_weights=None,
) -> EDCResult:
    """FNMR after discarding the lowest-quality fraction of genuine pairs, threshold fixed at 0%.

    ``genuine_quality`` (and ``impostor_quality``) are *pair* qualities (use :func:`pair_quality`),
    or an (n, 2) array of the two images' qualities, reduced with min. ``threshold`` may be passed
    to skip re-estimating it (it must be the 0%-discard threshold for ``fmr``). When
    ``impostor_quality`` is given, ``fmr_remaining`` reports the achieved FMR on the impostor pairs
    that survive the same discard fraction (diagnostic only: the threshold never moves).

    ``genuine_weights`` / ``impostor_weights`` (e.g. :func:`identity_balanced_weights`) weigh the
    pairs as in the module docstring: the FNMR and the discarded fraction count weight, and the
    threshold (when not given) is the weighted one over the complete impostor list.
    """
    genuine = np.asarray(genuine_scores, dtype=np.float64).ravel()
    impostor = np.asarray(impostor_scores)
    gq = _as_pair_quality(genuine_quality)
    if gq.shape != genuine.shape:
        raise ValueError(f"genuine_quality has {gq.shape}, scores have {genuine.shape}")
    discard = np.asarray(discard, dtype=np.float64)
    if discard.ndim != 1 or np.any(discard < 0) or np.any(discard >= 1):
        raise ValueError("discard fractions must be in [0, 1)")
    gw = None if genuine_weights is None else np.asarray(genuine_weights).ravel()
    if gw is not None and gw.shape != genuine.shape:
        raise ValueError("genuine_weights does not match genuine_scores")
    iw = None if impostor_weights is None else np.asarray(impostor_weights).ravel()
    if iw is not None and iw.shape != impostor.ravel().shape:
        raise ValueError("impostor_weights does not match impostor_scores")
    if threshold is None:
        if iw is None:
            threshold, supported, _ = fixed_threshold(impostor, fmr)
        else:
            threshold = weighted_fixed_threshold(impostor, iw, fmr)
            supported = not math.isnan(threshold)
    else:
        supported = not math.isnan(threshold)
    n_imp = int(impostor.size)
    if not supported:
        need = math.ceil(1 / fmr)
        note = (f"FMR {fmr:g} unsupported: needs >= {need} impostor pairs, have {n_imp}" if iw is None
                else f"FMR {fmr:g} unsupported: needs >= {need} units of impostor weight (identity pairs)")
        return EDCResult(fmr, math.nan, False, genuine.size, n_imp, discard,
                         np.full(discard.shape, np.nan), note=note)
    order = np.argsort(gq, kind="stable")
    errors = (genuine[order] <= threshold).astype(np.int64)
    fnmr = _fnmr_from_sorted(errors, discard) if gw is None else weighted_fnmr(errors, gw[order], discard)
    fmr_remaining = None
    if impostor_quality is not None:
        iq = _as_pair_quality(impostor_quality)
        if iq.shape != impostor.ravel().shape:
            raise ValueError("impostor_quality does not match impostor_scores")
        io = np.argsort(iq, kind="stable")
        ierr = (np.asarray(impostor, dtype=np.float64).ravel()[io] > threshold).astype(np.int64)
        fmr_remaining = (_fnmr_from_sorted(ierr, discard) if iw is None
                         else weighted_fnmr(ierr, iw[io], discard))
    note = "threshold fixed at 0% discard over all impostors"
    if gw is not None or iw is not None:
        note += "; weighted pairs"
    return EDCResult(fmr, float(threshold), True, genuine.size, n_imp, discard, fnmr, fmr_remaining,
                     note=note)


def _as_pair_quality(q) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.ndim == 2 and q.shape[1] == 2:
        return q.min(axis=1)
    return q.ravel()


def partial_auc(discard, fnmr, upper: float = 0.3, normalise: bool = False) -> float:
    """Trapezoid area under FNMR(discard) for discard in [0, upper].

    Not normalised by default (area, as ``sklearn.metrics.auc``); ``normalise=True`` divides by
    ``upper``. When ``upper`` is not a grid point the curve is linearly interpolated there.
    """
    u = np.asarray(discard, dtype=np.float64)
    f = np.asarray(fnmr, dtype=np.float64)
    if u.shape != f.shape or u.ndim != 1 or u.size < 2:
        raise ValueError("discard and fnmr must be equal-length 1-D arrays (>= 2 points)")
    if np.any(np.diff(u) <= 0):
        raise ValueError("discard must be strictly increasing")
    if upper <= u[0] or upper > u[-1] + 1e-12:
        raise ValueError(f"upper {upper} outside the discard grid [{u[0]}, {u[-1]}]")
    keep = u < upper - 1e-12
    uu = np.concatenate([u[keep], [upper]])
    ff = np.concatenate([f[keep], [np.interp(upper, u, f)]])
    area = float(np.sum((uu[1:] - uu[:-1]) * (ff[1:] + ff[:-1]) / 2))
    return area / (upper - u[0]) if normalise else area


def _bootstrap_thresholds(impostor: np.ndarray, fmr: float, num: int, rng: np.random.Generator) -> np.ndarray:
    """Thresholds for ``fmr`` on ``num`` bootstrap resamples of the impostors (exact, cheap).

    Only the top ``m`` impostors can set the threshold; their resample counts together with one
    "rest" bucket are drawn from the exact multinomial, and the threshold is the score where the
    cumulative count (from the top) first exceeds ``allowed``.
    """
    n = impostor.size
    allowed = math.floor(fmr * n + 1e-9)
    m = min(n, max(4 * allowed + 1000, allowed + 1))
    top = np.sort(np.partition(impostor, n - m)[n - m:])[::-1]
    probs = np.full(m + 1, 1.0 / n)
    probs[-1] = max(0.0, 1.0 - m / n)
    out = np.empty(num)
    for b in range(num):
        counts = rng.multinomial(n, probs / probs.sum())[:m]
        cum = np.cumsum(counts)
        j = int(np.searchsorted(cum, allowed + 1))  # first index with cum >= allowed + 1
        if j >= m:  # extremely unlikely with m >= 4 * allowed
            j = m - 1
        out[b] = top[j]
    return out


@dataclass
class BootstrapResult:
    point: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    num_resamples: int
    seed: int
    level: float
    samples: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def as_dict(self) -> dict:
        return {"point": self.point, "ci_low": self.low, "ci_high": self.high,
                "num_resamples": self.num_resamples, "seed": self.seed, "level": self.level}


def bootstrap_ci(
    genuine_scores,
    impostor_scores,
    genuine_quality,
    fmr: float = 1e-2,
    discard=DEFAULT_DISCARD,
    uppers: Sequence[float] = (0.3, 0.95),
    num_resamples: int = 200,
    seed: int = 0,
    level: float = 0.95,
    resample_impostors: bool = True,
) -> BootstrapResult:
    """Percentile bootstrap intervals for pAUC up to each ``upper`` and for FNMR at 0% discard.

    Each resample draws the genuine pairs with replacement and, when ``resample_impostors``, the
    impostors too (re-estimating the fixed 0%-discard threshold on the resampled impostors). The
    resampling is seeded, so calling it twice, or for several quality measures with the same
    scores, uses the same resamples (paired comparison).
    """
    genuine = np.asarray(genuine_scores, dtype=np.float64).ravel()
    impostor = np.asarray(impostor_scores, dtype=np.float64).ravel()
    gq = _as_pair_quality(genuine_quality)
    discard = np.asarray(discard, dtype=np.float64)
    base = edc_curve(genuine, impostor, gq, fmr=fmr, discard=discard)
    keys = [f"pauc_{u:g}" for u in uppers] + ["fnmr_0"]
    if not base.supported:
        nan = {k: math.nan for k in keys}
        return BootstrapResult(nan, dict(nan), dict(nan), 0, seed, level)
    point = {f"pauc_{u:g}": partial_auc(discard, base.fnmr, u) for u in uppers}
    point["fnmr_0"] = float(base.fnmr[0])
    rng = np.random.default_rng(seed)
    n = genuine.size
    thr = (_bootstrap_thresholds(impostor, fmr, num_resamples, rng) if resample_impostors
           else np.full(num_resamples, base.threshold))
    order = np.argsort(gq, kind="stable")
    g_sorted = genuine[order]
    samples = {k: np.empty(num_resamples) for k in keys}
    for b in range(num_resamples):
        # resampled positions in the quality-ascending order; sorting them keeps that order
        pos = np.sort(rng.integers(0, n, size=n))
        errors = (g_sorted[pos] <= thr[b]).astype(np.int64)
        f = _fnmr_from_sorted(errors, discard)
        for u in uppers:
            samples[f"pauc_{u:g}"][b] = partial_auc(discard, f, u)
        samples["fnmr_0"][b] = f[0]
    alpha = (1 - level) / 2
    low = {k: float(np.quantile(v, alpha)) for k, v in samples.items()}
    high = {k: float(np.quantile(v, 1 - alpha)) for k, v in samples.items()}
    return BootstrapResult(point, low, high, num_resamples, seed, level, samples)
