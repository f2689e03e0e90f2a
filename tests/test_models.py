"""Backbones: registry, forward contract, parameter counts, ViT-FIQA masking, export."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from facerec.models import FaceOutput, create_model, list_models, trainable_models
from facerec.models.export_wrapper import ExportWrapper, export_onnx

pytestmark = pytest.mark.timeout(300)

# Too slow to run forward on 2 CPU cores in the unit suite; their shapes are covered by the smaller
# members of the same family and their sizes by the (meta-device) parameter-count test.
HEAVY = {"iresnet100", "vit_b", "vit_b_fiqa"}


def _x(batch: int = 2, seed: int = 0, size: int = 112) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # the (x/255 - 0.5)/0.5 range


def _param_count(name: str, **overrides) -> int:
    with torch.device("meta"):  # counts without allocating or initialising the weights
        model = create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_variant():
    expected = {
        "iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet",
        "vit_t", "vit_s", "vit_b", "vit_t_fiqa", "vit_s_fiqa", "vit_b_fiqa", "vit_tiny_fiqa",
    }
    assert expected <= set(list_models())


@pytest.mark.parametrize("name", [n for n in list_models() if n not in HEAVY])
def test_forward_contract(name):
    torch.manual_seed(0)
    model = create_model(name)
    # 112 px ArcFace crops; the serving-only models take their own crop (dlib's 150 px chip, the
    # 192 px canvas holding it and an ArcFace crop)
    assert model.input_size == (112 if name in trainable_models() else {"dlib_resnet_v1": 150, "canvas_pair": 192}[name])
    assert isinstance(model.has_quality, bool)
    x = _x(size=model.input_size)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            out = model(x, return_features=True)
        assert isinstance(out, FaceOutput)
        assert out.embedding.shape == (2, model.embedding_size)
        assert out.embedding.dtype == torch.float32
        assert torch.isfinite(out.embedding).all()
        if model.has_quality:
            assert out.quality is not None and out.quality.shape == (2,)
            assert torch.isfinite(out.quality).all()
        else:
            assert out.quality is None
        assert [f.shape for f in out.features] == [(2, c) for c in model.feature_dims]
        assert all(torch.isfinite(f).all() for f in out.features)
    with torch.no_grad():
        assert model(x).features is None


def test_serving_only_models_are_not_offered_for_training():
    from training.config import Config

    assert {"dlib_resnet_v1", "canvas_pair"} <= set(list_models()) - set(trainable_models())
    assert "vit_tiny_fiqa" in trainable_models()
    base = {"model": {"name": "dlib_resnet_v1"}}
    with pytest.raises(ValueError, match="not trained here; train one of .*vit_tiny_fiqa"):
        Config.model_validate(base)


def test_canvas_pair_is_each_network_on_its_own_crop():
    """The recognizer reads the canvas's exact window, the quality model the crop of the fixed grid:
    re-derived here with a slice and torch's grid_sample on the canvas."""
    from facerec.data.align import CANVASES

    torch.manual_seed(0)
    pair = create_model("canvas_pair", quality_overrides={"depth": 1}).eval()
    layout = CANVASES["dlib-chip-5pt-150-canvas-192-v1"]
    x = _x(2, 3, 192)
    (ox, oy), s = layout.offset, layout.primary_size
    grid = torch.from_numpy(layout.secondary_grid()[None]).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = pair(x)
        emb = pair.recognizer(x[:, :, oy:oy + s, ox:ox + s]).embedding
        q = pair.quality_model(F.grid_sample(x, grid, mode="bilinear", align_corners=False)).quality
        shifted = pair(torch.roll(x, 3, dims=3))
    assert torch.equal(out.embedding, emb) and torch.allclose(out.quality, q, atol=1e-6)
    assert not torch.allclose(shifted.embedding, out.embedding, atol=1e-3)  # the window moves with the input
    with pytest.raises(ValueError, match="no quality output"):
        create_model("canvas_pair", quality="mobilefacenet")


def test_parameter_counts():
    # iresnet50: insightface's iresnet50 prints "Total Parameters: 43590848" (fc 25088 -> 512); the
    # issue asks for ~43.6 M within 0.5 %. ViT counts: arcface_torch built and counted in
    # shared/reference/methods.md section 5.4 (vit_t 19.14 M, vit_s 76.02 M, vit_b 113.83 M).
    assert _param_count("iresnet50") == pytest.approx(43.6e6, rel=0.005)
    assert _param_count("iresnet50") == 43_590_848
    assert _param_count("vit_s") == pytest.approx(76.02e6, rel=0.001)
    assert _param_count("vit_t") == pytest.approx(19.14e6, rel=0.001)
    assert _param_count("vit_b") == pytest.approx(113.83e6, rel=0.001)
    # The quality token adds its own token, one pos-embed slot and BN(D) + Linear(D -> 1).
    assert _param_count("vit_s_fiqa") - _param_count("vit_s") == 512 * 5
    assert 1e6 <= _param_count("mobilefacenet") <= 3e6
    assert _param_count("iresnet18") < _param_count("iresnet34") < _param_count("iresnet100")


def test_vit_tiny_fiqa_ships_under_25_mb():
    buffer = io.BytesIO()
    torch.save(create_model("vit_tiny_fiqa").state_dict(), buffer)
    assert buffer.tell() <= 25e6


def _encoder_inputs(model, runs: int, batch: int) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            for seed in range(runs):
                model(_x(batch, seed))
    finally:
        handle.remove()
    return captured


