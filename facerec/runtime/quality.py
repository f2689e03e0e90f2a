"""Quality for a model without a quality head: the measure ``facerec fit-quality`` chose for it.

A model with a ``quality`` output (ViT-FIQA's token) is scored by that output. A model made elsewhere
(``facerec import``: an insightface graph, an arcface_torch backbone) has none. For it,
``facerec fit-quality`` compares on the validation split, by EDC, three measures the service gets for
every face without another model call, and stores the winner in the model folder:

- ``embedding_norm``: the norm of the raw embedding, before L2 normalisation (margin-trained
  networks give smaller norms to harder faces: MagFace's observation, true to a degree of most);
- ``crfiqa_head``: a CR-FIQA-style regressor on the raw embedding (:class:`QualityHead`), fitted on
  pool embeddings to predict each image's certainty ratio computed from the graph's own embeddings
  and identity centres (``facerec.eval.crfiqa_head``);
- ``detector_score``: the face detector's confidence in the face.

The file (``quality.npz``; its name is :mod:`facerec.bundle`'s) holds the method, the head's arrays
when it is the head, the raw measure's percentiles 0..100 on the validation faces (the service's
0-100 score, as ``facerec calibrate`` writes for a quality head) and the contract id of the model it
was fitted on: another model's file is refused. Numpy only; loading runs no pickled code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facerec.contract import require_same_contract

FORMAT = "facerec-quality-fallback-v1"
METHODS = ("embedding_norm", "crfiqa_head", "detector_score")
HEAD_OUTPUT = "quality_head"  # what the service calls a model's own quality output


@dataclass
class QualityHead:
    """A CR-FIQA-style head: standardise -> Linear -> ReLU -> Linear, as numpy arrays (trained by
    ``facerec.eval.crfiqa_head.train_head``)."""

    mean: np.ndarray
    std: np.ndarray
    w1: np.ndarray  # (D, H)
    b1: np.ndarray
    w2: np.ndarray  # (H,)
    b2: float
    info: dict = field(default_factory=dict)

    def predict(self, embeddings) -> np.ndarray:
        x = (np.asarray(embeddings, dtype=np.float64) - self.mean) / self.std
        return np.maximum(x @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        arrays = {"mean": self.mean, "std": self.std, "w1": self.w1, "b1": self.b1, "w2": self.w2,
                  "b2": np.float64(self.b2), "info": np.asarray(json.dumps(self.info))}
        return {prefix + k: v for k, v in arrays.items()}

    @classmethod
    def from_arrays(cls, z, prefix: str = "") -> QualityHead:
        return cls(z[prefix + "mean"], z[prefix + "std"], z[prefix + "w1"], z[prefix + "b1"], z[prefix + "w2"],
                   float(z[prefix + "b2"]), json.loads(str(z[prefix + "info"])))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **self.to_arrays())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualityHead:
        with np.load(path, allow_pickle=False) as z:
            return cls.from_arrays(z)


def measure(method: str, embeddings: np.ndarray, det_scores: np.ndarray, head: QualityHead | None = None) -> np.ndarray:
    """The raw quality of each face by ``method``: from its raw (un-normalised) embedding (N, D) and
    the face detector's confidence (N,)."""
    if method == "embedding_norm":
        return np.linalg.norm(np.asarray(embeddings, dtype=np.float64), axis=1)
    if method == "crfiqa_head":
        if head is None:
            raise ValueError("the crfiqa_head method needs its head")
        return head.predict(embeddings)
    if method == "detector_score":
        return np.asarray(det_scores, dtype=np.float64).reshape(-1)
    raise ValueError(f"unknown quality method {method!r}; one of {', '.join(METHODS)}")


@dataclass
class QualityFallback:
    """The chosen measure of one model; call it with (raw embeddings, detector scores)."""

    method: str
    contract_id: str
    percentiles: np.ndarray  # raw measure at percentiles 0..100 of the validation faces
    calibrated_on: str
    head: QualityHead | None = None
    meta: dict = field(default_factory=dict)  # how it was chosen (the EDC table), for /v1/models and people

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quality method {self.method!r}; one of {', '.join(METHODS)}")
        if self.method == "crfiqa_head" and self.head is None:
            raise ValueError("the crfiqa_head method needs its head")
        p = np.asarray(self.percentiles, dtype=np.float64)
        if p.ndim != 1 or len(p) < 2 or np.any(np.diff(p) < 0):
            raise ValueError("quality percentiles must be a non-decreasing list of raw values")
        self.percentiles = p

    def __call__(self, embeddings: np.ndarray, det_scores: np.ndarray) -> np.ndarray:
        return measure(self.method, embeddings, det_scores, self.head)

    def save(self, path: str | os.PathLike) -> Path:
        if not self.contract_id:
            raise ValueError("the quality measure has no contract id: set it to the model's")
        arrays = {"format": np.asarray(FORMAT), "method": np.asarray(self.method),
                  "contract_id": np.asarray(self.contract_id), "percentiles": self.percentiles,
                  "calibrated_on": np.asarray(self.calibrated_on),
                  "meta_json": np.asarray(json.dumps(self.meta, sort_keys=True))}
        if self.head is not None:
            arrays.update(self.head.to_arrays("head_"))
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:  # a file handle keeps numpy from appending ".npz" to the name
            np.savez(fh, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expected_contract_id: str) -> QualityFallback:
        """The measure for the model of ``expected_contract_id``; ``ContractMismatchError`` when the
        file was fitted on another model."""
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z or str(z["format"]) != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} file")
            require_same_contract(expected_contract_id, str(z["contract_id"]), f"quality measure {path}")
            head = QualityHead.from_arrays(z, "head_") if "head_w1" in z else None
            return cls(str(z["method"]), str(z["contract_id"]), z["percentiles"], str(z["calibrated_on"]),
                       head, json.loads(str(z["meta_json"])))
