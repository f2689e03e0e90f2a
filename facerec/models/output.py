"""The one output type every backbone returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class FaceOutput:
    """What a face model produces for a batch.

    embedding: (B, D), *not* normalised: the norm carries information (MagFace-style quality),
        and callers normalise when they compare.
    quality:   (B,) predicted utility from a quality head, or None for models without one.
    features:  list of (B, C_k) pooled intermediate features for the OOD detector, present only
        when the forward was called with ``return_features=True``.
    """

    embedding: Tensor
    quality: Tensor | None = None
    features: list[Tensor] | None = None
