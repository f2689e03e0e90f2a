"""ONNX export: fp32 / fp16 graphs with the embedding contract in their metadata, parity-checked.

The graph follows insightface's recognition models so tools built for theirs accept ours: one input
(N, 3, 112, 112) float32 with a dynamic batch, values (x - 127.5) / 127.5 of an aligned RGB crop
(identical to our training normalisation (x / 255 - 0.5) / 0.5), the embedding as the first output.
insightface's ``ArcFaceONNX`` also feeds RGB: it takes BGR crops from OpenCV and swaps them
(``blobFromImages(..., swapRB=True)``), so its pipeline works with our graph unchanged; a tool that
feeds BGR tensors directly must flip the channel axis first (``x[:, ::-1]``).

Outputs, in order: ``embedding`` (N, D) unnormalised, ``quality`` (N,) for models with a quality head,
``feature_0 .. feature_{K-1}`` (N, C_k) pooled features for the OOD detector.

Metadata (``metadata_props``, read by onnxruntime as ``custom_metadata_map``), keys prefixed
``facerec.``: ``contract`` (the contract JSON), ``contract_id``, ``model_name``, ``model_version``,
``model_overrides``, ``output_names``, ``feature_dims``, ``feature_kinds`` (what each ``feature_k`` is:
``tokens`` or ``pixel_stats``), ``input`` (the input convention as JSON),
``precision``, ``facerec_version``, ``torch_version``, ``exporter`` and, for a model exported from a
training checkpoint, ``training_config`` (the run's resolved config.yaml). Later calibration
(thresholds, quality percentiles) is added through :mod:`facerec.bundle` without touching the graph;
the bundle module also names every file of the folder written here.

Every export is written to a temporary file, parity-checked against torch (:mod:`.parity`) and only
then renamed into place, so a graph that failed its check never sits where a server would load it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import facerec
from facerec import bundle
from facerec.bundle import METADATA_PREFIX as PREFIX
from facerec.contract import EmbeddingContract
from facerec.export.interop import write_interop_graph
from facerec.export.parity import ParityError, ParityReport, check_parity
from facerec.export.torch_artifact import (
    ModelSource,
    default_contract,
    resolve_model,
    save_torch_artifact,
)
from facerec.models.export_wrapper import ExportWrapper, export_onnx

INPUT_NAME = "input"


@dataclass
class ExportResult:
    path: Path
    precision: str
    output_names: list[str]
    contract: EmbeddingContract
    parity: ParityReport | None
    seconds: float

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "precision": self.precision,
            "output_names": self.output_names,
            "contract_id": self.contract.contract_id,
            "parity": self.parity.to_dict() if self.parity else None,
            "seconds": round(self.seconds, 2),
        }


def input_convention(contract: EmbeddingContract, input_name: str = INPUT_NAME) -> dict:
    return {
        "name": input_name,
        "shape": ["batch", 3, contract.input_size, contract.input_size],
        "dtype": "float32",
        "layout": "NCHW",
        "colour_order": contract.colour_order,
        "mean": list(contract.mean),
        "std": list(contract.std),
        "formula": "(pixel - mean) / std on an aligned uint8 crop",
        "alignment": contract.alignment,
    }


def build_metadata(
    source: ModelSource,
    contract: EmbeddingContract,
    output_names: list[str],
    precision: str,
    exporter: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    model = source.model
    meta = {
        "contract": contract.to_json(),
        "contract_id": contract.contract_id,
        "model_name": contract.model_name,
        "model_version": contract.model_version,
        "model_overrides": json.dumps(source.overrides, sort_keys=True),
        "output_names": json.dumps(output_names),
        "feature_dims": json.dumps([int(d) for d in getattr(model, "feature_dims", [])]),
        # What each feature_k is ("tokens", "pixel_stats", ...): the OOD fit treats pixel stats one-sidedly.
        "feature_kinds": json.dumps(list(getattr(model, "feature_kinds", []))),
        "input": json.dumps(input_convention(contract)),
        "precision": precision,
        "facerec_version": facerec.__version__,
        "torch_version": str(torch.__version__),
        "exporter": exporter,
    }
    if source.training_config is not None:
        meta[bundle.TRAINING_CONFIG_KEY] = source.training_config
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return {PREFIX + k: v for k, v in meta.items()}


def _doc_string(contract: EmbeddingContract, output_names: list[str], precision: str) -> str:
    return (
        f"facerec {contract.model_name} {contract.model_version} ({precision}); contract "
        f"{contract.contract_id}. Input '{INPUT_NAME}': (N, 3, {contract.input_size}, "
        f"{contract.input_size}) float32, aligned {contract.colour_order} crop, (x - 127.5) / 127.5. "
        f"Outputs: {', '.join(output_names)} (embedding not normalised)."
    )


def export_model(
    source: nn.Module | tuple | ModelSource | str | Path,
    path: str | Path,
    *,
    precision: str = "fp32",
    model_name: str | None = None,
    overrides: dict | None = None,
    version: str | None = None,
    contract: EmbeddingContract | None = None,
    return_features: bool = True,
    opset: int | None = None,
    dynamo: bool = True,
    check: bool = True,
    parity_batch_sizes: tuple[int, ...] = (1, 5),
    extra_metadata: dict[str, str] | None = None,
    keep_failed: bool = False,
) -> ExportResult:
    """Export one graph; raises :class:`ParityError` (and writes nothing at ``path``) if it fails.

    ``source``: a model object (with ``model_name`` and its ``overrides``), a ``(name, overrides,
    state_dict)`` triple, a checkpoint path or a torch artefact. The model is copied to the CPU in
    fp32 first, so a model on the GPU or in training mode is neither moved nor changed.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', not {precision!r}")
    start = time.perf_counter()
    src = resolve_model(source, model_name, overrides)
    cpu_model = copy.deepcopy(src.model).cpu().float().eval()
    src = dataclasses.replace(src, model=cpu_model)
    contract = contract or default_contract(src, version)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = bundle.partial_path(path)
    exporter = f"torch.onnx.export(dynamo={dynamo})"
    names = export_onnx(
        cpu_model,
        tmp,
        return_features=return_features,
        opset=opset,
        dynamo=dynamo,
        fp16=precision == "fp16",
        input_name=INPUT_NAME,
    )
    meta = build_metadata(src, contract, names, precision, exporter, extra_metadata)
    bundle.write_metadata(tmp, meta, _doc_string(contract, names, precision))
    report = None
    if check:
        try:
            report = check_parity(cpu_model, tmp, precision, parity_batch_sizes)
        except ParityError as err:
            kept = bundle.parity_failed_path(path)
            if keep_failed:
                os.replace(tmp, kept)
            else:
                tmp.unlink(missing_ok=True)
            where = f" (kept as {kept})" if keep_failed else " (nothing written)"
            raise ParityError(f"export of {path} failed its parity check{where}:\n{err}") from None
    os.replace(tmp, path)
    if report is not None:
        report.path = str(path)
    return ExportResult(path, precision, names, contract, report, time.perf_counter() - start)


