"""Evaluation metrics shared by training (validation) and the final reports."""

from facerec.eval.verification import (
    EqualErrorRate,
    KFoldResult,
    TarAtFar,
    VerificationResult,
    accuracy_by_group,
    best_threshold,
    contiguous_folds,
    cosine_scores,
    equal_error_rate,
    evaluate_pairs,
    kfold_accuracy,
    min_supported_far,
    roc_curve,
    stratified_folds,
    tar_at_far,
    tar_by_group,
)

__all__ = [
    "EqualErrorRate",
    "KFoldResult",
    "TarAtFar",
    "VerificationResult",
    "accuracy_by_group",
    "best_threshold",
    "contiguous_folds",
    "cosine_scores",
    "equal_error_rate",
    "evaluate_pairs",
    "kfold_accuracy",
    "min_supported_far",
    "roc_curve",
    "stratified_folds",
    "tar_at_far",
    "tar_by_group",
]
