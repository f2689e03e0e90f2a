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

from facerec.ood.metrics import ood_report, rates_at_threshold, threshold_at_tpr, tnr_at_tpr


@dataclass
class LogisticCombiner:
    """decision(s) = w · (s - mean)/std + b: the log-odds that an input is in-distribution."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float

    def decision(self, layer_scores):
        """Works on numpy arrays and on torch tensors (keeps autograd, for adaptive attacks)."""
        if hasattr(layer_scores, "detach"):  # torch, without importing it here
            import torch

            p = [torch.as_tensor(v, dtype=layer_scores.dtype) for v in (self.mean, self.std, self.weights)]
            return ((layer_scores - p[0]) / p[1]) @ p[2] + self.bias
        x = np.asarray(layer_scores, dtype=np.float64)
        return ((x - self.mean) / self.std) @ self.weights + self.bias


def fit_combiner(scores_in, scores_out, l2: float = 1e-2, balanced: bool = True,
                 out_groups=None, max_iter: int = 100) -> LogisticCombiner:
    """Fit on (N, L) layer scores of in-distribution (label 1) and OOD (label 0) samples.

    ``l2`` penalises the weights (not the bias) on standardised scores, so it means the same for
    any layer scale; ``balanced`` weighs both classes equally whatever their counts, so the
    decision does not drift with how many OOD samples happened to be generated. ``out_groups``
    (one group id per OOD sample, e.g. its family) further weighs every group equally inside the
    OOD class, so a family with many variants (three attack strengths) does not drown the others.
    """
    x_in = np.atleast_2d(np.asarray(scores_in, dtype=np.float64))
    x_out = np.atleast_2d(np.asarray(scores_out, dtype=np.float64))
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
    return LogisticCombiner(mean=mean, std=std, weights=theta[:-1], bias=float(theta[-1]))


def calibrate_threshold(scores_in, tpr: float = 0.95) -> float:
    """Threshold on the combined score that passes ``tpr`` of the given genuine faces (>= tpr,
    within 1/n): the operating point is set on validation faces, never on test data."""
    return threshold_at_tpr(scores_in, tpr)


def _split_halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    return perm[: n // 2], perm[n // 2 :]


def select_by_validation(
    candidates: Mapping[float, tuple[np.ndarray, np.ndarray]], tpr: float = 0.95, l2: float = 1e-2,
    seed: int = 0,
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
            comb = fit_combiner(s_in[fi], s_out[fo], l2, out_groups=groups[fo])
            tnrs.append(tnr_at_tpr(comb.decision(s_in[ti]), comb.decision(s_out[to]), tpr))
        results[value] = float(np.mean(tnrs))
    best = max(results, key=lambda v: (results[v], -v))
    return best, results


def leave_one_family_out(
    val_in: np.ndarray,
    val_families: Mapping[str, np.ndarray],
    test_in: np.ndarray,
    test_families: Mapping[str, np.ndarray],
    tpr: float = 0.95,
    l2: float = 1e-2,
    family_of: Mapping[str, str] | None = None,
    fit: Callable = fit_combiner,
) -> dict[str, dict]:
    """For each test set T of family F: fit the combiner on validation faces vs. validation
    samples of every *other* family, calibrate the threshold on validation faces, report on test
    faces vs. T. ``family_of`` maps a test set to its family when sets are finer than families
    (e.g. "fgsm@4" -> "fgsm": every FGSM strength is held out together). Returns per test set the
    threshold-free metrics (AUROC, TNR@TPR...) on test, and the TPR/TNR of the validation-calibrated
    threshold, which is what a deployment would see."""
    out: dict[str, dict] = {}
    family_of = family_of or {}
    for held in test_families:
        fam = family_of.get(held, held)
        others = [np.asarray(v) for k, v in val_families.items() if k != fam]
        if not others:
            raise ValueError("leave-one-family-out needs at least two families")
        groups = np.concatenate([np.full(len(v), i) for i, v in enumerate(others)])
        comb = fit(val_in, np.concatenate(others), l2, out_groups=groups)
        threshold = calibrate_threshold(comb.decision(val_in), tpr)
        s_in, s_out = comb.decision(test_in), comb.decision(test_families[held])
        report = ood_report(s_in, s_out, tpr)
        report["tpr_at_val_threshold"], report["tnr_at_val_threshold"] = rates_at_threshold(
            s_in, s_out, threshold)
        report["weights"] = comb.weights.tolist()
        report["held_out_family"] = fam
        out[held] = report
    return out
