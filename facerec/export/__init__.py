"""Export: ONNX graphs (fp32/fp16) carrying the embedding contract, parity checks, torch artefacts.

``export_bundle`` writes everything a server loads; ``export_model`` one graph. See
docs/export_runtime.md. The metadata reader and writer belong to the model folder's owner,
:mod:`facerec.bundle`; they are re-exported here because an export is where one meets them first.
"""

from facerec.bundle import contract_from_metadata, read_metadata, update_metadata
from facerec.export.interop import write_interop_graph
from facerec.export.onnx import ExportResult, export_bundle, export_model
from facerec.export.parity import ParityError, ParityReport, check_parity
from facerec.export.torch_artifact import (
    ModelSource,
    TorchArtifact,
    load_torch_artifact,
    resolve_model,
    save_torch_artifact,
)

__all__ = [
    "ExportResult",
    "ModelSource",
    "ParityError",
    "ParityReport",
    "TorchArtifact",
    "check_parity",
    "contract_from_metadata",
    "export_bundle",
    "export_model",
    "load_torch_artifact",
    "read_metadata",
    "resolve_model",
    "save_torch_artifact",
    "update_metadata",
    "write_interop_graph",
]
