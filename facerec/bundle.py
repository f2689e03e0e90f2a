"""The model folder: what its files are called, what its graph's metadata holds, and the one
reader and writer of both.

A ``facerec export`` folder holds::

    <stem>.onnx              fp32 graph; its metadata carries the contract, the calibration and
                             the training config (keys prefixed ``facerec.``)
    <stem>.fp16.onnx         fp16 graph (same metadata, no calibration)
    <stem>.insightface.onnx  the embedding alone, for insightface's ``model_zoo.get_model`` (it takes a
                             graph of 5 or more outputs for a face detector); never served by facerec
    <stem>.pt                torch artefact (facerec.export.torch_artifact)
    contract.json            the embedding contract, readable without onnxruntime
    export_report.json       parity numbers and timings of the export
    training_config.yaml     the resolved training config of the checkpoint (when it had one)
    ood.npz, ood_report.*    the OOD detector (``facerec fit-ood``)
    quality.npz              the quality measure of a model without a quality output, chosen on
                             validation (``facerec fit-quality``; facerec.runtime.quality)
    quality_report.json      how it was chosen: every candidate's EDC on the validation split
    openset.json             the open-set calibration (``facerec calibrate-openset``)
    manifest.json            a release's file hashes (written by hand for shipped models)

While an export runs, a graph is written as ``<stem>.partial.onnx`` and, if it fails its parity
check, may be kept as ``<stem>.parity-failed.onnx``: neither is ever taken for a model.

Calibration lives in the fp32 graph's metadata, beside the contract it belongs to:
``verification_threshold``, ``verification_far``, ``verification_calibrated_on``;
``quality_percentiles`` (JSON list of the raw quality at percentiles 0, 1, ..., 100 of the
calibration faces) and ``quality_calibrated_on``. :class:`Calibration` is its typed form.

Everything here takes plain values (a path, a backend name, a precision); nothing imports torch,
and onnx / onnxruntime only inside the functions that read or write a graph.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from facerec.contract import ContractMismatchError, EmbeddingContract

METADATA_PREFIX = "facerec."  # every key this project writes into a graph's metadata_props

CONTRACT_FILE = "contract.json"
EXPORT_REPORT_FILE = "export_report.json"
TRAINING_CONFIG_FILE = "training_config.yaml"
OOD_FILE = "ood.npz"
OOD_REPORT_FILES = ("ood_report.json", "ood_report.md")
OPENSET_FILE = "openset.json"
QUALITY_FILE = "quality.npz"
QUALITY_REPORT_FILE = "quality_report.json"
MANIFEST_FILE = "manifest.json"

FP16_SUFFIX = ".fp16.onnx"
PARTIAL_SUFFIX = ".partial.onnx"
PARITY_FAILED_SUFFIX = ".parity-failed.onnx"
INTEROP_SUFFIX = ".insightface.onnx"
NOT_FP32 = (FP16_SUFFIX, INTEROP_SUFFIX, PARTIAL_SUFFIX, PARITY_FAILED_SUFFIX)
TORCH_SUFFIXES = (".pt", ".pth")

TRAINING_CONFIG_KEY = "training_config"


class BundleError(ValueError):
    """A model folder does not hold what was asked for (no graph, several, a wrong file)."""


# ----------------------------------------------------------------------------------- file names
def graph_name(stem: str, precision: str = "fp32") -> str:
    return f"{stem}{FP16_SUFFIX}" if precision == "fp16" else f"{stem}.onnx"


def interop_graph_name(stem: str) -> str:
    """The single-output embedding graph insightface loads (:mod:`facerec.export.interop`)."""
    return f"{stem}{INTEROP_SUFFIX}"


def torch_artifact_name(stem: str) -> str:
    return f"{stem}.pt"


def partial_path(path: Path) -> Path:
    """Where a graph is written before its parity check."""
    return path.with_name(path.stem + PARTIAL_SUFFIX)


def parity_failed_path(path: Path) -> Path:
    """Where a graph that failed its parity check is kept (``keep_failed``)."""
    return path.with_name(path.stem + PARITY_FAILED_SUFFIX)


def is_fp32_graph(path: Path) -> bool:
    return path.suffix == ".onnx" and not path.name.endswith(NOT_FP32)


def graphs(folder: Path, precision: str = "fp32") -> list[Path]:
    """The folder's graphs of one precision, sorted (never partial or parity-failed ones)."""
    if precision == "fp16":
        return sorted(folder.glob(f"*{FP16_SUFFIX}"))
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'fp16', not {precision!r}")
    return sorted(p for p in folder.glob("*.onnx") if is_fp32_graph(p))


def _single(found: list[Path], what: str, folder: Path) -> Path:
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise BundleError(f"{folder}: expected one {what}, found {names}; point to the file itself")
    return found[0]


