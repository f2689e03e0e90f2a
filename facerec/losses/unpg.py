"""UNPG: unified negative pair generation (Jung et al. 2022).

Besides the class-centre negatives of the margin softmax, every row's denominator gets the
cosine similarities of all in-batch pairs of *different* identities (each unordered pair once),
after dropping outliers with box-and-whisker fences. The appended negatives are the same for
every row, so their log-sum-exp is one scalar U and the loss is computed exactly as

    loss_i = logaddexp(LSE_j z_ij, U) - z_iy,    U = LSE_k (s * sn_k)

in O(N*C + K) memory, instead of concatenating K (~130k at batch 512) logits to every row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def unpg_negatives(features: Tensor, labels: Tensor, whisker: float = 1.5) -> Tensor:
    """Filtered cosine similarities of all different-label pairs in the batch (1-D, K' long).

    ``features`` (N, D) need not be normalised; gradients flow to both features of every pair.
    Rows with a negative label (ignored rows) enter no pair. Quartiles are taken as the official
    code takes them: the elements at int(0.25*K) and int(0.75*K) of the sorted similarities, no
    interpolation (sort, not torch.quantile, which refuses more than 2**24 elements).
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError("expected features (N, D) and labels (N,)")
    if whisker < 0:
        raise ValueError(f"whisker must be >= 0, got {whisker}")
    normed = torch.nn.functional.normalize(_at_least_fp32(features), dim=1)
    n = normed.shape[0]
    # One (N, N) product, then the upper triangle: O(N^2) memory, never O(K * D).
    similarity = normed @ normed.t()
    upper = torch.ones(n, n, dtype=torch.bool, device=normed.device).triu_(diagonal=1)
    usable = labels >= 0
    pair = upper & (labels[:, None] != labels[None, :]) & usable[:, None] & usable[None, :]
    sim = similarity[pair]
    k = sim.shape[0]
    if k == 0:
        return sim
    with torch.no_grad():
        ordered = torch.sort(sim.detach()).values
        q1 = ordered[int(0.25 * k)]
        q3 = ordered[int(0.75 * k)]
        iqr = q3 - q1
        inside = (sim.detach() >= q1 - whisker * iqr) & (sim.detach() <= q3 + whisker * iqr)
    return sim[inside]


def negatives_logsumexp(negatives: Tensor, s: float) -> Tensor:
    """U = log(sum_k exp(s * sn_k)); -inf when there are no negatives (then UNPG adds nothing)."""
    if negatives.numel() == 0:
        return negatives.new_full((), float("-inf"))
    return torch.logsumexp(s * _at_least_fp32(negatives), dim=0)
