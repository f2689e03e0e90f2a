"""Class centres: the module that owns the class weights and produces cosine logits.

One implementation covers the full FC and Partial FC (An et al.): the C centres are sharded over
the ranks of the job (model parallel), each rank scores the *global* batch (embeddings gathered
with gradient) against its own shard, and with ``sample_rate < 1`` against a sample of it: every
centre of a class present in the global batch plus random others. With one process and
``sample_rate=1`` it is exactly a full FC layer on normalised weights and embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facerec.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    get_rank,
    get_world_size,
)
from facerec.rng import SeededRNG


def shard_bounds(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the classes owned by ``rank``: as even as possible, lower ranks +1."""
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class CentreOutput:
    """What the class-centre module hands to margins and losses.

    cosine:        (N, C_s) cosines of the N global rows against this rank's (sampled) centres.
    local_labels:  (N,) column of each row's class in ``cosine``, -1 where it is not here.
    labels:        (N,) global class labels of the N rows (as given; -1 = ignore row).
    embeddings:    (N, D) L2-normalised global embeddings (with gradient to the local part).
    local_slice:   the rows of the N that came from this rank.
    """

    cosine: Tensor
    local_labels: Tensor
    labels: Tensor
    embeddings: Tensor
    local_slice: slice


class PartialFC(SeededRNG):
    """Sharded, optionally sampled, class centres (see the module docstring).

    The shard is decided at construction from the process group in force then, so build it after
    ``torch.distributed.init_process_group``. Sampling draws from the module's own generator
    (seeded by ``seed`` and the rank) whose state is saved in the state dict for exact resume.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        sample_rate: float = 1.0,
        seed: int = 0,
        init_std: float = 0.01,
    ):
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError("num_classes and embedding_size must be positive")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.sample_rate = float(sample_rate)
        self.rank, self.world_size = get_rank(), get_world_size()
        self.class_start, self.class_end = shard_bounds(num_classes, self.rank, self.world_size)
        self.num_local = self.class_end - self.class_start
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_size))
        nn.init.normal_(self.weight, std=init_std)
        # Each rank samples its own shard, so its stream is seeded by the rank too.
        self.init_rng(int(seed) * 1000003 + self.rank)
        self.last_sampled: Tensor | None = None  # indices into the shard, for inspection

    def _sample(self, local_labels: Tensor) -> tuple[Tensor | None, Tensor]:
        """Pick the shard's centres to score; return (index or None for all, remapped labels)."""
        num_sample = int(self.sample_rate * self.num_local)
        if self.sample_rate >= 1.0 or num_sample >= self.num_local:
            return None, local_labels
        device = local_labels.device
        positive = torch.zeros(self.num_local, dtype=torch.bool, device=device)
        positive[local_labels[local_labels >= 0]] = True
        # Positives must all be kept, so the sample grows when the batch has more of them.
        num_sample = max(num_sample, int(positive.sum()))
        score = torch.rand(self.num_local, generator=self.generator(device), device=device)
        score = torch.where(positive, torch.full_like(score, 2.0), score)
        index = torch.topk(score, k=num_sample).indices.sort().values
        remapped = torch.searchsorted(index, local_labels.clamp_min(0))
        remapped = torch.where(local_labels >= 0, remapped, torch.full_like(remapped, -1))
        return index, remapped

    def forward(self, embeddings: Tensor, labels: Tensor) -> CentreOutput:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"expected embeddings (B, {self.embedding_size}), got {tuple(embeddings.shape)}"
            )
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the batch")
        labels = labels.long()
        batch = embeddings.shape[0]
        all_embeddings = all_gather_with_grad(embeddings)
        all_labels = all_gather_no_grad(labels)
        in_shard = (all_labels >= self.class_start) & (all_labels < self.class_end)
        local_labels = torch.where(in_shard, all_labels - self.class_start, -1)
        index, local_labels = self._sample(local_labels)
        weight = self.weight if index is None else self.weight[index]
        self.last_sampled = index
        dtype = torch.float64 if all_embeddings.dtype == torch.float64 else torch.float32
        norm_embeddings = F.normalize(all_embeddings.to(dtype), dim=1)
        # The matmul may run in reduced precision under autocast; normalisation stays fp32.
        cosine = F.linear(norm_embeddings, F.normalize(weight.to(dtype), dim=1))
        cosine = cosine.clamp(-1.0, 1.0)
        start = get_rank() * batch
        return CentreOutput(
            cosine=cosine,
            local_labels=local_labels,
            labels=all_labels,
            embeddings=norm_embeddings,
            local_slice=slice(start, start + batch),
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, shard=[{self.class_start}, {self.class_end}), "
            f"embedding_size={self.embedding_size}, sample_rate={self.sample_rate}"
        )
