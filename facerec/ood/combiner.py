"""Layer-score combiner (L2-regularised logistic regression), threshold calibration and the
leave-one-family-out protocol.

The combiner is fitted with Newton's method in numpy float64: there are only L+1 parameters (one
per feature layer plus a bias), so the Hessian is tiny and Newton converges in a handful of steps,
with no dependency on sklearn. Inference needs only the stored weights, bias and the per-layer
standardisation, so a saved detector runs without any of this fitting code's requirements.

Unlike the original code, which tuned the regression and the pre-processing ε on samples of the
very OOD set it then reported (issues #11, #15 of the reference implementation), everything here is
fitted on validation data, and ``leave_one_family_out`` reports each attack/corruption family with
a combiner that never saw it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from facerec.ood.metrics import (
    auroc,
    ood_report,
    rates_at_threshold,
    threshold_at_tpr,
    tnr_at_tpr,
)


@dataclass
class LogisticCombiner:
    """decision(s) = w · (min(s, ceiling) - mean)/std + b: the log-odds that an input is
    in-distribution. ``ceiling`` (per layer, optional) caps each layer score at a level genuine
    faces reach (a quantile of them), so no layer can vouch for *more* than typical normality:
    an input cannot make up for one glaringly atypical layer with hyper-typical others, which is
    exactly what an adaptive attack does to an uncapped linear combiner."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    ceiling: np.ndarray | None = None

    def decision(self, layer_scores):
        """Works on numpy arrays and on torch tensors (keeps autograd, for adaptive attacks)."""
        if hasattr(layer_scores, "detach"):  # torch, without importing it here
            import torch

            p = [torch.as_tensor(v, dtype=layer_scores.dtype) for v in (self.mean, self.std, self.weights)]
            if self.ceiling is not None:
                cap = torch.as_tensor(self.ceiling, dtype=layer_scores.dtype)
                layer_scores = torch.minimum(layer_scores, cap)
            return ((layer_scores - p[0]) / p[1]) @ p[2] + self.bias
        x = np.asarray(layer_scores, dtype=np.float64)
        if self.ceiling is not None:
            x = np.minimum(x, self.ceiling)
        return ((x - self.mean) / self.std) @ self.weights + self.bias


def fit_combiner(scores_in, scores_out, l2: float = 1e-2, balanced: bool = True, out_groups=None,
                 max_iter: int = 100, ceiling_quantile: float | None = None) -> LogisticCombiner:
    """Fit on (N, L) layer scores of in-distribution (label 1) and OOD (label 0) samples.

    ``ceiling_quantile`` (e.g. 0.5): cap every layer's score at that quantile of the in-distribution
    scores, before standardising and fitting (see ``LogisticCombiner``); None = no cap.

    ``l2`` penalises the weights (not the bias) on standardised scores, so it means the same for
    any layer scale; ``balanced`` weighs both classes equally whatever their counts, so the
    decision does not drift with how many OOD samples happened to be generated. ``out_groups``
    (one group id per OOD sample, e.g. its family) further weighs every group equally inside the
    OOD class, so a family with many variants (three attack strengths) does not drown the others.
    """
    x_in = np.atleast_2d(np.asarray(scores_in, dtype=np.float64))
    x_out = np.atleast_2d(np.asarray(scores_out, dtype=np.float64))
    ceiling = None
    if ceiling_quantile is not None:
        if not 0.0 < ceiling_quantile <= 1.0:
            raise ValueError(f"ceiling_quantile must be in (0, 1], got {ceiling_quantile}")
        ceiling = np.quantile(x_in, ceiling_quantile, axis=0)
        x_in, x_out = np.minimum(x_in, ceiling), np.minimum(x_out, ceiling)
    x = np.concatenate([x_in, x_out])
    y = np.r_[np.ones(len(x_in)), np.zeros(len(x_out))]
    w_out = np.full(len(x_out), 1.0 / len(x_out))
    if out_groups is not None:
        _, inv, counts = np.unique(np.asarray(out_groups), return_inverse=True, return_counts=True)
        w_out = 1.0 / (len(counts) * counts[inv])
    sw = np.r_[np.full(len(x_in), 0.5 / len(x_in)), 0.5 * w_out]
    if not balanced:
        sw = np.full(len(x), 1.0 / len(x))
    # Standardise with the same sample weights, so duplicating a group changes nothing at all.
    mean = sw @ x / sw.sum()
    std = np.sqrt(sw @ (x - mean) ** 2 / sw.sum())
    std = np.where(std > 0, std, 1.0)
    a = np.c_[(x - mean) / std, np.ones(len(x))]
    reg = np.full(a.shape[1], l2)
    reg[-1] = 0.0
    theta = np.zeros(a.shape[1])

    def loss(t: np.ndarray) -> float:
        z = a @ t
        # log(1 + e^{-z}) for y=1 and log(1 + e^{z}) for y=0, overflow-free.
        return float(sw @ np.logaddexp(0.0, np.where(y == 1, -z, z)) + 0.5 * reg @ t**2)

    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (a @ theta)))  # a stable sigmoid
        grad = a.T @ (sw * (p - y)) + reg * theta
        hess = (a.T * (sw * p * (1 - p))) @ a + np.diag(reg) + 1e-12 * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        # Backtracking keeps Newton monotone on separable data, where the bias can run away.
        t, f0 = 1.0, loss(theta)
        while loss(theta - t * step) > f0 - 1e-4 * t * grad @ step and t > 1e-8:
            t *= 0.5
        theta = theta - t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    return LogisticCombiner(mean=mean, std=std, weights=theta[:-1], bias=float(theta[-1]), ceiling=ceiling)


