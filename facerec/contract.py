"""The embedding contract: what an embedding means, and an id for it.

Every exported model carries its contract; OOD statistics, calibrated thresholds and galleries
record the contract id they were made with, and nothing combines artifacts whose ids differ (an
embedding from another model, input normalisation or alignment is not comparable, even when it
has the same size).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Identifies the 5-point ArcFace template for 112x112 crops (shared/reference/methods.md §6.3).
ARCFACE_TEMPLATE_112 = "arcface-5pt-112-v1"
# dlib's 150 x 150 face chip (padding 0.25) located by the same 5 points (facerec.data.align).
DLIB_CHIP_150 = "dlib-chip-5pt-150-v1"
# A 192 x 192 canvas on that chip's geometry, holding the chip (an exact 150 x 150 window) and the
# whole 112 ArcFace crop (facerec.data.align.CANVASES): a graph that runs a network of each alignment.
DLIB_CHIP_CANVAS_192 = "dlib-chip-5pt-150-canvas-192-v1"


def training_alignment(config: dict | None) -> str:
    """The alignment a model was trained on, from its resolved training config (a plain dict of
    the stored config.yaml; ``facerec/`` does not import ``training/``): a ``data.center_crop``
    means centre crops of unaligned photos (``center-crop-<N>``: the central N x N pixels, resized
    to the input size), which the ArcFace-template pipeline does not produce; otherwise, or with
    no config, the ArcFace template."""
    crop = ((config or {}).get("data") or {}).get("center_crop")
    return f"center-crop-{int(crop)}" if crop else ARCFACE_TEMPLATE_112


class ContractMismatchError(ValueError):
    """Two artifacts were made for different embedding contracts."""


@dataclass(frozen=True)
class EmbeddingContract:
    model_name: str
    model_version: str
    embedding_size: int
    input_size: int = 112
    colour_order: str = "RGB"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    alignment: str = ARCFACE_TEMPLATE_112
    similarity: str = "cosine"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def identity(self) -> dict:
        """The fields that define the contract (``extra`` is informative only)."""
        data = asdict(self)
        data.pop("extra")
        data["mean"] = [float(v) for v in self.mean]
        data["std"] = [float(v) for v in self.std]
        return data

    @property
    def contract_id(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        data = self.identity()
        data["extra"] = self.extra
        data["contract_id"] = self.contract_id
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EmbeddingContract:
        data = json.loads(text)
        stated = data.pop("contract_id", None)
        data["mean"] = tuple(data["mean"])
        data["std"] = tuple(data["std"])
        contract = cls(**data)
        if stated is not None and stated != contract.contract_id:
            raise ContractMismatchError(
                f"contract id {stated} does not match its fields ({contract.contract_id}): "
                "the metadata was edited or corrupted"
            )
        return contract


def require_same_contract(expected: str, found: str, what: str) -> None:
    """Refuse to combine ``what`` (made for ``found``) with a model of contract ``expected``."""
    if expected != found:
        raise ContractMismatchError(
            f"{what} was made for embedding contract {found}, but the model in use has contract "
            f"{expected}; rebuild it with this model"
        )
