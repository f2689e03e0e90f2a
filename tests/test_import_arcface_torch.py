"""``facerec import backbone.pth --arch rNN|vit_X``: arcface_torch state dicts give exactly arcface_torch's outputs.

The references below are arcface_torch's ``backbones/iresnet.py`` (IBasicBlock / IResNet, fp16=False)
and ``backbones/vit.py`` (VisionTransformer, norm_layer="ln", eval mode) re-written from their
published attribute names and forward passes, so their ``state_dict()`` has the keys of a real
``backbone.pth``; the ViT's attention is written out (not torch's fused kernel). Weights, norms and BN
running statistics are random, so a wrongly mapped or transposed tensor, a BN swapped for another or
a different output layer order changes the embedding.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from facerec.cli import main
from facerec.contract import ARCFACE_TEMPLATE_112
from facerec.export.arcface_torch import StateDictImportError, build_from_state_dict
from facerec.export.parity import normalise, random_faces, row_cosine

LAYERS = {"r18": [2, 2, 2, 2], "r50": [3, 4, 14, 3]}


# ---- arcface_torch's iresnet.py, same attribute names and forward (fp16=False) -------------------
def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class RefIBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return out


class RefIResNet(nn.Module):
    fc_scale = 7 * 7

    def __init__(self, layers, dropout=0, num_features=512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes, eps=1e-05))
        layers = [RefIBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [RefIBasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.prelu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        x = self.features(x)
        return x
# ------------------------------------------------------------------------------------------------


def reference(arch: str, num_features: int = 512, seed: int = 0) -> RefIResNet:
    """arcface_torch's network with random weights, PReLU slopes, BN affine and running statistics."""
    torch.manual_seed(seed)
    net = RefIResNet(LAYERS[arch], num_features=num_features)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(1234)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.5)
            elif isinstance(m, nn.Linear):
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def _faces(n: int = 4, seed: int = 7) -> np.ndarray:
    return random_faces(n, seed=seed)


@pytest.mark.parametrize("arch", ["r18", "r50"])
def test_mapped_model_gives_arcface_torch_outputs_exactly(arch):
    ref = reference(arch)
    model = build_from_state_dict(ref.state_dict(), arch)
    x = torch.from_numpy(normalise(_faces()))
    with torch.no_grad():
        want = ref(x)
        got = model(x).embedding
    assert want.abs().mean() > 1e-2  # a live embedding, not one collapsed to the BN1d shift
    assert float((got - want).abs().max()) <= 1e-4


def test_ddp_prefixed_keys_load():
    ref = reference("r18")
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    x = torch.from_numpy(normalise(_faces(2)))
    with torch.no_grad():
        assert float((build_from_state_dict(state, "r18")(x).embedding - ref(x)).abs().max()) <= 1e-4


