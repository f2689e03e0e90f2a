"""How spread out embeddings are: the numbers that reveal feature collapse.

Two views of the same failure. ``spread`` summarises a set of embeddings without labels (mean
cosine between different images, how many principal directions hold the variance). ``pair_collapse``
uses labels: among pairs of *different* identities, the mean cosine and the fraction above a high
cosine. A healthy face embedding keeps impostor pairs near orthogonal; a margin softmax that fell
into the collapse basin (docs/method_comparison.md, "Why ArcFace rows collapse") maps whole groups
of classes onto one direction, and that fraction jumps from ~0 to tens of percent.
"""

from __future__ import annotations

import torch
from torch import Tensor

COLLAPSE_COSINE = 0.9


def spread(embeddings: Tensor) -> dict:
    """Label-free spread of (N, D) embeddings (N >= 2), computed in float64."""
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError("expected embeddings (N, D) with N >= 2")
    e = embeddings.detach().double()
    n = torch.nn.functional.normalize(e, dim=1)
    cos = n @ n.T
    off = cos[~torch.eye(len(cos), dtype=torch.bool, device=cos.device)]
    energy = torch.linalg.svdvals(n - n.mean(0)).pow(2)
    dims90 = int((energy.cumsum(0) / energy.sum() < 0.9).sum()) + 1
    return {
        "images": len(e),
        "mean_pairwise_cosine": float(off.mean()),
        "mean_direction_length": float(n.mean(0).norm()),
        "mean_embedding_norm": float(e.norm(dim=1).mean()),
        "dims_for_90pct_variance": dims90,
    }


def pair_collapse(embeddings: Tensor, labels: Tensor, threshold: float = COLLAPSE_COSINE) -> Tensor:
    """(mean cosine, fraction with cosine > threshold) over the pairs i < j of different labels
    (rows with a negative label are ignored), as a float32 tensor of 2 on the embeddings' device,
    so a training loop can accumulate it without a host sync. NaN, NaN when there is no such pair.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError("expected embeddings (N, D) and labels (N,)")
    n = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    cos = n @ n.T
    usable = labels >= 0
    pairs = torch.ones_like(cos, dtype=torch.bool).triu_(diagonal=1)
    pairs &= (labels[:, None] != labels[None, :]) & usable[:, None] & usable[None, :]
    count = pairs.sum().float()
    mean = torch.where(pairs, cos, 0.0).sum() / count
    high = (pairs & (cos > threshold)).sum().float() / count
    return torch.stack([mean, high])