def output_names_for(model: nn.Module, return_features: bool = True) -> list[str]:
    return ExportWrapper(model, return_features).output_names


def export_bundle(
    source: nn.Module | tuple | ModelSource | str | Path,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    overrides: dict | None = None,
    version: str | None = None,
    fp16: bool = True,
    torch_artifact: bool = True,
    interop: bool = True,
    stem: str | None = None,
    **export_kw,
) -> dict:
    """Everything a server needs, in ``out_dir``: ``<stem>.onnx``, ``<stem>.fp16.onnx``, ``<stem>.pt``
    (torch artefact), ``contract.json``, ``export_report.json`` (parity numbers, timings) and, for a
    model from a training checkpoint, ``training_config.yaml``; with ``interop``, also
    ``<stem>.insightface.onnx`` for insightface's model zoo (file names: :mod:`facerec.bundle`)."""
    src = resolve_model(source, model_name, overrides)
    contract = default_contract(src, version)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or src.name
    results = [export_model(src, out / bundle.graph_name(stem), contract=contract, **export_kw)]
    if fp16:
        results.append(export_model(src, out / bundle.graph_name(stem, "fp16"), precision="fp16",
                                    contract=contract, **export_kw))
    report = {
        "model_name": src.name,
        "origin": src.origin,
        "contract": json.loads(contract.to_json()),
        "onnx": [r.to_dict() for r in results],
    }
    if interop:
        path, cosine = write_interop_graph(results[0].path)
        report["insightface"] = {"path": str(path), "embedding_cosine_vs_fp32_graph": round(cosine, 7)}
    if torch_artifact:
        names = output_names_for(src.model, export_kw.get("return_features", True))
        path = out / bundle.torch_artifact_name(stem)
        report["torch_artifact"] = str(save_torch_artifact(src, path, contract, names))
    (out / bundle.CONTRACT_FILE).write_text(contract.to_json() + "\n")
    if src.training_config is not None:
        (out / bundle.TRAINING_CONFIG_FILE).write_text(src.training_config)
    (out / bundle.EXPORT_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report
