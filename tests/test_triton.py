"""The Triton model repository of ``facerec export-triton``, checked against the ONNX graph it serves.

config.pbtxt is parsed with Triton's own ModelConfig protobuf (tritonclient), strictly (an unknown
field fails), and every input/output is compared with the graph as the ``onnx`` package reads it (an
independent reader: the exporter uses onnxruntime). The version folder must hold the graph byte for
byte (its sha256 is the one in the shipped manifest), and the declared dims must be what the graph
really returns for a batch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

from facerec.bundle import find_graph
from facerec.contract import EmbeddingContract
from facerec.export.triton import export_triton, model_config

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"
# ONNX element types -> Triton DataType names, written out independently of the exporter's table.
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
}


def parse_config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_io(path: Path) -> tuple[list, list]:
    graph = onnx.load(str(path), load_external_data=False).graph
    initialisers = {i.name for i in graph.initializer}

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        return v.name, ONNX_TO_TRITON[t.elem_type], dims

    return [spec(v) for v in graph.input if v.name not in initialisers], [spec(v) for v in graph.output]


def check_against_graph(cfg, graph: Path, max_batch_size: int) -> None:
    """Names, order, data types and dims of config vs. graph (batch axis dynamic and left out)."""
    inputs, outputs = onnx_io(graph)
    assert cfg.max_batch_size == max_batch_size
    declared_all = list(cfg.input) + list(cfg.output)
    for declared, (name, dtype, dims) in zip(declared_all, inputs + outputs, strict=True):
        assert declared.name == name
        assert model_config_pb2.DataType.Name(declared.data_type) == dtype
        assert dims[0] is None, f"{name}: the graph's batch axis must be dynamic"
        rest = [-1 if d in (None, 0) else d for d in dims[1:]]
        if rest:
            assert list(declared.dims) == rest and not declared.HasField("reshape")
        else:  # batch-only tensor: Triton's [1] + reshape to a scalar per item
            assert list(declared.dims) == [1]
            assert declared.HasField("reshape") and list(declared.reshape.shape) == []
    assert len(cfg.input) == len(inputs) and len(cfg.output) == len(outputs)


def _triton_name() -> str:
    """The Triton model folder of the shipped model: ``facerec_<its contract's model_name>``."""
    return "facerec_" + json.loads((DEFAULT / "contract.json").read_text())["model_name"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    if not (DEFAULT / "manifest.json").exists():
        pytest.skip("models/default is not in this checkout")
    root = tmp_path_factory.mktemp("triton")
    result = export_triton(DEFAULT, root, max_batch_size=16, preferred_batch_sizes=[4, 16], kind="gpu")
    return root, result


def test_layout_and_bytes(repo):
    root, result = repo
    manifest = json.loads((DEFAULT / "manifest.json").read_text())
    model_dir = root / _triton_name()
    assert result.model_dir == model_dir and result.version == 1
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == ["1", "config.pbtxt", "contract.json", "manifest.json"]
    assert [p.name for p in (model_dir / "1").iterdir()] == ["model.onnx"]
    # The version folder holds the shipped graph, byte for byte.
    (_, recorded), = manifest["files"].items()
    assert "sha256:" + sha256(model_dir / "1" / "model.onnx") == recorded
    assert json.loads((model_dir / "manifest.json").read_text()) == manifest
    contract = EmbeddingContract.from_json((model_dir / "contract.json").read_text())
    assert contract.contract_id == manifest["contract_id"] == result.contract_id
    assert contract.embedding_size == manifest["embedding_size"]


def test_config_matches_the_graph(repo):
    root, result = repo
    model_dir = root / _triton_name()
    cfg = parse_config(model_dir / "config.pbtxt")
    assert cfg.name == model_dir.name  # Triton requires the folder's name
    assert cfg.backend == "onnxruntime" and cfg.platform == ""
    check_against_graph(cfg, model_dir / "1" / "model.onnx", max_batch_size=16)
    assert [o.name for o in cfg.output][:2] == ["embedding", "quality"]
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 5000
    (group,) = cfg.instance_group
    assert group.count == 1 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert cfg.version_policy.latest.num_versions == 1
    assert cfg.parameters["facerec.contract_id"].string_value == result.contract_id


def test_declared_dims_are_what_the_graph_returns(repo):
    """Run the copied graph on a batch of 3: each output is (3, *dims), or (3,) where reshape is []."""
    import onnxruntime as ort

    root, _ = repo
    model_dir = root / _triton_name()
    cfg = parse_config(model_dir / "config.pbtxt")
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = cfg.input
    x = np.random.default_rng(0).uniform(-1, 1, (3, *inp.dims)).astype(np.float32)
    results = session.run([o.name for o in cfg.output], {inp.name: x})
    for declared, value in zip(cfg.output, results, strict=True):
        expected = list(declared.reshape.shape) if declared.HasField("reshape") else list(declared.dims)
        assert list(value.shape) == [3, *expected], declared.name


def test_new_version_goes_beside_the_old(tmp_path):
    first = export_triton(DEFAULT, tmp_path, name="faces")
    second = export_triton(DEFAULT, tmp_path, name="faces")
    assert (first.version, second.version) == (1, 2)
    assert sha256(tmp_path / "faces" / "1" / "model.onnx") == sha256(tmp_path / "faces" / "2" / "model.onnx")
    with pytest.raises(FileExistsError, match="exists"):
        export_triton(DEFAULT, tmp_path, name="faces", version=2)
    assert export_triton(DEFAULT, tmp_path, name="faces", version=2, force=True).version == 2
    # No staging folder is left where Triton could see it.
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == [
        "1", "2", "config.pbtxt", "contract.json", "manifest.json"]


def tiny_graph(path: Path, model_name: str, batch: str | int = "batch", dtype=onnx.TensorProto.FLOAT) -> Path:
    """A 2-output graph with the facerec contract in its metadata (Flatten -> embedding, mean -> quality)."""
    from onnx import helper

    contract = EmbeddingContract(model_name=model_name, model_version="1", embedding_size=48, input_size=4)
    nodes = [helper.make_node("Flatten", ["input"], ["embedding"], axis=1),
             helper.make_node("ReduceMean", ["embedding"], ["quality"], axes=[1], keepdims=0)]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", dtype, [batch, 3, 4, 4])],
        [helper.make_tensor_value_info("embedding", dtype, [batch, 48]),
         helper.make_tensor_value_info("quality", dtype, [batch])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"facerec.contract": contract.to_json(),
                                   "facerec.contract_id": contract.contract_id})
    onnx.save(model, str(path))
    return path


