"""Mahalanobis OOD / adversarial-input detector (docs/ood.md).

OOD flags inputs that are not natural face photos (non-faces that got past the face detector,
adversarial perturbations, synthetic corruption); the quality score handles natural but poor
captures of real faces.
"""

from facerec.ood.combiner import (
    LogisticCombiner,
    calibrate_threshold,
    fit_combiner,
    leave_one_family_out,
    select_by_validation,
    select_ceiling_quantile,
)
from facerec.ood.io import IdentityMeansError, load, save
from facerec.ood.mahalanobis import (
    DEFAULT_SHRINKAGE,
    VARIANTS,
    DetectionLayer,
    LayerGaussian,
    MahalanobisDetector,
    MahalanobisFitter,
    extract_features,
    shrink,
)
from facerec.ood.metrics import (
    aupr_in,
    aupr_out,
    auroc,
    detection_accuracy,
    ood_report,
    threshold_at_tpr,
    tnr_at_tpr,
)

__all__ = [
    "DEFAULT_SHRINKAGE",
    "VARIANTS",
    "DetectionLayer",
    "IdentityMeansError",
    "LayerGaussian",
    "LogisticCombiner",
    "MahalanobisDetector",
    "MahalanobisFitter",
    "aupr_in",
    "aupr_out",
    "auroc",
    "calibrate_threshold",
    "detection_accuracy",
    "extract_features",
    "fit_combiner",
    "leave_one_family_out",
    "load",
    "ood_report",
    "save",
    "select_by_validation",
    "select_ceiling_quantile",
    "shrink",
    "threshold_at_tpr",
    "tnr_at_tpr",
]
