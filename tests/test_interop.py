"""The insightface graph of an export: insightface's model zoo loads it as its recognition model and
gets our embedding; facerec itself never takes it for the model it serves."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest

from facerec import bundle
from facerec.bundle import ModelBundle, find_graph

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

SAMPLES = Path(__file__).parent / "data" / "lfw_sample"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A two-block vit_tiny_fiqa (quality head, 3 OOD feature outputs: 5 outputs in all, which
    insightface's router would take for a face detector), exported as `facerec export` does."""
    import torch

    from facerec.export import export_bundle
    from facerec.models import create_model

    out = tmp_path_factory.mktemp("interop")
    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", depth=2)
    export_bundle(model, out, model_name="vit_tiny_fiqa", overrides={"depth": 2}, version="t1",
                  fp16=False, torch_artifact=False)
    return out


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_export_writes_a_single_output_graph_that_facerec_never_serves(folder):
    full = folder / "vit_tiny_fiqa.onnx"
    interop = folder / bundle.interop_graph_name("vit_tiny_fiqa")
    assert interop.name == "vit_tiny_fiqa.insightface.onnx" and interop.is_file()
    model = ModelBundle(folder)
    assert find_graph(folder) == full and model.fp32_graph == full and model.interop_graph == interop
    assert model.serving_file() == (full, "onnxruntime")
    assert len(ort.InferenceSession(str(full), providers=["CPUExecutionProvider"]).get_outputs()) >= 5
    session = ort.InferenceSession(str(interop), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert [o.name for o in session.get_outputs()] == ["embedding"]
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 112, 112]
    meta = bundle.read_metadata(interop)
    assert meta["facerec.contract_id"] == model.contract().contract_id  # servable on its own too
    assert not set(meta) & {bundle.METADATA_PREFIX + k for k in bundle.CALIBRATION_KEYS}


def test_insightface_loads_it_as_arcface_with_our_embedding(folder):
    pytest.importorskip("insightface")
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    from facerec.runtime import FacePipeline, OnnxRuntimeBackend

    interop = ModelBundle(folder).interop_graph
    rec = get_model(str(interop), providers=["CPUExecutionProvider"])
    assert isinstance(rec, ArcFaceONNX)
    assert (rec.input_mean, rec.input_std, rec.input_size) == (127.5, 127.5, (112, 112))
    pipeline = FacePipeline(OnnxRuntimeBackend(find_graph(folder), device="cpu"), keep_crops=True)
    for photo in sorted(SAMPLES.glob("*/*.jpg"))[:3]:
        face = pipeline.process(photo.read_bytes()).faces[0]
        # insightface works on OpenCV's BGR images and swaps them to RGB itself.
        feat = rec.get_feat(np.ascontiguousarray(face.crop[:, :, ::-1]))
        assert feat.shape == (1, 512)
        assert _cos(feat, face.embedding) >= 0.999


def test_cli_interop_only_adds_it_to_a_folder(folder, tmp_path, capsys):
    from facerec.cli import export as cli
    from facerec.cli.usage import CommandError, user_errors

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / "vit_tiny_fiqa.insightface.onnx").unlink()
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["--interop-only", "--out", str(copy)])) == 0
    assert ModelBundle(copy).interop_graph == copy / "vit_tiny_fiqa.insightface.onnx"
    assert "insightface model zoo" in capsys.readouterr().out
    # Run again: the folder's graph is still the full one, the interop graph is replaced, not doubled.
    assert cli.run(parser.parse_args(["--interop-only", "--out", str(copy)])) == 0
    assert sorted(p.name for p in copy.glob("*.onnx")) == ["vit_tiny_fiqa.insightface.onnx", "vit_tiny_fiqa.onnx"]
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CommandError, match="^facerec export: .*expected one fp32 ONNX graph, found none"):
        with user_errors("facerec export"):
            cli.run(parser.parse_args(["--interop-only", "--out", str(tmp_path / "empty_dir")]))