def calibrate_threshold(scores_in, tpr: float = 0.95) -> float:
    """Threshold on the combined score that passes ``tpr`` of the given genuine faces (>= tpr,
    within 1/n): the operating point is set on validation faces, never on test data."""
    return threshold_at_tpr(scores_in, tpr)


def _split_halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    return perm[: n // 2], perm[n // 2 :]


def select_by_validation(
    candidates: Mapping[float, tuple[np.ndarray, np.ndarray]], tpr: float = 0.95, l2: float = 1e-2,
    seed: int = 0, ceiling_quantile: float | None = None,
) -> tuple[float, dict[float, float]]:
    """Pick a hyper-parameter (e.g. the pre-processing ε) from validation data only.

    ``candidates`` maps each value to (in-distribution, OOD[, OOD group ids]) validation layer
    scores (groups as in ``fit_combiner``). Each half of
    the validation set fits a combiner that is scored by TNR@TPR on the other half, and the value
    with the best mean wins (ties go to the smaller value: cheaper, and the paper's default 0).
    """
    results: dict[float, float] = {}
    for value in sorted(candidates):
        s_in, s_out, *groups = (np.asarray(s) for s in candidates[value])
        groups = groups[0] if groups else np.zeros(len(s_out))
        rng = np.random.default_rng(seed)  # the same split for every candidate
        (ia, ib), (oa, ob) = _split_halves(len(s_in), rng), _split_halves(len(s_out), rng)
        tnrs = []
        for (fi, fo), (ti, to) in (((ia, oa), (ib, ob)), ((ib, ob), (ia, oa))):
            comb = fit_combiner(s_in[fi], s_out[fo], l2, out_groups=groups[fo],
                                ceiling_quantile=ceiling_quantile)
            tnrs.append(tnr_at_tpr(comb.decision(s_in[ti]), comb.decision(s_out[to]), tpr))
        results[value] = float(np.mean(tnrs))
    best = max(results, key=lambda v: (results[v], -v))
    return best, results


CEILING_CANDIDATES = (None, 0.5, 0.25, 0.1, 0.05)


def select_ceiling_quantile(
    val_in: np.ndarray, val_families: Mapping[str, np.ndarray], candidates=CEILING_CANDIDATES,
    exclude: str | None = None, l2: float = 1e-2, seed: int = 0,
) -> tuple[float | None, dict]:
    """Choose the combiner's ``ceiling_quantile`` on validation data alone.

    Within the validation split, every family F (but ``exclude``, e.g. the one a report holds out)
    is held out in turn: a combiner is fitted on half of the faces and half of the *other* families'
    samples and scored by AUROC on the other halves of the faces and of F, both ways round. The
    candidate with the best mean AUROC over families wins (ties: the first candidate listed).
    Returns (best, {candidate: mean AUROC}); with fewer than two families left there is nothing to
    hold out, and the first candidate is returned with an empty table."""
    fams = [f for f in val_families if f != exclude and len(val_families[f]) >= 2]
    if len(fams) < 2:
        return candidates[0], {}
    rng = np.random.default_rng(seed)
    face_halves = _split_halves(len(val_in), rng)
    halves = {f: _split_halves(len(val_families[f]), rng) for f in fams}
    table: dict = {}
    for q in candidates:
        aucs = []
        for held in fams:
            for a, b in ((0, 1), (1, 0)):
                others = [f for f in fams if f != held]
                out = np.concatenate([val_families[f][halves[f][a]] for f in others])
                groups = np.concatenate([np.full(len(halves[f][a]), i) for i, f in enumerate(others)])
                comb = fit_combiner(val_in[face_halves[a]], out, l2, out_groups=groups, ceiling_quantile=q)
                aucs.append(auroc(comb.decision(val_in[face_halves[b]]),
                                  comb.decision(val_families[held][halves[held][b]])))
        table[q] = float(np.mean(aucs))
    best = max(candidates, key=lambda q: (table[q], -list(candidates).index(q)))
    return best, table


def leave_one_family_out(
    val_in: np.ndarray,
    val_families: Mapping[str, np.ndarray],
    test_in: np.ndarray,
    test_families: Mapping[str, np.ndarray],
    tpr: float = 0.95,
    l2: float = 1e-2,
    family_of: Mapping[str, str] | None = None,
    fit: Callable = fit_combiner,
    ceiling_candidates=None,
) -> dict[str, dict]:
    """For each test set T of family F: fit the combiner on validation faces vs. validation
    samples of every *other* family, calibrate the threshold on validation faces, report on test
    faces vs. T. ``family_of`` maps a test set to its family when sets are finer than families
    (e.g. "fgsm@4" -> "fgsm": every FGSM strength is held out together). Returns per test set the
    threshold-free metrics (AUROC, TNR@TPR...) on test, and the TPR/TNR of the validation-calibrated
    threshold, which is what a deployment would see. With ``ceiling_candidates``, the combiner's
    ceiling quantile is chosen per held-out family by ``select_ceiling_quantile`` without F."""
    out: dict[str, dict] = {}
    family_of = family_of or {}
    chosen: dict[str, float | None] = {}
    for held in test_families:
        fam = family_of.get(held, held)
        others = [np.asarray(v) for k, v in val_families.items() if k != fam]
        if not others:
            raise ValueError("leave-one-family-out needs at least two families")
        groups = np.concatenate([np.full(len(v), i) for i, v in enumerate(others)])
        kw = {}
        if ceiling_candidates is not None:
            if fam not in chosen:
                chosen[fam] = select_ceiling_quantile(val_in, val_families, ceiling_candidates, exclude=fam,
                                                      l2=l2)[0]
            kw["ceiling_quantile"] = chosen[fam]
        comb = fit(val_in, np.concatenate(others), l2, out_groups=groups, **kw)
        threshold = calibrate_threshold(comb.decision(val_in), tpr)
        s_in, s_out = comb.decision(test_in), comb.decision(test_families[held])
        report = ood_report(s_in, s_out, tpr)
        report["tpr_at_val_threshold"], report["tnr_at_val_threshold"] = rates_at_threshold(
            s_in, s_out, threshold)
        report["weights"] = comb.weights.tolist()
        report["held_out_family"] = fam
        if ceiling_candidates is not None:
            report["ceiling_quantile"] = chosen[fam]
        out[held] = report
    return out
