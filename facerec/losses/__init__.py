"""Losses: UNPG negative pairs, the sharded softmax, the FIQA target and the full objective."""

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
    "FaceRecognitionLoss",
    "LossOutput",
    "cr_target",
    "negatives_logsumexp",
    "quality_regression_loss",
    "sharded_cross_entropy",
    "unpg_logsumexp",
    "unpg_negatives",
    "unpg_pairs",
]
