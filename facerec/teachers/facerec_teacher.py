"""A facerec model as a teacher: distil your own big model into a small one.

``source`` is any of:
- a model folder written by ``facerec export`` (its fp32 ``.onnx`` graph, run with onnxruntime),
  or that ``.onnx`` file itself;
- a torch artefact (``<stem>.pt`` of an export) or a training checkpoint (a ``step_*`` folder, its
  ``model.pt``, or a run's ``checkpoints`` folder with ``best.json``), rebuilt from the model
  registry by :func:`facerec.export.torch_artifact.load_model_file` (weights-only loading), after
  importing the plugin modules the checkpoint's ``config.yaml`` lists under ``model.imports``; so
  ``facerec/`` reads checkpoints without importing ``training/``.

The input follows the model's embedding contract (112 x 112 RGB ArcFace-aligned crops,
(x - 127.5) / 127.5), which the runtime backends apply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facerec.teachers.base import AlignedInput, CropTeacher, hash_files_and_options, register_teacher


def import_model_plugins(config_yaml: Path) -> list[str]:
    """Import the modules a training run's resolved config lists under ``model.imports`` (plugins
    that register their backbones), as the trainer did before building the model. Reads the
    stored YAML itself: ``facerec/`` does not import ``training/``."""
    import importlib

    import yaml

    if not config_yaml.is_file():
        return []
    config = yaml.safe_load(config_yaml.read_text()) or {}
    modules = list(((config.get("model") or {}).get("imports")) or [])
    for module in modules:
        importlib.import_module(module)
    return modules


class FacerecTeacher(CropTeacher):
    name = "facerec"
    input_kind = "aligned"

    def __init__(self, source: str | Path, batch_size: int = 32, threads: int = 1, detector=None):
        from facerec.runtime.backends import OnnxRuntimeBackend, TorchBackend

        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"facerec teacher: {source} does not exist (give a `facerec export` "
                                    "folder, its .onnx graph, a torch artefact or a training checkpoint)")
        self.batch_size = int(batch_size)
        graph = self._graph_of(source)
        if graph is not None:
            self.backend = OnnxRuntimeBackend(graph, device="cpu", threads=threads)
            weights = graph
        else:
            from facerec.export.torch_artifact import _checkpoint_file, default_contract, load_model_file

            weights = _checkpoint_file(source)
            import_model_plugins(weights.parent / "config.yaml")
            loaded = load_model_file(weights)
            self.backend = TorchBackend(loaded.model, device="cpu", contract=default_contract(loaded),
                                        return_features=False, threads=threads)
        if "embedding" not in self.backend.output_names:
            raise ValueError(f"{source}: the model has no 'embedding' output ({self.backend.output_names})")
        contract = self.backend.contract
        self.source = source
        self.contract = contract
        self.embedding_size = int(contract.embedding_size)
        self.version = f"{contract.model_name}.{contract.model_version}"
        self.aligner = AlignedInput(contract.input_size, detector)
        self.weights_hash = hash_files_and_options([weights], {"contract": contract.contract_id})

    @staticmethod
    def _graph_of(source: Path) -> Path | None:
        if source.is_file():
            return source if source.suffix == ".onnx" else None
        if any(source.glob("*.onnx")):
            from facerec.export.triton import find_graph

            return find_graph(source, "fp32")
        return None

    def _run(self, crops: np.ndarray) -> np.ndarray:
        return np.asarray(self.backend.run(crops)["embedding"], dtype=np.float32)

    def describe(self) -> dict:
        return {**super().describe(), "source": str(self.source), "contract_id": self.contract.contract_id}


@register_teacher
def facerec(path: str, **kwargs) -> FacerecTeacher:
    """A facerec model folder, .onnx graph, torch artefact or training checkpoint."""
    return FacerecTeacher(path, **kwargs)
