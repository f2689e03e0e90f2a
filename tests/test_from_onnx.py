"""training.from_onnx: a shipped graph back into trainable torch weights (fine-tuning model 2.0)."""

import dataclasses

import pytest
import torch

from facerec.contract import EmbeddingContract
from facerec.export.onnx import export_model
from facerec.export.parity import normalise, random_faces
from facerec.models import create_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

NAME, OVERRIDES = "vit_tiny_fiqa", {"depth": 2}


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """A depth-2 ViT-FIQA whose BatchNorms carry non-trivial statistics, exported by the default
    (dynamo) exporter, which folds Linear + BatchNorm1d into one Gemm and renames MatMul weights."""
    torch.manual_seed(3)
    model = create_model(NAME, **OVERRIDES)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    model.eval()
    out = tmp_path_factory.mktemp("from_onnx")
    result = export_model(model, out / "m.onnx", model_name=NAME, overrides=OVERRIDES, version="t1")
    (out / "contract.json").write_text(result.contract.to_json())
    return model, out


def test_rebuilt_model_reproduces_the_original(graph, tmp_path):
    from training.from_onnx import main

    original, folder = graph
    assert main([str(folder), "--out", str(tmp_path / "model.pt")]) == 0
    data = torch.load(tmp_path / "model.pt", weights_only=True)
    assert data["model_name"] == NAME and data["model_kwargs"] == OVERRIDES
    rebuilt = create_model(NAME, **OVERRIDES)
    rebuilt.load_state_dict(data["model"])
    x = torch.from_numpy(normalise(random_faces(4, seed=11)))
    with torch.no_grad():
        a, b = original.eval()(x, return_features=True), rebuilt.eval()(x, return_features=True)
    torch.testing.assert_close(b.embedding, a.embedding, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.quality, a.quality, atol=1e-5, rtol=1e-4)
    for f, g in zip(b.features, a.features):
        torch.testing.assert_close(f, g, atol=1e-5, rtol=1e-4)
    # Weights the graph holds under their own names come back bit for bit; renamed MatMul weights too.
    sd_a, sd_b = original.state_dict(), rebuilt.state_dict()
    assert torch.equal(sd_b["blocks.1.attn.qkv.weight"], sd_a["blocks.1.attn.qkv.weight"])
    assert torch.equal(sd_b["head.token_proj.weight"], sd_a["head.token_proj.weight"])
    assert torch.equal(sd_b["quality_head.0.running_var"], sd_a["quality_head.0.running_var"])


def test_unfolded_batchnorm_takes_its_statistics_from_images(graph, tmp_path):
    """With calibration images, the unfolded BN's running statistics are those of its input on them,
    so training-mode BN (batch statistics) starts where eval mode is."""
    from training.from_onnx import _unfold, rebuild

    _, folder = graph
    x = torch.from_numpy(normalise(random_faces(64, seed=2)))
    model = create_model(NAME, **OVERRIDES)
    rebuild(model, folder / "m.onnx", x)
    with torch.no_grad():
        eval_out = model.eval()(x).embedding
        model.head.bn1.train(), model.head.bn2.train()  # batch statistics; no patch dropping
        train_out = model(x).embedding
    rel = (train_out - eval_out).norm() / eval_out.norm()
    assert rel < 0.01, rel
    # the direct re-derivation of one unfolded pair: eval BN(W z) == W z + b
    lin, bn = model.head.fc2, model.head.bn2
    z = torch.randn(5, lin.in_features)
    w, b = torch.randn(lin.out_features, lin.in_features), torch.randn(lin.out_features)
    _unfold(model, "head.fc2", "head.bn2", w.numpy(), b.numpy(), None)
    with torch.no_grad():
        torch.testing.assert_close(bn.eval()(lin(z)), z @ w.T + b, atol=1e-5, rtol=1e-5)


def test_graph_of_another_architecture_is_refused(graph, tmp_path, capsys):
    from training.from_onnx import main

    _, folder = graph
    contract = EmbeddingContract.from_json((folder / "contract.json").read_text())
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "m.onnx").write_bytes((folder / "m.onnx").read_bytes())
    contract = dataclasses.replace(contract, extra={"overrides": {"depth": 3}})
    (wrong / "contract.json").write_text(contract.to_json())
    assert main([str(wrong), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blocks.2.attn.qkv expects" in err[0] and "not a graph of this architecture" in err[0]
    assert not (tmp_path / "x.pt").exists()
