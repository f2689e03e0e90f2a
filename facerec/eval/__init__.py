"""Evaluation metrics shared by training (validation) and the final reports."""

from facerec.eval.verification import (
    KFoldResult,
    TarAtFar,
    VerificationResult,
    best_threshold,
    contiguous_folds,
    cosine_scores,
    evaluate_pairs,
    kfold_accuracy,
    min_supported_far,
    roc_curve,
    tar_at_far,
)

__all__ = [
    "KFoldResult",
    "TarAtFar",
    "VerificationResult",
    "best_threshold",
    "contiguous_folds",
    "cosine_scores",
    "evaluate_pairs",
    "kfold_accuracy",
    "min_supported_far",
    "roc_curve",
    "tar_at_far",
]
