"""The torch port of dlib's face-recognition ResNet against dlib itself.

The parser needs only the weights (face_recognition_models); the parity tests need dlib-bin too
and cut real face chips from the bundled LFW sample with dlib's own HOG detector, 5-point shape
predictor and ``get_face_chip``. Both skip cleanly where the optional extra is not installed.
"""

import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from teacher_helpers import sample_paths  # noqa: E402

from facerec.data.datasets import read_rgb  # noqa: E402
from facerec.teachers.dlib_port import (  # noqa: E402
    DlibFormatError, dlib_chip_matrix, embed_chips, export_dlib_onnx, load_dlib_resnet, read_dlib_net)
from facerec.teachers.dlib_teacher import SHAPE_5, WEIGHTS, MissingExtraError, default_models_dir  # noqa: E402

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def weights() -> Path:
    try:
        path = default_models_dir() / WEIGHTS
    except MissingExtraError as err:
        pytest.skip(str(err))
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def port(weights):
    torch.set_num_threads(1)
    return load_dlib_resnet(weights)


@pytest.fixture(scope="module")
def dlib_parts(weights):
    dlib = pytest.importorskip("dlib")
    return dlib, dlib.face_recognition_model_v1(str(weights)), \
        dlib.shape_predictor(str(weights.parent / SHAPE_5)), dlib.get_frontal_face_detector()


@pytest.fixture(scope="module")
def faces(dlib_parts):
    """Six LFW sample photos (three people, two each) with dlib's 5-point shape of the face."""
    _, _, shape, hog = dlib_parts
    people = sorted({p.parent.name for p in sample_paths()})[:3]
    out = []
    for name in people:
        for path in [p for p in sample_paths() if p.parent.name == name][:2]:
            image = np.ascontiguousarray(read_rgb(path))
            boxes = hog(image, 1)
            assert len(boxes), f"HOG found no face in {path.name}"
            out.append((image, shape(image, max(boxes, key=lambda r: r.area()))))
    return out


@pytest.fixture(scope="module")
def chips(dlib_parts, faces):
    """dlib's own 150 x 150 chips of those faces."""
    dlib = dlib_parts[0]
    return np.stack([np.asarray(dlib.get_face_chip(image, shape, 150, 0.25)) for image, shape in faces])


def test_parser_reads_the_whole_network(weights):
    meta, layers = read_dlib_net(weights)  # raises unless every byte is accounted for
    assert meta["input_size"] == (150, 150)
    np.testing.assert_allclose(meta["input_means"], (122.782, 117.001, 104.298), atol=1e-4)
    kinds = Counter(layer.kind for layer in layers)
    assert kinds == {"con": 29, "affine": 29, "relu": 29, "add_prev": 14, "avg_pool": 5,
                     "max_pool": 1, "fc": 1}
    assert layers[0].arrays["weight"].shape == (32, 3, 7, 7)
    assert layers[0].info == {"kernel": (7, 7), "stride": (2, 2), "padding": (0, 0)}
    assert layers[-1].arrays["weight"].shape == (256, 128) and "bias" not in layers[-1].arrays
    assert all(np.isfinite(a).all() for layer in layers for a in layer.arrays.values())


def test_port_architecture(port):
    strides = [b.conv1.stride[0] for b in port.blocks]
    assert strides == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 2, 1, 1, 2]
    assert [b.conv2.out_channels for b in port.blocks] == [32] * 3 + [64] * 4 + [128] * 3 + [256] * 4
    assert sum(p.numel() for p in port.parameters()) == 5_614_592
    # 150 -> 72 (con 7x7/2, no padding) -> 35 (max-pool 3x3/2) -> 17 -> 8 -> 4 -> 2: at 8 -> 4 and
    # 4 -> 2 the unpadded 3x3/2 convolution gives 3 and 1, and dlib's add_prev zero-pads them up
    # to the 2x2 average-pooled shortcut; the first block of each stage zero-pads its channels
    assert [b.out_shape for b in port.blocks] == [(32, 35)] * 3 + [(64, 17)] * 4 + [(128, 8)] * 3 \
        + [(256, 4)] * 3 + [(256, 2)]
    last = port.blocks[-1]
    assert last.pad_body == (0, 1, 0, 1, 0, 0) and last.pad_short == (0, 0, 0, 0, 0, 0)
    assert port.blocks[3].pad_short == (0, 0, 0, 0, 0, 32) and port.blocks[3].pad_body == (0,) * 6