@pytest.fixture(scope="module")
def imported_r18(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arcface_torch")
    ref = reference("r18", num_features=256, seed=3)
    torch.save(ref.state_dict(), tmp / "backbone.pth")
    rc = main(["import", str(tmp / "backbone.pth"), "--arch", "r18", "--out", str(tmp / "model")])
    return ref, tmp / "model", rc


def test_cli_exports_a_model_folder_whose_graph_is_arcface_torch(imported_r18, capsys):
    from facerec.bundle import ModelBundle

    ref, folder, rc = imported_r18
    assert rc == 0
    bundle = ModelBundle(folder)
    contract = bundle.contract()
    assert contract.model_name == "iresnet18" and contract.embedding_size == 256
    assert contract.alignment == ARCFACE_TEMPLATE_112 and contract.model_version.startswith("arcface_torch-r18-")
    assert json.loads((folder / "contract.json").read_text())["contract_id"] == contract.contract_id
    report = json.loads((folder / "export_report.json").read_text())
    assert report["imported_from"]["arch"] == "r18"
    faces = _faces(3, seed=11)
    with torch.no_grad():
        want = ref(torch.from_numpy(normalise(faces))).numpy()
    for graph in (bundle.graph(), bundle.interop_graph):
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        feed = normalise(faces)
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        assert row_cosine(want, got) >= 0.9999, graph
    assert bundle.calibration().threshold is None  # never an invented threshold


def _cli_error(capsys, *argv) -> str:
    rc = None
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as err:
        rc = err.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    return err


def test_wrong_arch_is_one_line_exit_2(tmp_path, capsys):
    torch.save(reference("r18").state_dict(), tmp_path / "backbone.pth")
    err = _cli_error(capsys, "import", tmp_path / "backbone.pth", "--arch", "r50", "--out", tmp_path / "m")
    assert "not an arcface_torch r50 state dict: missing keys" in err
    err = _cli_error(capsys, "import", tmp_path / "backbone.pth", "--arch", "r99", "--out", tmp_path / "m")
    assert "invalid choice" in err
    err = _cli_error(capsys, "import", tmp_path / "backbone.pth", "--out", tmp_path / "m")
    assert "needs --arch" in err
    assert not (tmp_path / "m").exists()


def test_unexpected_keys_are_one_line_exit_2(tmp_path, capsys):
    state = reference("r18").state_dict()
    state["head.weight"] = torch.zeros(10, 512)  # e.g. a checkpoint with the margin head's weights
    torch.save(state, tmp_path / "backbone.pth")
    err = _cli_error(capsys, "import", tmp_path / "backbone.pth", "--arch", "r18", "--out", tmp_path / "m")
    assert err.startswith("facerec import: not an arcface_torch r18 state dict: unexpected keys head.weight")
    with pytest.raises(StateDictImportError, match="no 2-d 'fc.weight'"):
        build_from_state_dict({"x": torch.zeros(1)}, "r18")


def test_r50_graph_is_arcface_torch(tmp_path):
    from facerec.bundle import find_graph
    from facerec.export.arcface_torch import import_arcface_torch

    ref = reference("r50", seed=5)
    torch.save(ref.state_dict(), tmp_path / "backbone.pth")
    import_arcface_torch(tmp_path / "backbone.pth", tmp_path / "model", "r50", fp16=False, torch_artifact=False)
    faces = _faces(2, seed=13)
    with torch.no_grad():
        want = ref(torch.from_numpy(normalise(faces))).numpy()
    session = ort.InferenceSession(str(find_graph(tmp_path / "model")), providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {"input": normalise(faces)})[0]
    assert row_cosine(want, got) >= 0.9999


# ---- arcface_torch's vit.py (VisionTransformer, norm_layer="ln"), same attribute names and eval forward ----
class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # written out, not SDPA
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RefAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefViT(nn.Module):
    def __init__(self, embed_dim, depth, num_heads=8, num_classes=512, img_size=112, patch_size=9):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = RefPatchEmbed(patch_size, embed_dim)
        self.num_patches = (img_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.blocks = nn.ModuleList([RefBlock(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_classes, bias=False),
            nn.BatchNorm1d(num_classes, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def forward(self, x):  # eval: no token masking
        b = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x.float())
        return self.feature(torch.reshape(x, (b, self.num_patches * self.embed_dim)))
# ------------------------------------------------------------------------------------------------

VIT = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24)}  # arcface_torch's get_model


def vit_reference(arch: str, num_features: int = 512, seed: int = 0, depth: int | None = None) -> RefViT:
    """arcface_torch's ViT with random weights everywhere: LayerNorm and BN affine, BN statistics,
    biases and the position embedding (a zero or unit default would hide a swapped tensor)."""
    torch.manual_seed(seed)
    dim, layers = VIT[arch]
    net = RefViT(dim, depth or layers, num_classes=num_features)
    with torch.no_grad():
        net.pos_embed.normal_(0, 0.5)
        net.mask_token.normal_(0, 0.02)
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.5 * m.in_features ** -0.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, nn.Conv2d):
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def test_vit_s_mapped_model_gives_arcface_torch_outputs_exactly():
    ref = vit_reference("vit_s")
    model = build_from_state_dict(ref.state_dict(), "vit_s")
    assert type(model).__name__ == "FaceViT" and len(model.blocks) == 12 and model.embed_dim == 512
    x = torch.from_numpy(normalise(_faces()))
    with torch.no_grad():
        want = ref(x)
        got = model(x).embedding
    assert want.abs().mean() > 1e-2 and want.std(0).mean() > 1e-2  # live, and differing between faces
    assert float((got - want).abs().max()) <= 1e-4


def test_vit_t_maps_exactly():
    ref = vit_reference("vit_t", num_features=128)
    model = build_from_state_dict(ref.state_dict(), "vit_t")
    assert len(model.blocks) == 12 and model.embed_dim == 256 and model.embedding_size == 128
    x = torch.from_numpy(normalise(_faces(2)))
    with torch.no_grad():
        assert float((model(x).embedding - ref(x)).abs().max()) <= 1e-4


def test_vit_b_keys_and_shapes_map_and_wrong_archs_are_refused():
    # On the meta device: names and shapes only, no 100 M random weights (vit_b is vit_s twice as deep,
    # whose values are checked above). Every refusal is decided before a tensor is loaded.
    with torch.device("meta"):
        model = build_from_state_dict(vit_reference("vit_b").state_dict(), "vit_b")
        assert len(model.blocks) == 24 and model.embed_dim == 512
        with pytest.raises(StateDictImportError, match="not an arcface_torch vit_s state dict: shapes differ"):
            build_from_state_dict(vit_reference("vit_t").state_dict(), "vit_s")
        with pytest.raises(StateDictImportError, match="not an arcface_torch vit_b state dict: missing keys blocks.12"):
            build_from_state_dict(vit_reference("vit_s").state_dict(), "vit_b")
        with pytest.raises(StateDictImportError, match=r"arcface_torch ViT state dict: no 2-d 'feature\.2\.weight'"):
            build_from_state_dict(reference("r18").state_dict(), "vit_s")
        with pytest.raises(StateDictImportError, match="not an arcface_torch IResNet state dict: no 2-d .fc.weight."):
            build_from_state_dict(vit_reference("vit_s").state_dict(), "r50")


def test_vit_t_graphs_are_arcface_torch(tmp_path):
    from facerec.bundle import ModelBundle
    from facerec.export.arcface_torch import import_arcface_torch

    ref = vit_reference("vit_t", num_features=256, seed=4)
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "backbone.pth")
    import_arcface_torch(tmp_path / "backbone.pth", tmp_path / "model", "vit_t", fp16=False, torch_artifact=False,
                         dynamo=False)
    bundle = ModelBundle(tmp_path / "model")
    contract = bundle.contract()
    assert contract.model_name == "vit_t" and contract.embedding_size == 256
    assert contract.model_version.startswith("arcface_torch-vit_t-")
    faces = _faces(3, seed=17)
    with torch.no_grad():
        want = ref(torch.from_numpy(normalise(faces))).numpy()
    for graph in (bundle.graph(), bundle.interop_graph):
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: normalise(faces)})[0]
        assert row_cosine(want, got) >= 0.9999, graph