def _quality_token_present(tokens: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """(B,) bool: does each sample's encoder input contain the quality token (+ its pos-embed)?"""
    distance = (tokens - expected.view(1, 1, -1)).abs().amax(dim=-1)  # (B, N)
    return (distance < 1e-6).any(dim=1)


def test_quality_token_is_never_masked():
    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", mask_ratio=0.9, depth=2).train()
    expected = (model.quality_token + model.pos_embed[:, 0]).detach().view(-1)
    for tokens in _encoder_inputs(model, runs=25, batch=8):
        assert tokens.shape[1] == 1 + model.keep_count()
        assert _quality_token_present(tokens, expected).all()
        assert torch.equal(tokens[:, 0], expected.expand(tokens.shape[0], -1))


def test_presence_check_catches_the_official_masking():
    # The official ViT-FIQA masks all 145 tokens (quality token included) with an MAE-style shuffle;
    # at ratio 0.9 the check above must notice samples that lost the quality token.
    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", mask_ratio=0.0, depth=1).eval()
    expected = (model.quality_token + model.pos_embed[:, 0]).detach().view(-1)
    full = _encoder_inputs(model, runs=1, batch=64)[0]  # (64, 145, D), nothing masked in eval
    keep = torch.rand(64, full.shape[1]).argsort(dim=1)[:, : int(145 * 0.1)]
    official = torch.gather(full, 1, keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert not _quality_token_present(official, expected).all()


def test_masking_only_in_training_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", mask_ratio=0.5, drop_path_rate=0.0, depth=2)
    head_inputs: list[torch.Tensor] = []
    model.head.register_forward_pre_hook(lambda _m, args: head_inputs.append(args[0].detach()))
    mask_token = model.mask_token.detach().view(-1)

    def masked_slots(tokens: torch.Tensor) -> torch.Tensor:
        return ((tokens - mask_token).abs().amax(dim=-1) == 0).sum(dim=1)

    model.train()
    assert _encoder_inputs(model, runs=1, batch=4)[0].shape[1] == 1 + model.keep_count()
    assert (masked_slots(head_inputs[-1]) == model.num_patches - model.keep_count()).all()
    with torch.no_grad():
        a, b = model(_x()), model(_x())
    assert not torch.allclose(a.embedding, b.embedding)  # different random masks

    model.eval()
    assert _encoder_inputs(model, runs=1, batch=4)[0].shape[1] == 1 + model.num_patches
    assert (masked_slots(head_inputs[-1]) == 0).all()
    with torch.no_grad():
        a, b = model(_x(), return_features=True), model(_x(), return_features=True)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.quality, b.quality)
    assert all(torch.equal(f, g) for f, g in zip(a.features, b.features))

    unmasked = create_model("vit_tiny_fiqa", mask_ratio=0.0, depth=1).train()
    assert _encoder_inputs(unmasked, runs=1, batch=2)[0].shape[1] == 1 + unmasked.num_patches


def test_gradients_reach_quality_token_and_head():
    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", mask_ratio=0.9, depth=2).train()
    out = model(_x(4))
    (out.quality.square().sum() + out.embedding.square().mean()).backward()
    assert model.quality_token.grad is not None and model.quality_token.grad.abs().sum() > 0
    for p in model.quality_head.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.mask_token.grad.abs().sum() > 0


def test_no_weight_decay_names_are_parameters():
    model = create_model("vit_tiny_fiqa")
    names = model.no_weight_decay()
    assert names == {"pos_embed", "mask_token", "quality_token"}
    assert names <= {n for n, _ in model.named_parameters()}
    assert "quality_token" not in create_model("vit_t", depth=2).no_weight_decay()


class _CountSDPA(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_vit_attention_uses_fused_sdpa():
    model = create_model("vit_tiny_fiqa").eval()
    counter = _CountSDPA()
    with counter, torch.no_grad():
        model(_x())
    assert counter.calls == len(model.blocks)


def test_iresnet_channels_last_matches():
    torch.manual_seed(0)
    model = create_model("iresnet18").eval()
    x = _x()
    with torch.no_grad():
        reference = model(x).embedding
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last)).embedding
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_vit_compiles_without_graph_breaks():
    model = create_model("vit_tiny_fiqa", depth=2).train()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    out = compiled(_x(), return_features=True)
    assert out.quality.shape == (2,) and len(out.features) == len(model.feature_dims)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's notice
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["mobilefacenet", "vit_tiny_fiqa"])
def test_onnx_export_matches_torch(name, dynamo, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model(name).eval()
    path = tmp_path / f"{name}.onnx"
    names = export_onnx(model, path, return_features=True, dynamo=dynamo)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    wrapper = ExportWrapper(model, return_features=True).eval()
    for batch in (1, 3):
        x = _x(batch, seed=batch)
        with torch.no_grad():
            expected = wrapper(x)
        got = session.run(None, {"input": x.numpy()})
        assert len(got) == len(expected)
        for name_k, ours, ref in zip(names, got, expected):
            assert ours.shape == tuple(ref.shape), name_k
            if name_k == "quality":
                np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-5)
            else:
                cos = F.cosine_similarity(torch.from_numpy(ours).double(), ref.double(), dim=1)
                assert cos.min() >= 0.9999, name_k


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "vit_tiny_fiqa"])
def test_create_model_overrides(name):
    model = create_model(name, embedding_size=256).eval()
    with torch.no_grad():
        assert model(_x()).embedding.shape == (2, 256)


def test_create_model_vit_overrides_and_errors():
    assert create_model("vit_t_fiqa", mask_ratio=0.0, depth=2).mask_ratio == 0.0
    with pytest.raises(ValueError, match="unknown model 'resnet9000'.*iresnet50"):
        create_model("resnet9000")
    with pytest.raises(ValueError, match="mask_ratio"):
        create_model("vit_tiny_fiqa", mask_ratio=1.0)
    with pytest.raises(TypeError):
        create_model("mobilefacenet", no_such_option=1)
