"""Where a model to export comes from, and the torch artefact the torch serving backend loads.

A model reaches the exporter in one of three forms, all resolved by :func:`resolve_model` into a
:class:`ModelSource` (a built model plus the registry name and overrides that rebuild it):

- an ``nn.Module`` plus its registry name (a module does not know the name it was registered under);
- a ``(model name, overrides, state_dict)`` triple;
- a path: a training checkpoint (a ``step_*`` directory, its ``model.pt``, or a run's checkpoint
  folder with ``best.json``), or a torch artefact written by :func:`save_torch_artifact`.

The torch artefact is one file holding only tensors, strings, numbers, lists and dicts, so it loads
with ``torch.load(weights_only=True)``: opening it can never execute pickled code. The architecture
is rebuilt from the registry (``create_model(name, **overrides)``), not unpickled, so inference runs
the same code as training and an artefact from an unknown model fails with the registry's error.

A model from a training checkpoint brings the run's resolved ``config.yaml`` (stored beside every
checkpoint) as ``ModelSource.training_config``; the artefact and the exported graphs carry it on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import facerec
from facerec.contract import ARCFACE_TEMPLATE_112, EmbeddingContract, training_alignment
from facerec.models import create_model

ARTIFACT_FORMAT = "facerec.torch-artifact"
ARTIFACT_VERSION = 1
CHECKPOINT_CONFIG = "config.yaml"  # the resolved config beside a checkpoint's model.pt


@dataclass
class ModelSource:
    model: nn.Module
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    version: str = "dev"  # becomes the contract's model_version unless the caller names one
    origin: str = "object"
    training_config: str | None = None  # the resolved training config (YAML text), when known
    alignment: str = ARCFACE_TEMPLATE_112  # what the model was trained on: the contract's alignment


def build_model(name: str, overrides: dict | None, state_dict: dict | None) -> nn.Module:
    """``create_model(name, **overrides)`` with ``state_dict`` loaded strictly, in eval mode, fp32."""
    model = create_model(name, **(overrides or {}))
    if state_dict is not None:
        # A DDP- or torch.compile-wrapped model saves prefixed keys; strip them so either loads.
        state_dict = {_strip_prefixes(k): v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _checkpoint_file(path: Path) -> Path:
    """The ``model.pt`` of a checkpoint given as a file, a step directory or a checkpoints folder."""
    if path.is_file():
        return path
    if (path / "model.pt").is_file():
        return path / "model.pt"
    for folder in (path, path / "checkpoints"):
        best = folder / "best.json"
        if best.is_file():
            return folder / json.loads(best.read_text())["dir"] / "model.pt"
        steps = sorted(folder.glob("step_*[0-9]"))  # never a half-written step_*.tmp
        if steps and (steps[-1] / "model.pt").is_file():
            return steps[-1] / "model.pt"
    raise FileNotFoundError(f"{path}: no model.pt, best.json or step_* checkpoint found")


def checkpoint_alignment(file: Path) -> str:
    """The alignment a training checkpoint's model was trained on, from the resolved config stored
    beside its ``model.pt`` (else the run folder's): centre crops when ``data.center_crop`` is set."""
    import yaml

    candidates = [file.parent / CHECKPOINT_CONFIG]
    if file.parent.parent.name == "checkpoints":
        candidates.append(file.parent.parent.parent / CHECKPOINT_CONFIG)
    stored = next((c for c in candidates if c.is_file()), None)
    return training_alignment(yaml.safe_load(stored.read_text()) if stored else None)


def load_model_file(path: str | Path) -> ModelSource:
    """A training checkpoint or a torch artefact -> :class:`ModelSource` (weights_only loading)."""
    file = _checkpoint_file(Path(path))
    data = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a dict of weights and metadata, got {type(data).__name__}")
    if data.get("format") == ARTIFACT_FORMAT:
        name, overrides, state = data["model_name"], data["overrides"], data["state_dict"]
        stored = EmbeddingContract.from_json(data["contract"])
        version, alignment = stored.model_version, stored.alignment
        origin = "torch-artifact"
        config = data.get("training_config")
    elif "model" in data and "model_name" in data:  # training/trainer.py's model.pt
        name, overrides, state = data["model_name"], data.get("model_kwargs") or {}, data["model"]
        version = f"step{data['step']}" if "step" in data else "dev"
        alignment = checkpoint_alignment(file)
        origin = "checkpoint"
        stored = file.parent / CHECKPOINT_CONFIG  # training/checkpoint.py writes it into every step
        config = stored.read_text() if stored.is_file() else None
    else:
        raise ValueError(
            f"{file}: neither a facerec torch artefact nor a training checkpoint (keys: {sorted(data)[:8]})"
        )
    return ModelSource(
        build_model(name, overrides, state), name, dict(overrides), version, f"{origin}:{file}",
        training_config=config, alignment=alignment,
    )


def resolve_model(
    source: nn.Module | tuple | ModelSource | str | Path,
    model_name: str | None = None,
    overrides: dict | None = None,
) -> ModelSource:
    """Any accepted form of a model (see the module docstring) -> :class:`ModelSource`."""
    if isinstance(source, ModelSource):
        return source
    if isinstance(source, nn.Module):
        if not model_name:
            raise ValueError("exporting a model object needs model_name (its registry name)")
        return ModelSource(source, model_name, dict(overrides or {}))
    if isinstance(source, tuple):
        name, over, state = source
        return ModelSource(build_model(name, over, state), name, dict(over or {}), origin="state_dict")
    return load_model_file(source)


def default_contract(
    source: ModelSource, version: str | None = None, extra: dict | None = None
) -> EmbeddingContract:
    """The contract of a facerec backbone: RGB, (x - 127.5) / 127.5, and the alignment it was
    trained on (the ArcFace 5-point template unless its training config says centre crops)."""
    model = source.model
    return EmbeddingContract(
        model_name=source.name,
        model_version=version or source.version,
        embedding_size=int(model.embedding_size),
        input_size=int(model.input_size),
        alignment=source.alignment,
        extra={"overrides": source.overrides, **(extra or {})},
    )


def save_torch_artifact(
    source: ModelSource, path: str | Path, contract: EmbeddingContract, output_names: list[str]
) -> Path:
    """Write the single-file artefact; tensors are moved to the CPU and made contiguous."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in source.model.state_dict().items()}
    data = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "model_name": source.name,
        "overrides": source.overrides,
        "state_dict": state,
        "contract": contract.to_json(),
        "output_names": list(output_names),
        "facerec_version": facerec.__version__,
        "torch_version": str(torch.__version__),
    }
    if source.training_config is not None:
        data["training_config"] = source.training_config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)  # a reader never sees half a file
    return path


@dataclass
class TorchArtifact:
    model: nn.Module
    contract: EmbeddingContract
    output_names: list[str]
    meta: dict


def load_torch_artifact(path: str | Path, map_location: str | torch.device = "cpu") -> TorchArtifact:
    """Rebuild the model of an artefact (eval mode, on ``map_location``) with its contract."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: not a facerec torch artefact")
    if int(data.get("format_version", 0)) > ARTIFACT_VERSION:
        raise ValueError(
            f"{path}: artefact format {data['format_version']} is newer than this facerec "
            f"({facerec.__version__}) reads ({ARTIFACT_VERSION}); upgrade facerec"
        )
    model = build_model(data["model_name"], data["overrides"], data["state_dict"]).to(map_location)
    meta = {k: v for k, v in data.items() if k != "state_dict"}
    return TorchArtifact(
        model, EmbeddingContract.from_json(data["contract"]), list(data["output_names"]), meta
    )
