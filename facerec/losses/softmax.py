"""Cross-entropy over class logits sharded across ranks, with optional extra negatives.

Each rank holds logits z (N, C_r) of the *global* rows against its own class shard. The loss of
row i is  logaddexp(LSE over all shards of z_i, U) - z_iy,  where U is the log-sum-exp of negatives
shared by every row (UNPG), or -inf for a plain softmax.

Gradient bookkeeping: every rank computes the same loss value from all-reduced pieces and
back-propagates only into its own pieces. The all-reduces therefore pass the gradient through
unchanged (identity backward): the rank's partial sum enters the global sum with coefficient 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from facerec.distributed import get_world_size, is_distributed


class _SumAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def sum_across_ranks(x: Tensor) -> Tensor:
    """Sum over ranks whose backward hands each rank the gradient of the (replicated) result."""
    if not is_distributed() or get_world_size() == 1:
        return x
    return _SumAcrossRanks.apply(x)


def max_across_ranks(x: Tensor) -> Tensor:
    if not is_distributed() or get_world_size() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def replicated_scalar_grad(x: Tensor) -> Tensor:
    """Same value, gradient divided by the world size.

    For a term that *every* rank computes identically from gathered features (UNPG's U): each
    rank back-propagates it, and the gather's backward sums those, so each copy must carry 1/W.
    """
    world = get_world_size() if is_distributed() else 1
    if world == 1:
        return x
    return x / world + (x - x / world).detach()


def sharded_cross_entropy(
    logits: Tensor,
    local_labels: Tensor,
    valid: Tensor,
    extra_logsumexp: Tensor | None = None,
) -> Tensor:
    """Per-row loss (N,) for the sharded logits; rows with ``valid == False`` get 0.

    logits:          (N, C_r) scaled logits of this rank's shard (margin already applied).
    local_labels:    (N,) column of the target in this shard, -1 when it lives elsewhere.
    valid:           (N,) rows that have a target at all (global label >= 0).
    extra_logsumexp: scalar U appended to every row's denominator, or None.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    row_max = max_across_ranks(logits.detach().max(dim=1).values)
    if extra_logsumexp is not None:
        row_max = torch.maximum(row_max, extra_logsumexp.detach().expand_as(row_max))
    # A row max of -inf (empty shard and no extras) would give nan below; 0 is as good a shift.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sum_exp = torch.exp(logits - row_max.unsqueeze(1)).sum(dim=1)
    sum_exp = sum_across_ranks(sum_exp)
    if extra_logsumexp is not None:
        sum_exp = sum_exp + torch.exp(extra_logsumexp - row_max)
    rows = torch.arange(logits.shape[0], device=logits.device)
    here = local_labels >= 0
    target = torch.where(here, logits[rows, local_labels.clamp_min(0)], torch.zeros_like(row_max))
    target = sum_across_ranks(target)
    loss = torch.log(sum_exp) + row_max - target
    return torch.where(valid, loss, torch.zeros_like(loss))
