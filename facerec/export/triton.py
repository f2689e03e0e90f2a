"""A Triton Inference Server model repository for an exported embedding graph.

::

    <repository>/<name>/config.pbtxt           onnxruntime backend, dynamic batching, I/O read from the graph
    <repository>/<name>/<version>/model.onnx   the graph, byte for byte (its metadata keeps the contract)
    <repository>/<name>/contract.json          the embedding contract read from the graph
    <repository>/<name>/manifest.json          the export's manifest, when it has one (checked first)

Triton serves tensors, not images: a client must detect, align (the contract's 5-point template at
``input_size``), order the colours and normalise exactly as ``contract.json`` says, and compare
embeddings only with embeddings of the same contract id. That is why one model name holds one
contract: a new version of a different model is refused (use another name), so the versions Triton
serves under one name always produce comparable embeddings. docs/deployment.md says when Triton fits
and when the facerec service does.

The writer is careful about a Triton that polls its repository: a version folder is filled in a
non-numeric staging folder (Triton ignores those) and renamed into place, and ``config.pbtxt`` is replaced
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from facerec.bundle import (
    CONTRACT_FILE,
    MANIFEST_FILE,
    contract_from_metadata,
    find_graph,
)
from facerec.contract import EmbeddingContract

# onnxruntime's element type names -> Triton's model-config DataType names.
ORT_TO_TRITON = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bfloat16)": "TYPE_BF16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(bool)": "TYPE_BOOL",
    "tensor(string)": "TYPE_STRING",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it (the batch dimension left out)."""

    name: str
    data_type: str
    dims: tuple[int, ...]  # -1 for a dynamic dimension; (1,) + reshape () for a batch-only tensor
    reshape: tuple[int, ...] | None = None


@dataclass
class TritonExport:
    model_dir: Path
    version: int
    graph: Path
    config_path: Path
    contract_id: str
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model_dir": str(self.model_dir),
            "version": self.version,
            "graph": str(self.graph),
            "config": str(self.config_path),
            "contract_id": self.contract_id,
            "inputs": [s.name for s in self.inputs],
            "outputs": [s.name for s in self.outputs],
        }


def _specs(args, what: str) -> list[TensorSpec]:
    specs = []
    for arg in args:
        if arg.type not in ORT_TO_TRITON:
            raise ValueError(f"{what} {arg.name!r} has type {arg.type}, which Triton cannot serve")
        shape = list(arg.shape)
        if not shape or isinstance(shape[0], int):
            raise ValueError(
                f"{what} {arg.name!r} has shape {shape}: Triton's dynamic batching needs a dynamic first "
                "(batch) dimension; export the graph with `facerec export` (its batch axis is dynamic)"
            )
        rest = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])
        if rest:
            specs.append(TensorSpec(arg.name, ORT_TO_TRITON[arg.type], rest))
        else:  # batch-only tensor, e.g. quality (N,): Triton's convention for "no dims beyond the batch"
            specs.append(TensorSpec(arg.name, ORT_TO_TRITON[arg.type], (1,), reshape=()))
    return specs


