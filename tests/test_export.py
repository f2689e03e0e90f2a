"""Export: ONNX graphs with the contract in their metadata, parity checks, fp16, torch artefacts."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch

from facerec.contract import EmbeddingContract
from facerec.export import (
    ParityError,
    check_parity,
    contract_from_metadata,
    export_bundle,
    export_model,
    load_torch_artifact,
    read_metadata,
    resolve_model,
    update_metadata,
)
from facerec.export.parity import normalise, random_faces
from facerec.models import create_model
from facerec.models.export_wrapper import ExportWrapper

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

# vit_tiny_fiqa at depth 2 keeps the tokens, quality head and feature taps of the shipped model and
# exports in a third of the time; the overrides also exercise the rebuild-from-registry path.
VIT = ("vit_tiny_fiqa", {"depth": 2})
MFN = ("mobilefacenet", {})


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model exported once; the vit also in fp16. The vit goes through the default (dynamo)
    exporter, mobilefacenet through the TorchScript fallback, 3x faster for its many small nodes
    (tests/test_models.py checks both exporters on both models)."""
    out = tmp_path_factory.mktemp("export")
    graphs = {}
    for (name, overrides), dynamo in ((MFN, False), (VIT, True)):
        torch.manual_seed(0)
        model = create_model(name, **overrides).eval()
        result = export_model(
            model, out / f"{name}.onnx", model_name=name, overrides=overrides, version="t1", dynamo=dynamo
        )
        graphs[name] = (model, result)
    model, _ = graphs[VIT[0]]
    graphs["fp16"] = (
        model,
        export_model(
            model, out / "vit.fp16.onnx", precision="fp16", model_name=VIT[0], overrides=VIT[1], version="t1"
        ),
    )
    return graphs


@pytest.mark.parametrize("name", [MFN[0], VIT[0]])
def test_metadata_carries_the_contract(exported, name):
    model, result = exported[name]
    meta = read_metadata(result.path)
    contract = contract_from_metadata(meta)
    assert contract == result.contract and contract.contract_id == meta["facerec.contract_id"]
    assert EmbeddingContract.from_json(contract.to_json()).contract_id == contract.contract_id
    assert (contract.model_name, contract.model_version, contract.embedding_size) == (name, "t1", 512)
    assert (contract.colour_order, contract.mean, contract.std) == ("RGB", (127.5,) * 3, (127.5,) * 3)
    assert json.loads(meta["facerec.output_names"]) == result.output_names
    assert json.loads(meta["facerec.feature_dims"]) == list(model.feature_dims)
    assert meta["facerec.precision"] == "fp32" and meta["facerec.facerec_version"]
    expected = ["embedding"] + (["quality"] if model.has_quality else [])
    assert result.output_names == expected + [f"feature_{i}" for i in range(len(model.feature_dims))]
    assert result.parity.passed and not result.path.with_name(result.path.stem + ".partial.onnx").exists()


@pytest.mark.parametrize("name", [MFN[0], VIT[0]])
def test_graph_follows_the_insightface_input_convention(exported, name):
    _, result = exported[name]
    session = _session(result.path)
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.type == "tensor(float)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 112, 112]  # dynamic batch
    assert session.get_outputs()[0].name == "embedding"  # insightface reads output 0
    import onnx

    graph = onnx.load(str(result.path)).graph
    assert (
        min(i.version for i in onnx.load(str(result.path)).opset_import if i.domain in ("", "ai.onnx")) >= 17
    )
    # insightface's ArcFaceONNX assumes mean 0 / std 1 when a Sub and a Mul open the graph.
    first = [n.name for n in graph.node[:8]]
    opens_with_sub = any(n.startswith(("Sub", "_minus")) for n in first)
    opens_with_mul = any(n.startswith(("Mul", "_mul")) for n in first)
    assert not (opens_with_sub and opens_with_mul)


@pytest.mark.parametrize("name", [MFN[0], VIT[0]])
def test_dynamic_batch_matches_torch(exported, name):
    model, result = exported[name]
    session = _session(result.path)
    wrapper = ExportWrapper(model, return_features=True).eval()
    for batch in (1, 5):
        x = normalise(random_faces(batch, seed=10 + batch))
        got = dict(zip(result.output_names, session.run(None, {"input": x})))
        with torch.no_grad():
            ref = dict(zip(result.output_names, wrapper(torch.from_numpy(x))))
        assert got["embedding"].shape == (batch, 512)
        assert _cos(got["embedding"], ref["embedding"].numpy()).min() >= 0.9999
        if "quality" in got:
            assert got["quality"].shape == (batch,)
            np.testing.assert_allclose(got["quality"], ref["quality"].numpy(), atol=1e-4)


def test_parity_check_fails_on_perturbed_weights(exported):
    model, result = exported[VIT[0]]
    assert check_parity(model, result.path).passed
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.head.fc2.weight.add_(torch.randn_like(broken.head.fc2.weight) * 0.5)
    with pytest.raises(ParityError, match="FAILED"):
        check_parity(broken, result.path)
    report = check_parity(broken, result.path, raise_on_failure=False)
    assert not report.passed and {c.output for c in report.failures()} == {"embedding"}