def test_generic_graph_fp16_and_cpu(tmp_path):
    graph = tiny_graph(tmp_path / "tiny.onnx", "tiny", dtype=onnx.TensorProto.FLOAT16)
    result = export_triton(graph, tmp_path / "repo", kind="cpu", instances=2, max_batch_size=8)
    cfg = parse_config(result.config_path)
    assert cfg.name == "facerec_tiny"
    check_against_graph(cfg, graph, max_batch_size=8)
    assert model_config_pb2.DataType.Name(cfg.input[0].data_type) == "TYPE_FP16"
    (group,) = cfg.instance_group
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert not cfg.dynamic_batching.preferred_batch_size


def test_refusals(tmp_path):
    repo = tmp_path / "repo"
    export_triton(DEFAULT, repo, name="faces")
    other = tiny_graph(tmp_path / "other.onnx", "other")
    with pytest.raises(ValueError, match="another --name"):  # another contract under the same name
        export_triton(other, repo, name="faces")
    with pytest.raises(ValueError, match="dynamic first"):
        export_triton(tiny_graph(tmp_path / "fixed.onnx", "fixed", batch=4), repo)
    bare = tmp_path / "bare.onnx"
    shutil.copyfile(other, bare)
    model = onnx.load(str(bare))
    del model.metadata_props[:]
    onnx.save(model, str(bare))
    with pytest.raises(ValueError, match="no facerec embedding contract"):
        export_triton(bare, repo)
    with pytest.raises(ValueError, match="model name"):
        export_triton(other, repo, name="../escape")
    # A graph that no longer matches its manifest's hash is not exported.
    copy = tmp_path / "copy"
    shutil.copytree(DEFAULT, copy, ignore=shutil.ignore_patterns("*.npz", "*.jsonl"))
    graph = find_graph(copy)
    with open(graph, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="does not match"):
        export_triton(copy, repo, name="tampered")
    with pytest.raises(ValueError, match="preferred"):
        model_config("m", [], [], max_batch_size=8, preferred_batch_sizes=[16])


def test_cli(tmp_path, capsys):
    from facerec.cli import main

    assert main(["export-triton", str(DEFAULT), "--repository", str(tmp_path), "--name", "cli_model",
                 "--max-batch-size", "8", "--kind", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == 1 and printed["outputs"][0] == "embedding"
    cfg = parse_config(tmp_path / "cli_model" / "config.pbtxt")
    assert cfg.max_batch_size == 8
    with pytest.raises(SystemExit, match="exists"):
        main(["export-triton", str(DEFAULT), "--repository", str(tmp_path), "--name", "cli_model",
              "--version", "1"])