def test_registry_model_is_the_port_without_the_file(weights, port):
    """``dlib_resnet_v1`` is built from the fixed layout alone (a torch artefact needs no .dat): the
    port's weights load into it key for key, and it computes the port's descriptor behind facerec's
    (x - 127.5) / 127.5 input."""
    from facerec.models import create_model, list_models, trainable_models

    model = create_model("dlib_resnet_v1").eval()
    assert {"net." + k for k in port.state_dict()} == set(model.state_dict())
    model.load_state_dict({"net." + k: v for k, v in port.state_dict().items()})
    x = torch.rand(2, 3, 150, 150) * 255
    with torch.no_grad():
        out = model((x - 127.5) / 127.5, return_features=True)
        want = port(x)
    assert torch.allclose(out.embedding, want, atol=1e-5) and out.quality is None and out.features == []
    assert "dlib_resnet_v1" in list_models() and "dlib_resnet_v1" not in trainable_models()


def test_a_file_of_another_layout_is_refused(weights):
    from facerec.models.dlib_resnet import DlibResNet
    from facerec.teachers.dlib_port import fill_dlib_resnet

    meta, layers = read_dlib_net(weights)
    with pytest.raises(DlibFormatError, match="residual block|stem"):
        fill_dlib_resnet(DlibResNet(), meta, layers[:4] + layers[11:])  # one block short
    wider = list(layers)
    wider[4] = type(layers[4])("con", {"weight": np.zeros((48, 32, 3, 3), np.float32),
                                       "bias": np.zeros(48, np.float32)}, dict(layers[4].info))
    with pytest.raises(DlibFormatError, match="con layer"):
        fill_dlib_resnet(DlibResNet(), meta, wider)


def test_truncated_or_foreign_files_fail_with_one_clear_error(weights, tmp_path):
    cut = tmp_path / "cut.dat"
    cut.write_bytes(weights.read_bytes()[:1_000_000])
    with pytest.raises(DlibFormatError, match="unexpected end of file|bad"):
        read_dlib_net(cut)
    with pytest.raises(DlibFormatError, match="bad|metric-learning|version"):
        read_dlib_net(weights.parent / SHAPE_5)


def _parity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(np.abs(a - b).max()), float(cos.min())


@pytest.mark.timeout(120)
def test_port_matches_dlib_on_real_face_chips(port, dlib_parts, chips):
    _, net, _, _ = dlib_parts
    ours = embed_chips(port, chips, batch=4)
    theirs = np.array([np.asarray(net.compute_face_descriptor(c)) for c in chips])
    max_abs, min_cos = _parity(ours, theirs)
    assert max_abs <= 1e-4 and min_cos >= 0.9999, (max_abs, min_cos)
    # the raw descriptor, as dlib returns it: not normalised, and same person closer than others
    assert np.all(np.abs(np.linalg.norm(ours, axis=1) - 1) < 0.5)
    dist = np.linalg.norm(ours[:, None] - ours[None], axis=2)
    assert all(dist[i, i + 1] < 0.6 for i in (0, 2, 4))
    assert dist[0, 2] > 0.6 and dist[0, 4] > 0.6 and dist[2, 4] > 0.6


@pytest.mark.timeout(120)
def test_port_matches_dlib_off_the_face_manifold(port, dlib_parts):
    """Noise and flat grey chips drive the zero-padded shortcuts and the ReLUs differently."""
    _, net, _, _ = dlib_parts
    rng = np.random.default_rng(0)
    odd = np.stack([rng.integers(0, 256, (150, 150, 3), dtype=np.uint8),
                    np.full((150, 150, 3), 128, np.uint8),
                    np.zeros((150, 150, 3), np.uint8)])
    ours = embed_chips(port, odd)
    theirs = np.array([np.asarray(net.compute_face_descriptor(c)) for c in odd])
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.timeout(120)
def test_onnx_export_matches_the_port(port, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = export_dlib_onnx(port, tmp_path / "dlib_resnet.onnx")
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")] == [17]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for n in (1, 3):  # the batch axis is dynamic
        x = rng.integers(0, 256, (n, 3, 150, 150)).astype(np.float32)
        got = session.run(["descriptor"], {"chip": x})[0]
        with torch.no_grad():
            want = port(torch.from_numpy(x)).numpy()
        max_abs, min_cos = _parity(got, want)
        assert got.shape == (n, 128) and max_abs <= 1e-4 and min_cos >= 0.9999, (max_abs, min_cos)


def test_chip_matrix_reproduces_dlib_get_face_chip(faces, chips):
    for (image, shape), chip in zip(faces, chips):
        parts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float64)
        ours = cv2.warpAffine(image, dlib_chip_matrix(parts), (150, 150), flags=cv2.INTER_LINEAR)
        diff = np.abs(ours.astype(np.float64) - chip)
        # the geometry is dlib's; what is left is the rounding of the two bilinear interpolations
        # (a wrong half pixel or a 149/150 scale error gives 2-5 grey levels here)
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (diff.mean(), np.percentile(diff, 99))


def test_embed_chips_rejects_other_sizes(port):
    with pytest.raises(ValueError, match=r"\(N, 150, 150, 3\)"):
        embed_chips(port, np.zeros((1, 112, 112, 3), np.uint8))