def test_failed_parity_writes_no_graph(tmp_path, monkeypatch):
    """The export itself refuses a graph that does not match (here: one traced from other weights)."""
    import facerec.export.onnx as onnx_export

    real = onnx_export.export_onnx

    def export_other_weights(model, path, **kw):
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        return real(other, path, **kw)

    monkeypatch.setattr(onnx_export, "export_onnx", export_other_weights)
    torch.manual_seed(0)
    model = create_model(VIT[0], depth=1)
    target = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match="nothing written"):
        export_model(model, target, model_name=VIT[0], overrides={"depth": 1}, dynamo=False)
    assert list(tmp_path.iterdir()) == []


def test_fp16_graph_is_close_to_fp32(exported):
    _, result = exported["fp16"]
    _, fp32 = exported[VIT[0]]
    assert read_metadata(result.path)["facerec.precision"] == "fp16"
    assert result.contract.contract_id == fp32.contract.contract_id  # same model, same contract
    assert result.path.stat().st_size < 0.6 * fp32.path.stat().st_size
    if not torch.cuda.is_available():
        assert any("autocast" in note for note in result.parity.notes)
    try:
        half = _session(result.path)
    except Exception as err:  # noqa: BLE001 - a build of onnxruntime without fp16 CPU support
        pytest.skip(f"onnxruntime cannot run fp16 graphs on this CPU: {err}")
    x = normalise(random_faces(4, seed=3))
    got = half.run(None, {"input": x})
    ref = _session(fp32.path).run(None, {"input": x})
    assert got[0].dtype == np.float32  # fp32 in and out, fp16 inside
    assert _cos(got[0], ref[0]).min() >= 0.999
    np.testing.assert_allclose(got[1], ref[1], atol=2e-2)


def test_torch_artifact_round_trip(exported, tmp_path):
    model, _ = exported[VIT[0]]
    report = export_bundle(
        model, tmp_path, model_name=VIT[0], overrides=VIT[1], version="t1", fp16=False, dynamo=False
    )
    artifact = load_torch_artifact(report["torch_artifact"])
    assert artifact.contract.contract_id == report["contract"]["contract_id"]
    assert artifact.output_names == report["onnx"][0]["output_names"]
    x = torch.from_numpy(normalise(random_faces(3, seed=5)))
    with torch.no_grad():
        a, b = model(x, return_features=True), artifact.model(x, return_features=True)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.quality, b.quality)
    assert all(torch.equal(f, g) for f, g in zip(a.features, b.features))
    # Only tensors and plain data inside: it loads with weights_only=True, no pickled code.
    data = torch.load(report["torch_artifact"], weights_only=True)
    assert data["format"] == "facerec.torch-artifact" and data["overrides"] == VIT[1]
    assert (
        json.loads((tmp_path / "contract.json").read_text())["contract_id"] == artifact.contract.contract_id
    )


def test_model_sources_state_dict_and_training_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = create_model(VIT[0], depth=1, embedding_size=128).eval()
    overrides = {"depth": 1, "embedding_size": 128}
    triple = resolve_model((VIT[0], overrides, model.state_dict()))
    step = tmp_path / "checkpoints" / "step_00000007"
    step.mkdir(parents=True)
    # The layout training/trainer.py writes.
    torch.save(
        {
            "model": {"module." + k: v for k, v in model.state_dict().items()},
            "model_name": VIT[0],
            "model_kwargs": overrides,
            "step": 7,
            "epoch": 0,
        },
        step / "model.pt",
    )
    from_ckpt = resolve_model(tmp_path)  # a run directory: its latest complete step
    assert from_ckpt.version == "step7" and from_ckpt.overrides == overrides
    x = torch.from_numpy(normalise(random_faces(2)))
    with torch.no_grad():
        ref = model(x).embedding
        assert torch.equal(triple.model(x).embedding, ref) and torch.equal(from_ckpt.model(x).embedding, ref)
    with pytest.raises(ValueError, match="model_name"):
        resolve_model(model)


def test_update_metadata_keeps_the_contract(exported, tmp_path):
    _, result = exported[MFN[0]]
    path = tmp_path / "m.onnx"
    path.write_bytes(result.path.read_bytes())
    update_metadata(path, {"verification_threshold": "0.31"})
    meta = read_metadata(path)
    assert meta["facerec.verification_threshold"] == "0.31"
    assert contract_from_metadata(meta).contract_id == result.contract.contract_id
    with pytest.raises(ValueError, match="cannot be edited"):
        update_metadata(path, {"contract_id": "0000"})


def test_cli_export_random_init(tmp_path, capsys):
    from facerec.cli import export as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            VIT[0],
            "--overrides",
            '{"depth": 1}',
            "--random-init",
            "--out",
            str(tmp_path),
            "--no-fp16",
            "--legacy-exporter",
        ]
    )
    assert cli.run(args) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {
        "vit_tiny_fiqa.onnx",
        "vit_tiny_fiqa.pt",
        "contract.json",
        "export_report.json",
    }
    assert "embedding cosine" in capsys.readouterr().out
