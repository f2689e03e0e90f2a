"""The ViT-FIQA / CR-FIQA quality target and its regression loss.

target = CCS / (NNCCS + 1 + 1e-9): the certainty ratio of CR-FIQA, with CCS the cosine to the
sample's own class centre and NNCCS the largest cosine to any *other* centre, both taken on
un-margined cosines over all classes and detached. The +1 keeps the denominator positive (NNCCS
is in [-1, 1]); the CR-FIQA code omits it. With class centres sharded over ranks the max over
the other classes is an all-reduce MAX over the shards (the official ViT-FIQA code takes it over
its own shard only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facerec.distributed import all_reduce
from facerec.losses.softmax import max_across_ranks

CR_EPS = 1e-9


@torch.no_grad()
def cr_target(
    cosine: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    target_cosine: Tensor | None = None,
) -> Tensor:
    """Certainty ratio per row (N,), detached; 0 for rows that have no target.

    cosine:        (N, C) un-margined cosines (this rank's shard under Partial FC).
    labels:        (N,) target column in ``cosine``; -1 where the target is not in this block.
    valid:         rows with a target anywhere (defaults to labels >= 0: the single-process case).
    target_cosine: the target cosine of every row when it lives on another shard (defaults to
                   reading it from ``cosine``).
    """
    here = labels >= 0
    valid = here if valid is None else valid
    rows = torch.arange(cosine.shape[0], device=cosine.device)
    safe = labels.clamp_min(0)
    if target_cosine is None:
        target_cosine = torch.where(here, cosine[rows, safe], torch.zeros_like(cosine[:, 0]))
    others = cosine.clone()
    # Mask only the row's own target column; a row whose target is elsewhere keeps every column.
    others[rows, safe] = torch.where(here, torch.full_like(target_cosine, -torch.inf),
                                     others[rows, safe])
    nnccs = max_across_ranks(others.max(dim=1).values)
    ratio = target_cosine.to(nnccs.dtype) / (nnccs + 1.0 + CR_EPS)
    return torch.where(valid, ratio, torch.zeros_like(ratio))


def quality_regression_loss(
    predicted: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    beta: float = 0.5,
    num_valid_global: Tensor | None = None,
) -> Tensor:
    """SmoothL1(beta) between predicted quality and the CR target, averaged over valid rows.

    Under data parallelism pass ``num_valid_global`` (the valid rows of the whole job): each rank
    then returns its share of the global mean as gradient, with the global mean as value.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"quality {tuple(predicted.shape)} vs target {tuple(target.shape)}")
    valid = torch.ones_like(target, dtype=torch.bool) if valid is None else valid
    if predicted.dtype in (torch.float16, torch.bfloat16):
        predicted = predicted.float()
    per_row = F.smooth_l1_loss(predicted, target.detach().to(predicted.dtype), beta=beta,
                               reduction="none")
    local_sum = torch.where(valid, per_row, torch.zeros_like(per_row)).sum()
    if num_valid_global is None:
        return local_sum / valid.sum().clamp_min(1)
    share = local_sum / num_valid_global.clamp_min(1)
    total = all_reduce(share.detach(), op="sum")
    return share + (total - share.detach())