def read_graph(graph: Path) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, str]]:
    """(inputs, outputs, metadata) of a graph, through onnxruntime on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    meta = dict(session.get_modelmeta().custom_metadata_map)
    return _specs(session.get_inputs(), "input"), _specs(session.get_outputs(), "output"), meta


def _dims(values: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]" if values else "[ ]"


def _tensor_block(spec: TensorSpec) -> str:
    lines = [f'    name: "{spec.name}"', f"    data_type: {spec.data_type}", f"    dims: {_dims(spec.dims)}"]
    if spec.reshape is not None:
        lines.append(f"    reshape: {{ shape: {_dims(spec.reshape)} }}")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    *,
    max_batch_size: int = 32,
    max_queue_delay_us: int = 5000,
    preferred_batch_sizes: list[int] | None = None,
    kind: str = "gpu",
    instances: int = 1,
    parameters: dict[str, str] | None = None,
    comment: str = "",
) -> str:
    """``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``)."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1 (dynamic batching)")
    preferred = sorted(set(preferred_batch_sizes or []))
    if any(p < 1 or p > max_batch_size for p in preferred):
        raise ValueError(f"preferred batch sizes must lie in 1..{max_batch_size}, got {preferred}")
    if kind not in ("gpu", "cpu"):
        raise ValueError("kind must be gpu or cpu")
    if instances < 1:
        raise ValueError("instances must be at least 1")
    out = [f"# {line}" for line in comment.splitlines()] if comment else []
    out += [
        f"name: {_quote(name)}",
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "version_policy: { latest: { num_versions: 1 } }",
        "input [\n" + ",\n".join(_tensor_block(s) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(s) for s in outputs) + "\n]",
    ]
    batching = [f"  max_queue_delay_microseconds: {max_queue_delay_us}"]
    if preferred:
        batching.insert(0, f"  preferred_batch_size: {_dims(tuple(preferred))}")
    out.append("dynamic_batching {\n" + "\n".join(batching) + "\n}")
    out.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_{kind.upper()}\n  }}\n]")
    for key, value in (parameters or {}).items():
        out.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    return "\n".join(out) + "\n"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_manifest(graph: Path) -> Path | None:
    """The export's manifest.json, after checking the graph against its recorded hash (if any)."""
    manifest = graph.parent / MANIFEST_FILE
    if not manifest.is_file():
        return None
    recorded = json.loads(manifest.read_text()).get("files", {}).get(graph.name)
    if recorded is not None:
        found = "sha256:" + _sha256(graph)
        if recorded != found:
            raise ValueError(f"{graph} does not match {manifest} ({found} != {recorded}): a changed or "
                             "truncated graph is not exported")
    return manifest


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_triton(
    source: str | Path,
    repository: str | Path,
    *,
    name: str | None = None,
    version: int | None = None,
    precision: str = "fp32",
    max_batch_size: int = 32,
    max_queue_delay_us: int = 5000,
    preferred_batch_sizes: list[int] | None = None,
    kind: str = "gpu",
    instances: int = 1,
    force: bool = False,
) -> TritonExport:
    """Add ``source`` (an export folder or one .onnx) to the Triton repository as ``<name>/<version>``.

    ``version`` defaults to one more than the highest present. An existing version is replaced only
    with ``force``; a model name already holding another contract is refused.
    """
    graph = find_graph(source, precision)
    manifest = _check_manifest(graph)
    inputs, outputs, meta = read_graph(graph)
    contract = contract_from_metadata(meta)
    name = name or f"facerec_{contract.model_name}"
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '.', '-' (at most 128)")

    repository = Path(repository)
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    held = model_dir / CONTRACT_FILE
    if held.is_file():
        held_id = EmbeddingContract.from_json(held.read_text()).contract_id
        if held_id != contract.contract_id:
            raise ValueError(
                f"{model_dir} serves contract {held_id}; {graph.name} has contract {contract.contract_id}. "
                "Embeddings of different contracts cannot be compared: export it under another --name"
            )
    present = _versions(model_dir)
    version = version if version is not None else (present[-1] + 1 if present else 1)
    if version < 1:
        raise ValueError("Triton versions are positive integers")
    version_dir = model_dir / str(version)
    if version_dir.exists() and not force:
        raise FileExistsError(f"{version_dir} exists; pass force=True (--force) to replace it")

    # Fill the version in a non-numeric folder (Triton ignores those), then rename it: a polling Triton
    # never sees half a file.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        shutil.copyfile(graph, staging / "model.onnx")
        if version_dir.exists():
            shutil.rmtree(version_dir)
        os.replace(staging, version_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    _write_atomic(held, contract.to_json() + "\n")
    if manifest is not None:
        _write_atomic(model_dir / MANIFEST_FILE, manifest.read_text())
    parameters = {
        "facerec.contract_id": contract.contract_id,
        "facerec.model_name": contract.model_name,
        "facerec.model_version": contract.model_version,
    }
    comment = (f"Written by `facerec export-triton` from {graph.name} (contract {contract.contract_id}).\n"
               "Inputs are aligned, normalised crops: see contract.json beside this file.")
    config = model_config(
        name, inputs, outputs, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
        preferred_batch_sizes=preferred_batch_sizes, kind=kind, instances=instances,
        parameters=parameters, comment=comment,
    )
    config_path = model_dir / "config.pbtxt"
    _write_atomic(config_path, config)
    return TritonExport(model_dir, version, version_dir / "model.onnx", config_path,
                        contract.contract_id, inputs, outputs)
