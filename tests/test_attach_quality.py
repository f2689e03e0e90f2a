"""``facerec import ... --quality-from``: one graph, a recognizer's embedding and another model's
quality token, each on its own crop of one canvas.

References are computed apart from the code under test: the canvas's ArcFace crop against
``norm_crop`` of the photo itself, the graph's ``GridSample`` against torch's ``grid_sample``, the
embedding against dlib's port on a chip cut by ``cv2.warpAffine``, the quality against the quality
model's own graph.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerec.bundle import ModelBundle, find_graph
from facerec.contract import ARCFACE_TEMPLATE_112, DLIB_CHIP_150, DLIB_CHIP_CANVAS_192
from facerec.data.align import CANVASES, DLIB_CHIP_TEMPLATE_150, alignment_template, norm_crop, umeyama
from facerec.data.image_io import load_image
from facerec.export.attach_quality import bilinear_crop
from facerec.export.parity import normalise

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

sys.path.insert(0, str(Path(__file__).parent))
from test_dlib_port import port, weights  # noqa: E402,F401 - the fixtures (skip without the weights)
from test_import import _run_import  # noqa: E402

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

SAMPLES = sorted((Path(__file__).parent / "data" / "lfw_sample").rglob("*.jpg"))[:6]
CANVAS = CANVASES[DLIB_CHIP_CANVAS_192]


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def faces():
    """(photo, landmarks) of the bundled LFW sample, found by facerec's MTCNN."""
    from facerec.data.detect import create_detector, detect_faces

    detector = create_detector("mtcnn", backend="onnx", device="cpu")
    out = []
    for path in SAMPLES:
        photo = load_image(path)
        found = detect_faces(detector, photo, "largest")
        out.append((photo, np.asarray(found[0].landmarks, np.float64)))
    return out


@pytest.fixture(scope="module")
def quality_model(tmp_path_factory):
    """A small ViT-FIQA (depth 2: the shipped model's token, quality head and feature taps) exported
    as facerec exports: the quality model."""
    from facerec.export import export_bundle
    from facerec.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", depth=2).eval()
    out = tmp_path_factory.mktemp("quality") / "vit"
    export_bundle(model, out, model_name="vit_tiny_fiqa", overrides={"depth": 2}, version="q1", fp16=False,
                  torch_artifact=True, interop=False)  # its .pt: the quality weights of `--torch`
    return out


