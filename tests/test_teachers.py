"""Teachers: the registry, the ONNX adapter against a direct torch forward, the facerec adapter on
a model folder and a training checkpoint, and the dlib adapter when its extra is installed."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from teacher_helpers import export_tiny, sample_paths, torch_embed  # noqa: E402

from facerec.data.datasets import read_rgb  # noqa: E402
from facerec.teachers import MissingExtraError, create_teacher, list_teachers  # noqa: E402

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny_r1.onnx"
    return path, export_tiny(path)


def random_crops(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_registry_lists_the_adapters():
    assert {"dlib", "onnx", "facerec"} <= set(list_teachers())
    with pytest.raises(ValueError, match="unknown teacher 'nope'"):
        create_teacher("nope")


@pytest.mark.timeout(120)
def test_facerec_imports_without_dlib_or_onnxruntime():
    # as if neither were installed: `import dlib` / `import onnxruntime` raise ImportError
    code = ("import sys; sys.modules.update(dlib=None, onnxruntime=None); "
            "import facerec, facerec.teachers, facerec.losses, facerec.cli.teach; "
            "assert facerec.teachers.list_teachers() == ['dlib', 'facerec', 'onnx']")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]


def test_dlib_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` now raises ImportError
    with pytest.raises(MissingExtraError, match=r"facerec\[teacher\]"):
        create_teacher("dlib")


@pytest.mark.parametrize("options", [{}, {"bgr": True}, {"mean": [120.0, 110.0, 100.0], "std": 64.0}])
def test_onnx_teacher_equals_torch_forward(tiny, options):
    path, model = tiny
    teacher = create_teacher("onnx", path=str(path), **options)
    assert teacher.input_name == "data" and teacher.input_size == 112 and teacher.embedding_size == 16
    crops = random_crops()
    got = teacher.embed(list(crops))
    want = torch_embed(model, crops, **options)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    if options:  # the option changes the embedding, so it must change the id
        assert teacher.teacher_id != create_teacher("onnx", path=str(path)).teacher_id
        assert not np.allclose(got, torch_embed(model, crops), atol=1e-3)


def test_onnx_teacher_id_is_stable_and_names_the_model(tiny):
    path, _ = tiny
    a, b = create_teacher("onnx", path=str(path)), create_teacher("onnx", path=str(path))
    assert a.teacher_id == b.teacher_id and a.teacher_id.startswith("onnx-tiny_r1-")


def test_onnx_teacher_aligns_photos_and_marks_faceless_images(tiny):
    from facerec.data.align import norm_crop
    from facerec.data.detect import create_detector, detect_faces

    path, model = tiny
    teacher = create_teacher("onnx", path=str(path))
    photo = read_rgb(sample_paths(1)[0])
    assert photo.shape[:2] == (250, 250)
    blank = np.full((200, 180, 3), 128, np.uint8)  # no face to find
    got = teacher.embed([photo, blank])
    face = detect_faces(create_detector("mtcnn", backend="onnx", threads=1), photo, policy="largest")[0]
    want = torch_embed(model, norm_crop(photo, face.landmarks, 112)[None])
    np.testing.assert_allclose(got[0], want[0], atol=2e-5)
    assert np.isnan(got[1]).all()


def test_onnx_teacher_refuses_bad_options(tiny, tmp_path):
    path, _ = tiny
    with pytest.raises(FileNotFoundError):
        create_teacher("onnx", path=str(tmp_path / "missing.onnx"))
    with pytest.raises(ValueError, match="no output"):
        create_teacher("onnx", path=str(path), output="nope")
    with pytest.raises(ValueError, match="mean"):
        create_teacher("onnx", path=str(path), mean=[1.0, 2.0])


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from service.testing import make_random_model  # tests may use service/; facerec/ may not

    out = make_random_model(tmp_path_factory.mktemp("model") / "folder", {"depth": 2}, ood=False, n_faces=4)
    torch.manual_seed(0)
    from facerec.models import create_model

    model = create_model("vit_tiny_fiqa", depth=2).float().eval()
    return out, model


def reference(model, crops):
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        out = model(x).embedding.numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.timeout(240)
def test_facerec_teacher_on_a_model_folder_and_a_checkpoint(random_model, tmp_path):
    folder, model = random_model
    crops = random_crops(4, seed=1)
    want = reference(model, crops)
    from_folder = create_teacher("facerec", path=str(folder))
    assert from_folder.embedding_size == model.embedding_size
    assert from_folder.teacher_id.startswith("facerec-vit_tiny_fiqa.random-init-")
    np.testing.assert_allclose(from_folder.embed(list(crops)), want, atol=1e-4)

    # a training checkpoint: a step folder with the trainer's model.pt (+ its config.yaml)
    step = tmp_path / "run" / "checkpoints" / "step_00000007"
    step.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "model_name": "vit_tiny_fiqa", "model_kwargs": {"depth": 2},
                "step": 7}, step / "model.pt")
    (step / "config.yaml").write_text("model:\n  name: vit_tiny_fiqa\n  kwargs: {depth: 2}\n")
    from_ckpt = create_teacher("facerec", path=str(tmp_path / "run" / "checkpoints"))
    assert from_ckpt.version == "vit_tiny_fiqa.step7"
    np.testing.assert_allclose(from_ckpt.embed(list(crops)), want, atol=1e-5)
    assert from_ckpt.teacher_id != from_folder.teacher_id
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_teacher("facerec", path=str(tmp_path / "nothing"))


# --- dlib: only where the optional extra is installed -----------------------------------------


@pytest.fixture(scope="module")
def dlib_teacher():
    pytest.importorskip("dlib")
    try:
        return create_teacher("dlib")
    except MissingExtraError as err:  # dlib without face_recognition_models
        pytest.skip(str(err))


@pytest.mark.timeout(120)
def test_dlib_embeddings_are_unit_128d_and_same_person_is_closer(dlib_teacher):
    people = sorted({p.parent.name for p in sample_paths()})[:5]
    images, names = [], []
    for name in people:
        for i in (1, 2):
            images.append(read_rgb(Path(sample_paths(1)[0]).parents[1] / name / f"{name}_{i:04d}.jpg"))
            names.append(name)
    emb = dlib_teacher.embed(images)
    assert emb.shape == (10, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    names = np.array(names)
    for i in range(0, 10, 2):
        others = sim[i][names != names[i]]
        assert sim[i, i + 1] > others.max(), (names[i], sim[i, i + 1], others.max())
    assert dlib_teacher.teacher_id.startswith("dlib-resnet_v1.dlib")
    # deterministic (jitters=0): the same image gives the same embedding
    np.testing.assert_array_equal(dlib_teacher.embed(images[:1]), emb[:1])


@pytest.mark.timeout(120)
def test_dlib_falls_back_to_the_facerec_box(dlib_teacher):
    photo = read_rgb(Path(sample_paths(1)[0]).parent / "Adrien_Brody_0005.jpg")
    tight = np.ascontiguousarray(photo[80:180, 80:170])  # HOG finds no face this tight
    assert len(dlib_teacher._hog(tight, dlib_teacher.upsample)) == 0
    before = dict(dlib_teacher.stats)
    full, crop = dlib_teacher.embed([photo, tight])
    assert dlib_teacher.stats["fallback"] == before["fallback"] + 1
    assert float(full @ crop) > 0.95  # the same face, found through the fallback box
    assert np.isnan(dlib_teacher.embed([np.full((120, 120, 3), 128, np.uint8)])).all()


PLUGIN = '''
import torch
from torch import nn

from facerec.models import register_model
from facerec.models.output import FaceOutput


class Plug(nn.Module):
    embedding_size, input_size, has_quality, feature_dims = 8, 112, False, []

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(28)
        self.fc = nn.Linear(48, 8)

    def forward(self, x, return_features=False):
        return FaceOutput(self.fc(self.pool(x).flatten(1)))


@register_model
def teacher_plugin_net(**kwargs):
    return Plug()
'''


def test_facerec_teacher_imports_the_plugins_a_checkpoint_config_lists(tmp_path, monkeypatch):
    (tmp_path / "teacher_plugin_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    step = tmp_path / "step_00000001"
    step.mkdir()
    (step / "config.yaml").write_text("model:\n  name: teacher_plugin_net\n  imports: [teacher_plugin_mod]\n")
    torch.manual_seed(3)
    state = {"fc.weight": torch.randn(8, 48), "fc.bias": torch.randn(8)}
    torch.save({"model": state, "model_name": "teacher_plugin_net", "model_kwargs": {}, "step": 1},
               step / "model.pt")
    teacher = create_teacher("facerec", path=str(step))  # unknown to the registry until imported
    crops = random_crops(3, seed=5)
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    want = torch.nn.functional.avg_pool2d(x, 28).flatten(1) @ state["fc.weight"].t() + state["fc.bias"]
    want = (want / want.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(teacher.embed(list(crops)), want, atol=1e-5)
