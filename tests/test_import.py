"""``facerec import``: insightface-style ONNX recognition graphs become model folders facerec serves."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import pytest

from facerec.bundle import ModelBundle, find_graph

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def insightface_style_graph(path, *, inside: bool, dim: int = 256, size: int = 112, input_name: str = "input.1",
                            seed: int = 0):
    """A small random recognition network laid out as insightface's model zoo graphs are: input
    ``input.1`` (None, 3, S, S); with ``inside``, the mxnet-style ``Sub``/``Mul`` normalisation nodes
    first (fed 0-255); a ``dim``-d embedding as the one output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    flat = 16 * (size // 4) * (size // 4)
    inits = [init("conv0_w", (8, 3, 3, 3), 0.3), init("conv1_w", (16, 8, 3, 3), 0.15),
             init("fc_w", (dim, flat), flat ** -0.5), init("fc_b", (dim,), 0.01)]
    nodes, x = [], input_name
    if inside:
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                  numpy_helper.from_array(np.array(0.0078125, np.float32), "scale")]
        nodes += [helper.make_node("Sub", [x, "mean"], ["sub_out"], name="Sub_0"),
                  helper.make_node("Mul", ["sub_out", "scale"], ["mul_out"], name="Mul_1")]
        x = "mul_out"
    nodes += [
        helper.make_node("Conv", [x, "conv0_w"], ["c0"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv_0"),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu_0"),
        helper.make_node("Conv", ["r0", "conv1_w"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv_1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu_1"),
        helper.make_node("Flatten", ["r1"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["683"], transB=1, name="fc1"),
    ]
    graph = helper.make_graph(
        nodes, "recognition",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["None", 3, size, size])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _run_import(*argv):
    from facerec.cli import import_model as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([str(a) for a in argv]))


def _source(path, feed):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: feed})[0]


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import")
    src = insightface_style_graph(tmp / "w600k_like.onnx", inside=True)
    assert _run_import(src, "--out", tmp / "model") == 0
    return src, tmp / "model"


def test_detects_inside_normalisation_and_writes_a_model_folder(imported, capsys):
    src, folder = imported
    model = ModelBundle(folder)
    contract = model.contract()
    assert (contract.embedding_size, contract.input_size, contract.colour_order) == (256, 112, "RGB")
    assert contract.extra["source_input"]["normalisation"] == "inside"
    assert contract.model_version.startswith("imported-")
    assert find_graph(folder).name == "w600k_like.onnx" and model.interop_graph is not None
    assert model.calibration().threshold is None  # nothing invented
    session = ort.InferenceSession(str(find_graph(folder)), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input" and [o.name for o in session.get_outputs()] == ["embedding"]
    # The CLI says what it detected.
    folder2 = folder.parent / "again"
    assert _run_import(src, "--out", folder2) == 0
    out = capsys.readouterr().out
    assert "detected: input 'input.1' 112x112 RGB, fed 0-255" in out and "embedding '683' of 256" in out
    assert ModelBundle(folder2).contract().contract_id == contract.contract_id  # same source, same contract


@contextlib.contextmanager
def uncalibrated_service(folder):
    """The service on an imported (not calibrated) ``folder``: (client, key header, a bundled
    photo, its /v1/embed answer), after checking that verify without a threshold is refused
    (no threshold is invented)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from service.testing import SAMPLES, wait_ready

    photo = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg").read_bytes()
    key = {"X-API-Key": "test-key-0123456789abcdef"}
    settings = Settings(model=folder, api_keys=[key["X-API-Key"]], device="cpu")
    with TestClient(create_app(settings, announce_key=False)) as client:
        wait_ready(client.get)
        r = client.post("/v1/embed", files={"image": photo}, headers=key)
        assert r.status_code == 200, r.text
        v = client.post("/v1/verify", files={"image_a": photo, "image_b": photo}, headers=key)
        assert v.status_code == 422 and v.json()["error"]["code"] == "threshold_required"
        yield client, key, photo, r.json()


def test_served_embedding_is_the_source_graph_on_the_service_crop(imported):
    from facerec.runtime import FacePipeline, OnnxRuntimeBackend

    src, folder = imported
    with uncalibrated_service(folder) as (client, key, photo, served):
        # A request's own threshold is marked as such.
        v = client.post("/v1/verify", files={"image_a": photo, "image_b": photo}, data={"threshold": "0.4"},
                        headers=key).json()
        assert v["operating_point"] == {"far": None, "calibrated_on": None, "source": "request"}
        models = client.get("/v1/models", headers=key).json()
        assert models["verification"]["threshold"] is None and models["contract"]["embedding_size"] == 256
    crop = FacePipeline(OnnxRuntimeBackend(find_graph(folder), device="cpu"), keep_crops=True).process(photo).faces[0].crop
    direct = _source(src, crop.transpose(2, 0, 1)[None].astype(np.float32))  # insightface feeds 0-255 here
    assert len(served["embedding"]) == 256
    assert _cos(served["embedding"], direct) >= 0.999


def test_outside_normalisation_and_bgr(tmp_path):
    from facerec.export.parity import random_faces
    from facerec.runtime import OnnxRuntimeBackend

    src = insightface_style_graph(tmp_path / "bgr.onnx", inside=False, dim=128, size=128, input_name="data")
    assert _run_import(src, "--out", tmp_path / "m", "--bgr") == 0
    backend = OnnxRuntimeBackend(find_graph(tmp_path / "m"), device="cpu")
    assert backend.contract.input_size == 128 and backend.contract.extra["source_input"]["colour_order"] == "BGR"
    faces = random_faces(3, size=128, seed=5)  # RGB crops
    got = backend.run(faces)["embedding"]
    bgr = faces[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)
    ref = _source(src, (bgr - 127.5) / 127.5)
    assert min(_cos(g, r) for g, r in zip(got, ref)) >= 0.99999
    # Without --bgr the same graph is another model (another input convention, another contract).
    assert _run_import(src, "--out", tmp_path / "rgb") == 0
    assert ModelBundle(tmp_path / "rgb").contract().contract_id != backend.contract.contract_id


def test_our_own_export_reimported_gives_the_same_embeddings(tmp_path):
    import torch

    from facerec.export import export_bundle
    from facerec.export.parity import random_faces
    from facerec.models import create_model
    from facerec.runtime import OnnxRuntimeBackend

    torch.manual_seed(0)
    export_bundle(create_model("mobilefacenet"), tmp_path / "ours", model_name="mobilefacenet", version="t1",
                  fp16=False, torch_artifact=False, interop=False, dynamo=False)
    assert _run_import(find_graph(tmp_path / "ours"), "--out", tmp_path / "re") == 0
    faces = random_faces(4, seed=3)
    a = OnnxRuntimeBackend(find_graph(tmp_path / "ours"), device="cpu").run(faces)["embedding"]
    b = OnnxRuntimeBackend(find_graph(tmp_path / "re"), device="cpu").run(faces)["embedding"]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert ModelBundle(tmp_path / "re").contract().alignment == "arcface-5pt-112-v1"


def test_a_facerec_graph_keeps_its_own_alignment_when_reimported(tmp_path):
    """A facerec graph carries its contract: re-imported, its crop stays what the contract says (the
    shipped 2.1's 192 px canvas), not insightface's ArcFace default."""
    from facerec.contract import DLIB_CHIP_CANVAS_192, EmbeddingContract

    src = insightface_style_graph(tmp_path / "src.onnx", inside=True)

    def stamp(contract: EmbeddingContract) -> None:  # a facerec contract in the graph, as an export writes it
        model = onnx.load(str(src))
        kept = [p for p in model.metadata_props if p.key != "facerec.contract"]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        model.metadata_props.add(key="facerec.contract", value=contract.to_json())
        onnx.save(model, str(src))

    stamp(EmbeddingContract("stamped", "t1", 256, input_size=112, alignment="arcface-5pt-112-v1"))
    assert _run_import(src, "--out", tmp_path / "same") == 0
    assert ModelBundle(tmp_path / "same").contract().alignment == "arcface-5pt-112-v1"
    stamp(EmbeddingContract("stamped", "t1", 256, input_size=192, alignment=DLIB_CHIP_CANVAS_192))
    with pytest.raises(SystemExit, match="contract says input 192, its input is 112"):
        _run_import(src, "--out", tmp_path / "wrong")
    shipped = Path(__file__).resolve().parents[1] / "models" / "default"
    if EmbeddingContract.from_json((shipped / "contract.json").read_text()).alignment == DLIB_CHIP_CANVAS_192:
        assert _run_import(find_graph(shipped), "--out", tmp_path / "shipped") == 0
        again = ModelBundle(tmp_path / "shipped").contract()
        assert (again.alignment, again.input_size, again.embedding_size) == (DLIB_CHIP_CANVAS_192, 192, 128)


def test_not_a_recognition_graph_is_one_line(tmp_path):
    from onnx import TensorProto, helper

    from facerec.cli.usage import CommandError, user_errors

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 112, 96])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "x.onnx"))
    with pytest.raises(CommandError, match=r"^facerec import: input 'x' must be \(N, 3, S, S\)"):
        with user_errors("facerec import"):
            _run_import(tmp_path / "x.onnx", "--out", tmp_path / "m")
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())
