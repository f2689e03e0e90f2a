"""The training objective: class centres + margin [+ UNPG] [+ quality regression].

    total = CE(margin(cos), labels; + UNPG negatives)  +  quality_weight * SmoothL1(q, CR target)

Every term is a mean over the *global* batch and has the same value on every rank. Each rank's
backward yields exactly its share of the gradient of that global mean: the local embeddings and
quality predictions get the single-process gradients of their rows, and each class shard gets its
slice of the single-process centre gradient. A data-parallel trainer must therefore *sum* (not
average) backbone gradients over ranks to get the single-process update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from facerec.heads import PartialFC, create_margin, margin_is_elastic
from facerec.losses.fiqa import cr_target, quality_regression_loss
from facerec.losses.softmax import (
    replicated_scalar_grad,
    sharded_cross_entropy,
    sum_across_ranks,
)
from facerec.losses.unpg import unpg_logsumexp


@dataclass
class LossOutput:
    total: Tensor
    classification: Tensor
    quality: Tensor | None
    quality_target: Tensor | None  # (B,) CR target of the local rows, detached
    num_negatives: Tensor | int  # UNPG pairs kept (a device tensor: no host sync); 0 when off


class FaceRecognitionLoss(nn.Module):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: str = "arcface",
        margin_kwargs: dict | None = None,
        sample_rate: float = 1.0,
        unpg: bool = False,
        unpg_whisker: float = 1.5,
        quality_weight: float = 10.0,
        quality_beta: float = 0.5,
        seed: int = 0,
    ):
        super().__init__()
        kwargs = dict(margin_kwargs or {})
        if margin_is_elastic(margin):  # ElasticFace draws its margins from the run's seed
            kwargs.setdefault("seed", seed)
        self.centres = PartialFC(num_classes, embedding_size, sample_rate=sample_rate, seed=seed)
        self.margin = create_margin(margin, **kwargs)
        self.unpg = bool(unpg)
        self.unpg_whisker = float(unpg_whisker)
        self.quality_weight = float(quality_weight)
        self.quality_beta = float(quality_beta)
        # Classes whose samples may drive the quality target (None: all). An identity with one
        # image makes the certainty ratio meaningless: its centre is that image's own embedding.
        self.register_buffer("quality_classes", None, persistent=False)

    def set_quality_classes(self, mask: Tensor | None) -> None:
        """``mask`` (num_classes,) bool: which classes' samples enter the quality regression."""
        if mask is not None and mask.shape != (self.centres.num_classes,):
            raise ValueError(f"mask must have one entry per class ({self.centres.num_classes})")
        self.quality_classes = None if mask is None else mask.to(torch.bool)

    def forward(self, embeddings: Tensor, labels: Tensor, quality: Tensor | None = None) -> LossOutput:
        out = self.centres(embeddings, labels)
        valid = out.labels >= 0
        here = out.local_labels >= 0
        rows = torch.arange(out.cosine.shape[0], device=out.cosine.device)
        with torch.no_grad():
            local_target = torch.where(
                here, out.cosine[rows, out.local_labels.clamp_min(0)], torch.zeros_like(rows, dtype=out.cosine.dtype)
            )
            target_cosine = sum_across_ranks(local_target)
            target_cosine = torch.where(valid, target_cosine, torch.full_like(target_cosine, float("nan")))

        logits = self.margin(out.cosine, out.local_labels, target_cosine=target_cosine)
        extra = None
        num_negatives = 0
        if self.unpg:
            extra, num_negatives = unpg_logsumexp(
                out.embeddings, out.labels, self.margin.s, whisker=self.unpg_whisker
            )
            extra = replicated_scalar_grad(extra)
        per_row = sharded_cross_entropy(logits, out.local_labels, valid, extra)
        num_valid = valid.sum().clamp_min(1)
        classification = per_row.sum() / num_valid
        total = classification

        quality_loss = local_quality_target = None
        if quality is not None:
            target = cr_target(out.cosine, out.local_labels, valid=valid,
                               target_cosine=torch.nan_to_num(target_cosine))
            local_quality_target = target[out.local_slice]
            quality_valid = valid
            if self.quality_classes is not None:
                quality_valid = valid & self.quality_classes.to(valid.device)[out.labels.clamp_min(0)]
            quality_loss = quality_regression_loss(
                quality, local_quality_target, valid=quality_valid[out.local_slice],
                beta=self.quality_beta, num_valid_global=quality_valid.sum().clamp_min(1),
            )
            total = total + self.quality_weight * quality_loss
        return LossOutput(total, classification, quality_loss, local_quality_target, num_negatives)