def find_graph(source: str | Path, precision: str = "fp32") -> Path:
    """``source`` if it is an .onnx file, else the export folder's one graph of ``precision``."""
    source = Path(source)
    if source.is_file():
        if source.suffix != ".onnx":
            raise BundleError(f"{source}: not an .onnx graph")
        return source
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist (give a `facerec export` folder or an .onnx file)")
    return _single(graphs(source, precision), f"{precision} ONNX graph", source)


# ------------------------------------------------------------------------------------- metadata
def read_metadata(path: str | Path) -> dict[str, str]:
    """All ``metadata_props`` of a graph (through onnxruntime, so serving needs no ``onnx``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def write_metadata(path: Path, entries: dict[str, str], doc: str | None = None) -> None:
    """Set ``entries`` (full keys) in the graph's metadata_props, atomically (the exporter's writer)."""
    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    if doc is not None:
        proto.doc_string = doc
    tmp = path.with_name(path.name + ".meta.tmp")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)


def prefixed(entries: dict) -> dict[str, str]:
    return {(k if k.startswith(METADATA_PREFIX) else METADATA_PREFIX + k): str(v) for k, v in entries.items()}


def update_metadata(path: str | Path, entries: dict) -> None:
    """Add or replace ``facerec.<key>`` entries (e.g. a calibrated threshold) in place, atomically.

    The contract keys cannot be changed this way: a different contract is a different model.
    """
    entries = prefixed(entries)
    if {METADATA_PREFIX + "contract", METADATA_PREFIX + "contract_id"} & set(entries):
        raise ValueError("the embedding contract of an exported model cannot be edited; re-export it")
    write_metadata(Path(path), entries)


def contract_from_metadata(meta: dict[str, str]) -> EmbeddingContract:
    """The embedding contract stored in a graph's metadata; refuses graphs that carry none."""
    if METADATA_PREFIX + "contract" not in meta:
        raise ValueError(
            "the model carries no facerec embedding contract (metadata key 'facerec.contract'); "
            "export it with `facerec export`"
        )
    return EmbeddingContract.from_json(meta[METADATA_PREFIX + "contract"])


def feature_kinds(meta: dict[str, str]) -> list[str]:
    """What each ``feature_k`` output is (``tokens``, ``pixel_stats``, ...); [] when not recorded."""
    return json.loads(meta.get(METADATA_PREFIX + "feature_kinds", "[]"))


def ood_layer_outputs(output_names) -> list[str]:
    """The graph outputs an OOD detector reads, in layer order: the ``feature_k`` outputs by index
    or, for a graph without any (an imported model exposes its embedding alone), the embedding."""
    features = sorted((n for n in output_names if n.startswith("feature_")), key=lambda n: int(n.split("_")[1]))
    return features or ["embedding"]


def _float(meta: dict[str, str], key: str) -> float | None:
    value = meta.get(METADATA_PREFIX + key)
    return None if value in (None, "", "null", "None") else float(value)


# ---------------------------------------------------------------------------------- calibration
# The metadata keys (unprefixed) that hold a calibration; they belong to the fp32 graph alone.
CALIBRATION_KEYS = ("verification_threshold", "verification_far", "verification_calibrated_on",
                    "quality_percentiles", "quality_calibrated_on")


@dataclass
class Calibration:
    """The verification operating point and the raw-quality -> 0-100 mapping of a model."""

    threshold: float | None = None
    far: float | None = None
    calibrated_on: str | None = None
    source: str | None = None  # "model" when the threshold comes from the graph (a service may override it)
    quality_percentiles: np.ndarray | None = None
    quality_calibrated_on: str | None = None

    def quality_score(self, raw: float) -> float | None:
        """Percentile (0-100) of ``raw`` among the calibration faces, by linear interpolation."""
        p = self.quality_percentiles
        if p is None:
            return None
        return float(np.interp(raw, p, np.linspace(0.0, 100.0, len(p))))

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Calibration:
        cal = cls(threshold=_float(meta, "verification_threshold"))
        if cal.threshold is not None:
            cal.far = _float(meta, "verification_far")
            cal.calibrated_on = meta.get(METADATA_PREFIX + "verification_calibrated_on")
            cal.source = "model"
        percentiles = meta.get(METADATA_PREFIX + "quality_percentiles")
        if percentiles:
            p = np.asarray(json.loads(percentiles), dtype=np.float64)
            if p.ndim != 1 or len(p) < 2 or np.any(np.diff(p) < 0):
                raise ValueError("facerec.quality_percentiles must be a non-decreasing list of raw qualities")
            cal.quality_percentiles = p
            cal.quality_calibrated_on = meta.get(METADATA_PREFIX + "quality_calibrated_on")
        return cal

    def to_metadata(self) -> dict[str, str]:
        """The metadata entries (unprefixed keys) of the fields that are set."""
        keys = {"threshold": "verification_threshold", "far": "verification_far",
                "calibrated_on": "verification_calibrated_on"}
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "source":
                continue
            if f.name == "quality_percentiles":
                value = json.dumps([float(v) for v in value])
            out[keys.get(f.name, f.name)] = str(value)
        return out


