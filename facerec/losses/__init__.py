"""Losses: UNPG negative pairs, the sharded softmax, the FIQA target, the full objective and
distillation from a teacher."""

from facerec.losses.distill import (
    EmbeddingDistillLoss,
    RelationalDistillLoss,
    embedding_distill_loss,
    relational_distill_loss,
)
from facerec.losses.face_loss import FaceRecognitionLoss, LossOutput
from facerec.losses.fiqa import cr_target, quality_regression_loss
from facerec.losses.softmax import sharded_cross_entropy
from facerec.losses.unpg import (
    negatives_logsumexp,
    unpg_logsumexp,
    unpg_negatives,
    unpg_pairs,
)

__all__ = [
    "EmbeddingDistillLoss",
    "FaceRecognitionLoss",
    "LossOutput",
    "RelationalDistillLoss",
    "cr_target",
    "embedding_distill_loss",
    "negatives_logsumexp",
    "quality_regression_loss",
    "relational_distill_loss",
    "sharded_cross_entropy",
    "unpg_logsumexp",
    "unpg_negatives",
    "unpg_pairs",
]