@pytest.fixture(scope="module")
def combined(weights, quality_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("combined")
    folders = {}
    for precision in ("fp32", "fp16"):
        folders[precision] = root / precision
        extra = ["--store-fp16"] if precision == "fp16" else []
        assert _run_import("--dlib", "--weights", weights, "--quality-from", quality_model, *extra,
                           "--out", folders[precision], "--version", "t21") == 0
    return folders


# ------------------------------------------------------------------ the canvas
def test_canvas_holds_the_chip_as_a_window_and_the_whole_arcface_crop():
    template = alignment_template(DLIB_CHIP_CANVAS_192)
    assert CANVAS.size == 192 and np.allclose(template, DLIB_CHIP_TEMPLATE_150 + [21, 38])
    m = CANVAS.secondary_to_canvas()
    corners = np.array([[0, 0, 1], [111, 0, 1], [0, 111, 1], [111, 111, 1]], np.float64) @ m.T
    assert corners.min() >= 0 and corners.max() <= 191  # no ArcFace pixel falls off the canvas
    # The similarity takes the ArcFace template onto the canvas's: least squares, so only the two
    # templates' difference in shape is left (dlib's mouth sits lower against the eyes: ~3 canvas px,
    # 2 ArcFace px); a wrong offset or scale would leave tens of pixels.
    mapped = np.c_[alignment_template(ARCFACE_TEMPLATE_112), np.ones(5)] @ m.T
    assert np.linalg.norm(mapped - template, axis=1).max() < 4.0


def test_the_chip_window_of_a_canvas_is_the_chip_cut_from_the_photo(faces):
    for photo, landmarks in faces:
        canvas = norm_crop(photo, landmarks, 192, DLIB_CHIP_CANVAS_192)
        chip = cv2.warpAffine(photo, umeyama(landmarks, DLIB_CHIP_TEMPLATE_150)[:2], (150, 150), borderValue=0.0)
        window = canvas[38:188, 21:171].astype(np.float64)
        assert np.abs(window - chip).mean() < 0.5  # the same warp, up to where the origin rounds


def test_the_arcface_crop_resampled_from_the_canvas_is_the_one_cut_from_the_photo(faces):
    for photo, landmarks in faces:
        canvas = normalise(norm_crop(photo, landmarks, 192, DLIB_CHIP_CANVAS_192)[None])
        direct = norm_crop(photo, landmarks, 112, ARCFACE_TEMPLATE_112).astype(np.float64)
        via = bilinear_crop(canvas, CANVAS)[0].transpose(1, 2, 0) * 127.5 + 127.5
        shifted = bilinear_crop(np.roll(canvas, 4, axis=3), CANVAS)[0].transpose(1, 2, 0) * 127.5 + 127.5
        err, wrong = np.abs(via - direct).mean(), np.abs(shifted - direct).mean()
        assert err < 7.0 and err < 0.6 * wrong, (err, wrong)  # resampled twice, yet the same face


def test_bilinear_crop_is_torch_grid_sample():
    canvas = np.random.default_rng(0).normal(size=(2, 3, 192, 192)).astype(np.float32)
    grid = torch.from_numpy(CANVAS.secondary_grid()[None]).expand(2, -1, -1, -1)
    ref = torch.nn.functional.grid_sample(torch.from_numpy(canvas), grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False).numpy()
    # the graph's grid is float32 (1e-5 px): on unit-variance noise that is ~1e-4; a pixel off is ~1
    np.testing.assert_allclose(bilinear_crop(canvas, CANVAS), ref, atol=3e-4)


# ------------------------------------------------------------------ the combined graph
def test_folder_contract_names_the_canvas_and_both_parts(combined, quality_model):
    model = ModelBundle(combined["fp16"])
    c = model.contract()
    assert (c.alignment, c.input_size, c.embedding_size, c.model_version) == (DLIB_CHIP_CANVAS_192, 192, 128, "t21")
    parts = c.extra["combined_from"]
    assert parts["recognizer"]["alignment"] == DLIB_CHIP_150 and "CC0" in parts["recognizer"]["licence"]
    assert parts["quality"]["contract_id"] == ModelBundle(quality_model).contract().contract_id
    assert [o.name for o in _session(model.graph()).get_outputs()] == ["embedding", "quality"]
    card = (combined["fp16"] / "MODEL_CARD.md").read_text()
    assert "Davis King" in card and "quality token of vit_tiny_fiqa q1" in card
    # fp16 storage halves the file; the fp32 one is both networks' weights
    sizes = {k: find_graph(v).stat().st_size for k, v in combined.items()}
    assert sizes["fp16"] < 0.55 * sizes["fp32"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_embedding_is_dlibs_and_quality_is_the_quality_models_on_real_faces(combined, quality_model, port, faces,
                                                                             precision):
    from facerec.teachers.dlib_port import embed_chips

    canvases = np.stack([norm_crop(p, lm, 192, DLIB_CHIP_CANVAS_192) for p, lm in faces])
    emb, quality = _session(find_graph(combined[precision])).run(None, {"input": normalise(canvases)})
    chips = np.stack([cv2.warpAffine(p, umeyama(lm, DLIB_CHIP_TEMPLATE_150)[:2], (150, 150), borderValue=0.0)
                      for p, lm in faces])
    ref = embed_chips(port, chips)
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999  # the window vs an independent chip: the same pixels up to rounding
    crops = bilinear_crop(normalise(canvases), CANVAS)
    ref_q = _session(find_graph(quality_model)).run(["quality"], {"input": crops})[0].reshape(-1)
    np.testing.assert_allclose(quality.reshape(-1), ref_q, atol=1e-4 if precision == "fp32" else 5e-3)
    assert np.ptp(ref_q) > 1e-3  # faces differ, so a constant output could not pass


def test_the_pipeline_serves_the_graphs_quality(combined, faces):
    from facerec.runtime import FacePipeline, load_backend

    pipe = FacePipeline(load_backend(find_graph(combined["fp16"]), device="cpu", threads=1), keep_crops=True)
    photo = cv2.imencode(".png", cv2.cvtColor(faces[0][0], cv2.COLOR_RGB2BGR))[1].tobytes()
    face = pipe.process(photo).faces[0]
    assert face.crop.shape == (192, 192, 3) and face.embedding.shape == (128,)
    _, quality = _session(find_graph(combined["fp16"])).run(None, {"input": normalise(face.crop[None])})
    assert face.quality == pytest.approx(float(quality[0]), abs=1e-5)


# ------------------------------------------------------------------ same crop, and refusals
def test_same_alignment_feeds_both_networks_the_input(tmp_path, quality_model):
    from facerec.export import export_bundle
    from facerec.models import create_model

    torch.manual_seed(1)
    rec = tmp_path / "mfn"
    export_bundle(create_model("mobilefacenet").eval(), rec, model_name="mobilefacenet", version="r1", fp16=False,
                  torch_artifact=False, interop=False, dynamo=False)
    from facerec.export.attach_quality import attach_quality

    report = attach_quality(rec, quality_model, tmp_path / "both")
    graph = find_graph(tmp_path / "both")
    names = [o.name for o in _session(graph).get_outputs()]
    assert names[0] == "embedding" and names[-1] == "quality" and any(n.startswith("feature_") for n in names)
    assert report["combined_from"]["canvas"] is None
    x = normalise(np.random.default_rng(2).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8))
    out = dict(zip(names, _session(graph).run(None, {"input": x})))
    np.testing.assert_allclose(out["embedding"], _session(find_graph(rec)).run(["embedding"], {"input": x})[0],
                               atol=1e-5)
    np.testing.assert_allclose(out["quality"],
                               _session(find_graph(quality_model)).run(["quality"], {"input": x})[0].reshape(-1),
                               atol=1e-5)
    assert ModelBundle(tmp_path / "both").contract().alignment == ARCFACE_TEMPLATE_112


def test_refusals_say_what_is_wrong(tmp_path, weights, quality_model, combined):
    with pytest.raises(SystemExit, match="--store-fp16 is for --quality-from"):
        _run_import("--dlib", "--weights", weights, "--store-fp16", "--out", tmp_path / "a")
    with pytest.raises(SystemExit, match="no such model folder"):
        _run_import("--dlib", "--weights", weights, "--quality-from", tmp_path / "nowhere", "--out", tmp_path / "b")
    dlib_only = tmp_path / "dlib"
    assert _run_import("--dlib", "--weights", weights, "--out", dlib_only) == 0
    with pytest.raises(SystemExit, match="has no quality output"):
        _run_import("--dlib", "--weights", weights, "--quality-from", dlib_only, "--out", tmp_path / "c")
    from facerec.export.attach_quality import AttachQualityError, attach_quality, layout

    with pytest.raises(AttachQualityError, match="has its own quality output"):
        attach_quality(combined["fp32"], quality_model, tmp_path / "d")
    arcface, canvas = ModelBundle(quality_model).contract(), ModelBundle(combined["fp32"]).contract()
    with pytest.raises(AttachQualityError, match="no canvas holds both crops.*registered: dlib-chip-5pt-150-v1 150"):
        layout(arcface, canvas)  # an ArcFace recognizer and a quality model fed the canvas


# ------------------------------------------------------------------ the torch twin
def test_torch_artefact_serves_what_the_graph_serves(weights, quality_model, faces, tmp_path):
    from facerec.runtime import OnnxRuntimeBackend, TorchBackend

    out = tmp_path / "with_torch"
    assert _run_import("--dlib", "--weights", weights, "--quality-from", quality_model, "--store-fp16", "--torch",
                       "--out", out) == 0
    model = ModelBundle(out)
    pt, backend = model.serving_file("torch")
    assert backend == "torch" and pt.name == "dlib_resnet_v1.pt"
    canvases = np.stack([norm_crop(p, lm, 192, DLIB_CHIP_CANVAS_192) for p, lm in faces])
    graph = OnnxRuntimeBackend(model.graph(), device="cpu", threads=1).run(canvases)
    torch_out = TorchBackend(pt, device="cpu", threads=1).run(canvases)
    assert sorted(torch_out) == ["embedding", "quality"] == sorted(graph)
    a, b = graph["embedding"].astype(np.float64), torch_out["embedding"].astype(np.float64)
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9999
    np.testing.assert_allclose(torch_out["quality"].reshape(-1), graph["quality"].reshape(-1), atol=5e-3)
    import json

    report = json.loads((out / "export_report.json").read_text())["torch"]
    assert report["parity"]["embedding_min_cosine"] >= 0.9999 and report["model_name"] == "canvas_pair"


def test_torch_artefact_refusals(weights, quality_model, combined, tmp_path):
    import shutil

    from facerec.export import export_bundle
    from facerec.models import create_model

    with pytest.raises(SystemExit, match="--torch is for --dlib --quality-from"):
        _run_import("--dlib", "--weights", weights, "--torch", "--out", tmp_path / "a")
    with pytest.raises(SystemExit, match="--quality-weights is for --torch"):
        _run_import("--dlib", "--weights", weights, "--quality-from", quality_model, "--quality-weights", "x.pt",
                    "--out", tmp_path / "b")
    no_pt = tmp_path / "no_pt"
    shutil.copytree(quality_model, no_pt, ignore=shutil.ignore_patterns("*.pt"))
    with pytest.raises(SystemExit, match="needs the quality model's torch weights.*--quality-weights"):
        _run_import("--dlib", "--weights", weights, "--quality-from", no_pt, "--torch", "--out", tmp_path / "c")
    torch.manual_seed(5)  # another model's weights: the artefact would not be the graph
    other = tmp_path / "other"
    export_bundle(create_model("vit_tiny_fiqa", depth=2).eval(), other, model_name="vit_tiny_fiqa",
                  overrides={"depth": 2}, version="q2", fp16=False, torch_artifact=True, interop=False)
    with pytest.raises(SystemExit, match="torch artefact differs"):
        _run_import("--dlib", "--weights", weights, "--quality-from", quality_model, "--torch", "--quality-weights",
                    next(other.glob("*.pt")), "--out", tmp_path / "d")
    assert not list((tmp_path / "d").glob("*.pt"))  # nothing half-made is left to be served


def test_photo_attacks_warp_to_the_canvas(faces):
    """fit-ood's photo attacks go through a differentiable twin of the model's own alignment: for
    the canvas it cuts what norm_crop cuts."""
    from facerec.data.align import estimate_norm
    from facerec.ood.attacks import AlignmentWarp

    photo, lm = faces[0]
    m = estimate_norm(lm, 192, DLIB_CHIP_CANVAS_192)
    x = torch.from_numpy(photo[None]).permute(0, 3, 1, 2).double() / 127.5 - 1
    got = (AlignmentWarp(m[None], photo.shape[:2], 192)(x)[0].permute(1, 2, 0).numpy() + 1) * 127.5
    want = norm_crop(photo, lm, 192, DLIB_CHIP_CANVAS_192).astype(np.float64)
    assert got.shape == (192, 192, 3) and np.abs(got - want).max() <= 0.51