# ----------------------------------------------------------------------------------- the folder
class ModelBundle:
    """A model folder, opened from the folder or from one of its files (a graph or an artefact)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self._metadata: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"ModelBundle({str(self.path)!r})"

    contract_path = property(lambda self: self.folder / CONTRACT_FILE)
    export_report_path = property(lambda self: self.folder / EXPORT_REPORT_FILE)
    training_config_path = property(lambda self: self.folder / TRAINING_CONFIG_FILE)
    ood_path = property(lambda self: self.folder / OOD_FILE)
    ood_report_paths = property(lambda self: tuple(self.folder / n for n in OOD_REPORT_FILES))
    openset_path = property(lambda self: self.folder / OPENSET_FILE)
    quality_path = property(lambda self: self.folder / QUALITY_FILE)
    quality_report_path = property(lambda self: self.folder / QUALITY_REPORT_FILE)
    manifest_path = property(lambda self: self.folder / MANIFEST_FILE)

    def graph(self, precision: str = "fp32") -> Path:
        """The graph of ``precision``: the file itself when the bundle was opened from a graph."""
        if self.path.is_file() and self.path.suffix == ".onnx":
            return self.path
        return find_graph(self.folder, precision)

    @property
    def fp32_graph(self) -> Path | None:
        """The graph that holds the calibration, or None when there is no single one."""
        if self.path.is_file() and is_fp32_graph(self.path):
            return self.path
        found = graphs(self.folder)
        return found[0] if len(found) == 1 else None

    @property
    def interop_graph(self) -> Path | None:
        """The folder's insightface graph, or None when it has none."""
        found = sorted(self.folder.glob(f"*{INTEROP_SUFFIX}"))
        return found[0] if len(found) == 1 else None

    def metadata(self) -> dict[str, str]:
        """The fp32 graph's metadata ({} without one); read once."""
        if self._metadata is None:
            graph = self.fp32_graph
            self._metadata = read_metadata(graph) if graph is not None else {}
        return self._metadata

    def contract(self) -> EmbeddingContract:
        """From contract.json when present (no onnxruntime needed), else from the graph."""
        if self.contract_path.is_file():
            return EmbeddingContract.from_json(self.contract_path.read_text())
        return contract_from_metadata(self.metadata())

    def calibration(self, contract_id: str | None = None) -> Calibration:
        """The fp32 graph's calibration; with ``contract_id``, refused if made for another model."""
        meta = self.metadata()
        found = meta.get(METADATA_PREFIX + "contract_id")
        if meta and contract_id is not None and found != contract_id:
            raise ContractMismatchError(
                f"{self.fp32_graph} (calibration) has contract {found}, the model in use {contract_id}: "
                "they are different models"
            )
        return Calibration.from_metadata(meta)

    def write_calibration(self, calibration: Calibration) -> Path:
        """Write the set fields of ``calibration`` into the fp32 graph; returns the graph."""
        graph = self.graph("fp32")
        update_metadata(graph, calibration.to_metadata())
        self._metadata = None
        return graph

    def training_config(self) -> str | None:
        """The resolved training config (YAML text) the model was exported with, if it carries one."""
        text = self.metadata().get(METADATA_PREFIX + TRAINING_CONFIG_KEY)
        if text is None and self.training_config_path.is_file():
            text = self.training_config_path.read_text()
        return text

    def serving_file(self, backend: str = "auto", precision: str = "fp32", cuda: bool = False) -> tuple[Path, str]:
        """(file to run, backend name) for ``backend`` ("auto" | "onnxruntime" | "torch") and
        ``precision``; a bundle opened from one file runs that file."""
        if self.path.is_file():
            return self.path, ("torch" if self.path.suffix in TORCH_SUFFIXES else "onnxruntime")
        fp32 = graphs(self.folder)
        if backend == "auto":
            # The GPU is served through torch: it is the path tested on GPUs (see docs/export_runtime.md);
            # onnxruntime on the CPU, where it is ~2x faster than eager torch for these models.
            has_torch = any(self.folder.glob("*.pt"))
            backend = "torch" if (cuda and has_torch) or not fp32 else "onnxruntime"
        if backend == "torch":
            return _single(sorted(self.folder.glob("*.pt")), "torch artefact (*.pt)", self.folder), backend
        if precision == "fp16":
            return _single(graphs(self.folder, "fp16"), "fp16 graph", self.folder), backend
        return _single(fp32, "fp32 ONNX graph", self.folder), backend
