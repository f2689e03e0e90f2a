"""UNPG: unified negative pair generation (Jung et al. 2022).

Besides the class-centre negatives of the margin softmax, every row's denominator gets the
cosine similarities of all in-batch pairs of *different* identities (each unordered pair once),
after dropping outliers with box-and-whisker fences. The appended negatives are the same for
every row, so their log-sum-exp is one scalar U and the loss is computed exactly as

    loss_i = logaddexp(LSE_j z_ij, U) - z_iy,    U = LSE_k (s * sn_k)

in O(N*C + N^2) memory, instead of concatenating K (~130k at batch 512) logits to every row.
The training path (``unpg_logsumexp``) works on the masked (N, N) similarity matrix with the
quartile positions as device tensors, so it never waits on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def unpg_pairs(features: Tensor, labels: Tensor, whisker: float = 1.5) -> tuple[Tensor, Tensor]:
    """(similarity (N, N), keep (N, N) bool): the kept negative pairs, upper triangle only.

    A pair is a candidate when i < j, both labels are >= 0 (rows with a negative label are
    ignored rows) and the labels differ. Candidates are kept inside the fences
    [Q1 - w*IQR, Q3 + w*IQR], with Q1, Q3 the elements at int(0.25*K) and int(0.75*K) of the K
    sorted candidate similarities, as the official code takes them (no interpolation; sort, not
    torch.quantile, which refuses more than 2**24 elements).
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError("expected features (N, D) and labels (N,)")
    if whisker < 0:
        raise ValueError(f"whisker must be >= 0, got {whisker}")
    normed = torch.nn.functional.normalize(_at_least_fp32(features), dim=1)
    n = normed.shape[0]
    similarity = normed @ normed.t()
    usable = labels >= 0
    candidate = torch.ones(n, n, dtype=torch.bool, device=normed.device).triu_(diagonal=1)
    candidate &= (labels[:, None] != labels[None, :]) & usable[:, None] & usable[None, :]
    with torch.no_grad():
        values = torch.where(candidate, similarity.detach(), torch.full_like(similarity, torch.inf))
        ordered = torch.sort(values.flatten()).values  # candidates first, +inf padding last
        count = candidate.sum()
        q1 = ordered[(count * 0.25).long().clamp(max=ordered.numel() - 1)]
        q3 = ordered[(count * 0.75).long().clamp(max=ordered.numel() - 1)]
        iqr = q3 - q1
        inside = (similarity.detach() >= q1 - whisker * iqr) & (similarity.detach() <= q3 + whisker * iqr)
        keep = candidate & inside
    return similarity, keep


def unpg_negatives(features: Tensor, labels: Tensor, whisker: float = 1.5) -> Tensor:
    """The kept negative-pair similarities as a 1-D tensor (K' long); gradients reach both
    features of every pair. For inspection and tests; training uses ``unpg_logsumexp``."""
    similarity, keep = unpg_pairs(features, labels, whisker)
    return similarity[keep]


def unpg_logsumexp(
    features: Tensor, labels: Tensor, s: float, whisker: float = 1.5
) -> tuple[Tensor, Tensor]:
    """(U, K'): U = log(sum over kept pairs of exp(s * sim)), -inf when none is kept."""
    similarity, keep = unpg_pairs(features, labels, whisker)
    scaled = torch.where(keep, s * similarity, torch.full_like(similarity, -torch.inf))
    return torch.logsumexp(scaled.flatten(), dim=0), keep.sum()


def negatives_logsumexp(negatives: Tensor, s: float) -> Tensor:
    """U = log(sum_k exp(s * sn_k)) of explicit negatives; -inf when there are none."""
    if negatives.numel() == 0:
        return negatives.new_full((), float("-inf"))
    return torch.logsumexp(s * _at_least_fp32(negatives), dim=0)
