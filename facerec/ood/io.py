"""Save and load a fitted detector as a plain ``.npz`` (no pickle: loading runs no code).

The file records the contract id of the model whose features it was fitted on; ``load`` refuses
it for any other model, because statistics of another backbone, input normalisation or alignment
describe a different feature space even when the layer sizes happen to agree.

Privacy rule: a stored mean that averages fewer than ``min_identities_per_prototype`` distinct
people (in particular every mean of the class-conditional variant, which is one person's average
feature: a biometric template) is refused unless ``allow_identity_means=True``, for research use
on consenting or public data only.
"""

from __future__ import annotations

import json
import os

import numpy as np

from facerec.contract import EmbeddingContract, require_same_contract
from facerec.ood.combiner import LogisticCombiner
from facerec.ood.mahalanobis import DetectionLayer, LayerGaussian, MahalanobisDetector

FORMAT = "facerec-ood-mahalanobis-v1"


class IdentityMeansError(ValueError):
    """The detector holds per-identity means, which must not be shipped."""


def identity_template_layers(det: MahalanobisDetector) -> list[int]:
    """Layers holding a mean that averages fewer people than the detector's minimum (or one)."""
    minimum = max(det.min_identities_per_prototype, 2)
    return [i for i, g in enumerate(det.layers) if np.any((g.support >= 0) & (g.support < minimum))]


def save(det: MahalanobisDetector, path: str | os.PathLike, allow_identity_means: bool = False) -> None:
    bad = identity_template_layers(det)
    if bad and not allow_identity_means:
        raise IdentityMeansError(
            f"the {det.variant!r} detector has means of fewer than "
            f"{max(det.min_identities_per_prototype, 2)} distinct identities in layers {bad}: they "
            "are biometric templates of real people and must not ship. Use the 'prototypes' or "
            "'global' variant, or pass allow_identity_means=True for research use only."
        )
    if not det.contract_id:
        raise ValueError("the detector has no contract id: set it to the model's contract id")
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "contract_id": np.array(det.contract_id),
        "variant": np.array(det.variant),
        "shrinkage": np.array(det.shrinkage),
        "min_identities_per_prototype": np.array(det.min_identities_per_prototype),
        "epsilon": np.array(det.epsilon),
        "threshold": np.array(np.nan if det.threshold is None else det.threshold),
        "target_tpr": np.array(np.nan if det.target_tpr is None else det.target_tpr),
        "n_layers": np.array(len(det.layers)),
        "meta_json": np.array(json.dumps(det.meta, sort_keys=True, default=str)),
    }
    for i, g in enumerate(det.layers):
        arrays[f"layer{i}_means"] = g.means
        arrays[f"layer{i}_covariance"] = g.covariance
        arrays[f"layer{i}_support"] = g.support
        if g.floor is not None:
            arrays[f"layer{i}_floor"] = g.floor
    if det.detection is not None:
        arrays["detection_detector"] = np.array(det.detection.detector)
        arrays["detection_neutral"] = np.array(det.detection.neutral)
    if det.combiner is not None:
        c = det.combiner
        arrays.update(combiner_mean=c.mean, combiner_std=c.std, combiner_weights=c.weights,
                      combiner_bias=np.array(c.bias))
        if c.ceiling is not None:
            arrays["combiner_ceiling"] = c.ceiling
    with open(path, "wb") as fh:  # a file handle keeps numpy from appending ".npz" to the name
        np.savez(fh, **arrays)


def load(path: str | os.PathLike, expected_contract: str | EmbeddingContract) -> MahalanobisDetector:
    """Load a detector for the model with ``expected_contract``; raises ``ContractMismatchError``
    when the file was fitted on another model."""
    expected = expected_contract.contract_id if isinstance(expected_contract, EmbeddingContract) \
        else str(expected_contract)
    with np.load(path, allow_pickle=False) as z:
        if "format" not in z or str(z["format"]) != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file")
        require_same_contract(expected, str(z["contract_id"]), f"OOD detector statistics {path}")
        layers = [
            LayerGaussian(z[f"layer{i}_means"], z[f"layer{i}_covariance"], z[f"layer{i}_support"],
                          z.get(f"layer{i}_floor", None))
            for i in range(int(z["n_layers"]))
        ]
        detection = None
        if "detection_detector" in z:
            detection = DetectionLayer(str(z["detection_detector"]), float(z["detection_neutral"]))
        n_columns = len(layers) + (detection is not None)
        combiner = None
        if "combiner_weights" in z:
            if len(z["combiner_weights"]) != n_columns:
                raise ValueError(
                    f"{path}: the combiner reads {len(z['combiner_weights'])} columns, the detector "
                    f"has {n_columns}"
                )
            combiner = LogisticCombiner(z["combiner_mean"], z["combiner_std"], z["combiner_weights"],
                                        float(z["combiner_bias"]), z.get("combiner_ceiling"))
        threshold, tpr = float(z["threshold"]), float(z["target_tpr"])
        return MahalanobisDetector(
            layers=layers, variant=str(z["variant"]), contract_id=str(z["contract_id"]),
            shrinkage=float(z["shrinkage"]),
            min_identities_per_prototype=int(z["min_identities_per_prototype"]),
            combiner=combiner,
            threshold=None if np.isnan(threshold) else threshold,
            target_tpr=None if np.isnan(tpr) else tpr,
            epsilon=float(z["epsilon"]), meta=json.loads(str(z["meta_json"])), detection=detection,
        )
