"""Small helpers over torch.distributed that also work when it is not initialised.

Rank and world size are read when asked, never at import time, so the same code runs under
torchrun, SLURM, a test's own process group, or in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient slice back to its owner.

    Each rank computes a loss on the gathered tensor; the true gradient of the *sum* of all
    ranks' losses with respect to the local part is the sum over ranks of their gradients for
    that slice, hence the all_reduce in backward. (DDP then averages parameter gradients over
    ranks, so the local loss should be scaled as the trainer scales any per-rank loss.)
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.size
        return grad[start : start + ctx.size]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks along dim 0, keeping gradients."""
    if not is_distributed() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` over ranks along dim 0 without gradients (labels, indices)."""
    if not is_distributed() or get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    """All-reduce in place-free style: returns the reduced tensor (``x`` itself off DDP)."""
    if not is_distributed() or get_world_size() == 1:
        return x
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    out = x.detach().clone()
    dist.all_reduce(out, op=ops[op])
    return out
