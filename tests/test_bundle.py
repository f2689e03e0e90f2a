"""The model folder's one owner (facerec.bundle): which file is which, the typed calibration and its
round trip through a graph's metadata, the file a server runs, and the training config an export
carries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facerec.bundle import (
    METADATA_PREFIX,
    BundleError,
    Calibration,
    ModelBundle,
    find_graph,
    graphs,
    read_metadata,
)
from facerec.contract import ContractMismatchError, EmbeddingContract

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.timeout(300)


def tiny_graph(path: Path, model_name: str = "tiny") -> Path:
    """An identity-like graph with a facerec contract in its metadata (no model needed)."""
    from onnx import helper

    contract = EmbeddingContract(model_name=model_name, model_version="1", embedding_size=48, input_size=4)
    node = helper.make_node("Flatten", ["input"], ["embedding"], axis=1)
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", 48])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"facerec.contract": contract.to_json(),
                                   "facerec.contract_id": contract.contract_id})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


# ----------------------------------------------------------------------------------- file names
def test_one_graph_finder_for_every_reader(tmp_path):
    _touch(tmp_path, "m.onnx", "m.fp16.onnx", "m.insightface.onnx", "m.partial.onnx", "m.parity-failed.onnx",
           "m.insightface.partial.onnx", "m.pt")
    assert find_graph(tmp_path) == tmp_path / "m.onnx"
    assert ModelBundle(tmp_path).interop_graph == tmp_path / "m.insightface.onnx"
    assert find_graph(tmp_path, "fp16") == tmp_path / "m.fp16.onnx"
    assert find_graph(tmp_path / "m.fp16.onnx") == tmp_path / "m.fp16.onnx"  # a file is taken as given
    assert graphs(tmp_path) == [tmp_path / "m.onnx"]
    with pytest.raises(BundleError, match="not an .onnx graph"):
        find_graph(tmp_path / "m.pt")
    with pytest.raises(FileNotFoundError):
        find_graph(tmp_path / "nowhere")
    _touch(tmp_path, "n.onnx")
    with pytest.raises(BundleError, match="expected one fp32 ONNX graph, found m.onnx, n.onnx"):
        find_graph(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="found none"):
        find_graph(empty)


def test_the_file_a_server_runs(tmp_path):
    _touch(tmp_path, "m.onnx", "m.fp16.onnx", "m.insightface.onnx", "m.pt")
    b = ModelBundle(tmp_path)
    assert b.serving_file() == (tmp_path / "m.onnx", "onnxruntime")
    assert b.serving_file(cuda=True) == (tmp_path / "m.pt", "torch")  # the GPU is served through torch
    assert b.serving_file(precision="fp16") == (tmp_path / "m.fp16.onnx", "onnxruntime")
    assert b.serving_file("torch") == (tmp_path / "m.pt", "torch")
    assert ModelBundle(tmp_path / "m.pt").serving_file("onnxruntime") == (tmp_path / "m.pt", "torch")
    # Opened from the fp16 graph: that graph runs, the calibration is still the fp32 graph's.
    fp16 = ModelBundle(tmp_path / "m.fp16.onnx")
    assert fp16.serving_file() == (tmp_path / "m.fp16.onnx", "onnxruntime")
    assert fp16.fp32_graph == tmp_path / "m.onnx"
    only_torch = tmp_path / "t"
    _touch(only_torch, "m.pt")
    assert ModelBundle(only_torch).serving_file() == (only_torch / "m.pt", "torch")
    assert ModelBundle(only_torch).fp32_graph is None and ModelBundle(only_torch).metadata() == {}
    with pytest.raises(BundleError, match="expected one fp32 ONNX graph"):
        ModelBundle(only_torch).serving_file("onnxruntime")
    assert b.ood_path == tmp_path / "ood.npz" and b.openset_path == tmp_path / "openset.json"


# ---------------------------------------------------------------------------------- calibration
def test_calibration_quality_mapping_and_refusals():
    cal = Calibration(quality_percentiles=np.array([0.0, 1.0, 3.0]))
    assert cal.quality_score(0.5) == pytest.approx(25.0) and cal.quality_score(2.0) == pytest.approx(75.0)
    assert cal.quality_score(-1.0) == 0.0 and cal.quality_score(9.0) == 100.0
    assert Calibration().quality_score(0.5) is None
    meta = {METADATA_PREFIX + "quality_percentiles": json.dumps([0.0, 2.0, 1.0])}
    with pytest.raises(ValueError, match="non-decreasing"):
        Calibration.from_metadata(meta)
    empty = Calibration.from_metadata({METADATA_PREFIX + "verification_threshold": ""})
    assert empty.threshold is None and empty.source is None and empty.to_metadata() == {}


def test_calibration_round_trip_through_the_graph(tmp_path):
    graph = tiny_graph(tmp_path / "m" / "m.onnx")
    model = ModelBundle(tmp_path / "m")
    assert model.calibration() == Calibration()
    written = Calibration(threshold=0.3125, far=0.001, calibrated_on="lfw fold 5",
                          quality_percentiles=np.linspace(-1.0, 2.0, 101), quality_calibrated_on="faces")
    assert model.write_calibration(written) == graph
    meta = read_metadata(graph)
    assert meta["facerec.verification_threshold"] == "0.3125" and meta["facerec.verification_far"] == "0.001"
    again = ModelBundle(tmp_path / "m").calibration(model.contract().contract_id)
    assert (again.threshold, again.far, again.calibrated_on, again.source) == (0.3125, 0.001, "lfw fold 5", "model")
    np.testing.assert_array_equal(again.quality_percentiles, written.quality_percentiles)
    assert again.quality_calibrated_on == "faces"
    with pytest.raises(ContractMismatchError, match="different models"):
        ModelBundle(tmp_path / "m").calibration("0123456789abcdef")
    # The contract comes from the graph when contract.json is absent, and from the file when present.
    assert model.contract().model_name == "tiny"
    other = EmbeddingContract("other", "1", 8)
    model.contract_path.write_text(other.to_json())
    assert model.contract() == other


# -------------------------------------------------------------------------- the training config
def test_an_export_from_a_checkpoint_carries_its_training_config(tmp_path):
    import torch

    from facerec.export import export_bundle, load_torch_artifact
    from facerec.models import create_model

    torch.manual_seed(0)
    model = create_model("mobilefacenet", embedding_size=64).eval()
    step = tmp_path / "run" / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "model_name": "mobilefacenet",
                "model_kwargs": {"embedding_size": 64}, "step": 3}, step / "model.pt")
    config = "model:\n  name: mobilefacenet\nloss:\n  margin: arcface\n"
    (step / "config.yaml").write_text(config)
    out = tmp_path / "export"
    export_bundle(step, out, fp16=False, dynamo=False, check=False)
    exported = ModelBundle(out)
    assert exported.metadata()["facerec.training_config"] == config
    assert exported.training_config() == config
    assert (out / "training_config.yaml").read_text() == config
    assert load_torch_artifact(out / "mobilefacenet.pt").meta["training_config"] == config
    # A model object (no checkpoint) has no config to carry, and says so by carrying none.
    bare = tmp_path / "bare"
    export_bundle(model, bare, model_name="mobilefacenet", overrides={"embedding_size": 64}, fp16=False,
                  torch_artifact=False, dynamo=False, check=False)
    assert ModelBundle(bare).training_config() is None
    assert not (bare / "training_config.yaml").exists()
