"""loss.distill in the trainer: teacher rows per training image, the distillation terms in the total
loss (value and gradient equal to facerec.losses computed directly), images without an identity,
2-process DDP (projection included), bit-identical resume and the config's refusals.

The teacher cache is made by the real ``facerec teach`` path (``facerec.teachers.compute.teach``)
with a tiny ONNX embedder (``teacher_helpers``) over a folder of 112x112 synthetic faces: images of
the teacher's crop size are taken as aligned, so nothing is detected.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_checkpoint_resume import (  # noqa: E402
    FLOAT64_TOLERANCE,
    assert_identical,
    final_state,
    run_one_and_two_processes,
    run_training,
    write_run_files,
)
from trainer_helpers import make_trainer, read_log  # noqa: E402

pytestmark = pytest.mark.timeout(120)

IDENTITIES = 6  # with 4 images each
SOLO = ("solo_a", "solo_b")  # one image each: "images without a usable identity"
IN_CACHE = 22  # the cache holds 22 of the 26 images (4 left out): coverage 85%


def write_faces(root: Path) -> list[Path]:
    """6 identities x 4 images + 2 single-image identities, 112x112 PNG (lossless, so the bytes
    the trainer reads are the bytes the teacher saw). An identity is a smooth random pattern; each
    image adds noise."""
    import cv2

    rng = np.random.default_rng(0)
    paths = []
    names = [(f"id{k}", 4) for k in range(IDENTITIES)] + [(s, 1) for s in SOLO]
    for name, count in names:
        coarse = rng.uniform(0, 255, (7, 7, 3)).astype(np.float32)
        proto = cv2.resize(coarse, (112, 112), interpolation=cv2.INTER_CUBIC)
        for i in range(count):
            image = np.clip(proto + rng.normal(0, 25, proto.shape), 0, 255).astype(np.uint8)
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), image)
            paths.append(path)
    return sorted(paths)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """(data folder, teacher cache folder) shared by the tests of this module (read-only)."""
    from teacher_helpers import export_tiny

    from facerec.cli.teach import folder_items
    from facerec.teachers.compute import TeacherSpec, teach

    tmp = tmp_path_factory.mktemp("distill_data")
    data = tmp / "faces"
    write_faces(data)
    export_tiny(tmp / "teacher.onnx")
    # the last image of id0..id3 is left out, so a batch can have rows without a teacher
    left_out = {f"id{k}/3.png" for k in range(26 - IN_CACHE)}
    items = [it for it in folder_items(data) if "/".join(Path(it[0][1]).parts[-2:]) not in left_out]
    assert len(items) == IN_CACHE
    summary = teach(TeacherSpec("onnx", {"path": str(tmp / "teacher.onnx")}), items, tmp / "cache",
                    progress=False)
    assert summary.computed == IN_CACHE and summary.no_face == 0
    return data, tmp / "cache"


def distill_sections(data_dir: Path, cache_dir: Path, distill: dict | None = None, **sections) -> dict:
    """Config sections for write_run_files: the folder data, val off, loss.distill on."""
    out = {
        "data": {"kind": "folder", "path": str(data_dir), "batch_size": 8},
        "loss": {"distill": {"cache": str(cache_dir), "relational_weight": 1.0, "embedding_weight": 0.5,
                             "temperature": 0.1, "teacher_temperature": 0.05, **(distill or {})}},
        "val": {"kind": "none"},
    }
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out



def trainer_at(path: Path, resume=None, **sections):
    path.mkdir(parents=True, exist_ok=True)
    return make_trainer(path, resume=resume, **sections)


def batch_of(trainer, index: list[int]):
    """(images, labels, index) of these samples, through the trainer's own dataset wrapper."""
    wrapped = trainer.distill.wrap(trainer.dataset)
    items = [wrapped[i] for i in index]
    return (torch.stack([x[0] for x in items]), torch.tensor([x[1] for x in items]),
            torch.tensor([x[2] for x in items]))


# ---------------------------------------------------------------- (1) a real learning signal
def relational_on(trainer, images, teacher, mask) -> float:
    from facerec.losses import relational_distill_loss

    with torch.no_grad():
        emb = trainer.raw_model(images).embedding
    return float(relational_distill_loss(emb, teacher, mask, "kl", 0.1, 0.05))


def test_distillation_trains_logs_its_terms_and_pulls_the_student_to_the_teacher(tmp_path, faces):
    from facerec.teachers import TeacherCache, file_hash

    data, cache = faces
    sections = distill_sections(data, cache, distill={"relational_weight": 5.0},
                                train={"epochs": 8, "log_every": 3, "checkpoint_every": 100})
    trainer = trainer_at(tmp_path / "on", **sections)
    assert len(trainer.dataset) == 26 and trainer.num_classes == 8
    assert trainer.distill.coverage == pytest.approx(IN_CACHE / 26)
    # a fixed evaluation batch: every image the cache holds, without augmentation, teacher rows
    # read straight from the cache by the files' hashes
    paths = [trainer.dataset.root / s.path for s in trainer.dataset.samples]
    teacher, found = TeacherCache(cache).lookup([file_hash(p) for p in paths])
    from facerec.data.datasets import EvalTransform, read_rgb

    images = torch.stack([EvalTransform()(read_rgb(p)) for p in paths])
    teacher, mask = torch.from_numpy(teacher), torch.from_numpy(found)
    before = relational_on(trainer, images, teacher, mask)
    trainer.fit()
    after = relational_on(trainer, images, teacher, mask)

    # control: the same run without the teacher
    control_sections = {**sections, "loss": {}}
    control = trainer_at(tmp_path / "off", **control_sections)
    assert control.distill is None
    control.fit()
    without = relational_on(control, images, teacher, mask)
    print(f"relational KL on the fixed batch: start {before:.4f}, distilled {after:.4f}, no teacher {without:.4f}")
    assert after < 0.6 * before, (before, after)
    assert after < 0.8 * without, (after, without)

    log = read_log(tmp_path / "on" / "run")
    train = [r for r in log if r["kind"] == "train"]
    assert len(train) == 8 * 3 // 3
    for record in train:
        assert {"relational", "embedding", "classification", "quality", "loss"} <= set(record)
    assert train[-1]["relational"] < train[0]["relational"]
    assert train[-1]["embedding"] < train[0]["embedding"]
    texts = [r["text"] for r in log if r["kind"] == "message"]
    assert any(f"{IN_CACHE} of 26 training images (84.6%) have a teacher embedding" in t for t in texts), texts
    assert not any("warning: only" in t for t in texts)
    control_log = read_log(tmp_path / "off" / "run")
    assert not any("relational" in r for r in control_log)  # the no-teacher log is as before


# ---------------------------------------------------------------- (2) the trainer's term == facerec.losses
def test_the_trainers_distill_term_equals_the_losses_computed_directly(tmp_path, faces):
    from facerec.losses import embedding_distill_loss, relational_distill_loss
    from facerec.teachers import TeacherCache, file_hash

    data, cache = faces
    trainer = make_trainer(tmp_path, **distill_sections(data, cache, distill={"relational_kind": "mse"}))
    images, labels, index = next(iter(trainer.loader))  # the loader yields the sample indices
    assert index.shape == (8,) and labels.tolist() == [trainer.dataset.samples[i].label for i in index]
    model, terms = trainer.raw_model, trainer.distill.terms

    def grads(loss):  # the backbone up to the embedding (not the quality head) and the projection
        params = [model.conv.weight, model.conv.bias, model.fc.weight, model.fc.bias,
                  terms.embedding.projection.weight]
        return torch.autograd.grad(loss, params)

    student = model(images).embedding
    total, parts = trainer.distill.loss(student, index)
    got = grads(total)

    paths = [trainer.dataset.root / trainer.dataset.samples[i].path for i in index]
    teacher, found = TeacherCache(cache).lookup([file_hash(p) for p in paths])
    teacher, found = torch.from_numpy(teacher), torch.from_numpy(found)
    assert 0 < int(found.sum()) < 8 or bool(found.all())
    student = model(images).embedding
    relational = relational_distill_loss(student, teacher, found, "mse")
    embedding = embedding_distill_loss(student, teacher, terms.embedding.projection.weight, found)
    want = grads(1.0 * relational + 0.5 * embedding)
    torch.testing.assert_close(parts["relational"], relational, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts["embedding"], embedding, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(total, relational + 0.5 * embedding, rtol=1e-6, atol=1e-7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert all(float(g.abs().sum()) > 0 for g in got)
    # under AMP the terms still compute in float32 (a small temperature magnifies bf16's rounding)
    student = model(images).embedding.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_total, _ = trainer.distill.loss(student.bfloat16(), index)
    assert amp_total.dtype == torch.float32
    want_total, _ = trainer.distill.loss(student.bfloat16().float(), index)
    assert torch.equal(amp_total, want_total)

    # the whole step: the projection is in the optimiser, its own group, and moves
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["distill_projection"]["params"] == [terms.embedding.projection.weight]
    assert groups["distill_projection"]["weight_decay"] == groups["backbone"]["weight_decay"]
    assert any(p is terms.embedding.projection.weight for p in trainer.backbone_params)  # clipped, guarded
    start = terms.embedding.projection.weight.detach().clone()
    trainer.train_step(images, labels, index)
    assert not torch.equal(start, terms.embedding.projection.weight)


def test_rows_without_a_teacher_embedding_get_no_distillation_gradient(tmp_path, faces):
    data, cache = faces
    trainer = make_trainer(tmp_path, **distill_sections(data, cache))
    missing = [i for i in range(len(trainer.dataset)) if not trainer.distill.found[i]]
    assert len(missing) == 26 - IN_CACHE
    images, _, index = batch_of(trainer, missing + [0, 1, 5, 9])
    student = trainer.raw_model(images).embedding.detach().requires_grad_(True)
    total, _ = trainer.distill.loss(student, index)
    total.backward()
    assert float(student.grad[: len(missing)].abs().max()) == 0.0
    assert float(student.grad[len(missing):].abs().min()) > 0.0


# ---------------------------------------------------------------- (3) images without an identity
def test_images_without_identity_feed_only_the_distillation_terms(tmp_path, faces):
    data, cache = faces
    kept = trainer_at(tmp_path / "kept", **distill_sections(
        data, cache, distill={"images_without_identity": True}, data={"min_images_per_identity": 2},
        loss={"quality_min_images": 2}))
    samples = kept.dataset.samples
    solo = [i for i, s in enumerate(samples) if s.identity in SOLO]
    assert len(samples) == 26 and len(solo) == 2 and all(samples[i].label == -1 for i in solo)
    assert kept.num_classes == IDENTITIES == kept.loss_fn.centres.num_classes
    assert kept.loss_fn.quality_classes.tolist() == [True] * IDENTITIES
    dropped = trainer_at(tmp_path / "dropped", **distill_sections(data, cache, data={"min_images_per_identity": 2}))
    assert len(dropped.dataset) == 24 and dropped.num_classes == IDENTITIES  # the default rule holds

    # a batch with the two solo images (both in the cache) and labelled ones
    assert all(bool(kept.distill.found[i]) for i in solo)
    images, labels, index = batch_of(kept, solo + [0, 4, 8, 12, 13, 20])
    assert labels[:2].tolist() == [-1, -1]
    out = kept.raw_model(images)
    emb = out.embedding.detach().requires_grad_(True)
    quality = out.quality.detach().requires_grad_(True)
    losses = kept.loss_fn(emb, labels, quality)  # margin + UNPG + quality
    losses.total.backward()
    assert float(emb.grad[:2].abs().max()) == 0.0 and float(quality.grad[:2].abs().max()) == 0.0
    assert float(emb.grad[2:].abs().sum()) > 0 and float(quality.grad[2:].abs().sum()) > 0
    emb.grad = None
    total, _ = kept.distill.loss(emb, index)
    total.backward()
    assert float(emb.grad[:2].abs().min()) > 0.0  # the solo rows learn from the teacher
    # and the full step runs with them (Partial FC sampling, UNPG, quality, clipping)
    kept.train_step(images, labels, index)
    assert int(kept.bad_count) == 0
    texts = []
    kept.log.message = lambda text, step=None: texts.append(text)
    for line in kept.distill.messages(2):
        kept.log.message(line)
    assert any("2 images of identities with fewer than 2 images feed distillation only" in t for t in texts)
    # centre imprinting skips the label -1 images: every class gets its own images' mean
    kept.imprint_centres()
    assert any("imprinted 6 of 6 class centres" in t for t in texts), texts
    from facerec.data.datasets import EvalTransform, read_rgb

    first = [i for i, s in enumerate(samples) if s.label == 0]
    with torch.no_grad():
        emb = kept.raw_model(torch.stack([EvalTransform()(read_rgb(kept.dataset.root / samples[i].path))
                                          for i in first])).embedding
    mean = torch.nn.functional.normalize(torch.nn.functional.normalize(emb, dim=1).sum(0), dim=0)
    centre = torch.nn.functional.normalize(kept.loss_fn.centres.weight[0].detach(), dim=0)
    assert float(centre @ mean) > 1 - 1e-5


# ---------------------------------------------------------------- (4) 2 processes == 1 process
@pytest.mark.timeout(240)
def test_two_process_ddp_with_distillation_equals_one_process(tmp_path, faces):
    data, cache = faces
    sections = distill_sections(data, cache, loss={"sample_rate": 1.0},
                                train={"max_steps": 2, "deterministic": False, "checkpoint_every": 100})
    run_one_and_two_processes(tmp_path, sections, timeout=200)

    one = tmp_path / "one" / "checkpoints" / "step_00000002"
    two = tmp_path / "two" / "checkpoints" / "step_00000002"
    m1 = torch.load(one / "model.pt", weights_only=True)["model"]
    m2 = torch.load(two / "model.pt", weights_only=True)["model"]
    for k in m1:
        assert m1[k].dtype == torch.float64
        torch.testing.assert_close(m2[k], m1[k], msg=k, **FLOAT64_TOLERANCE)
    r1 = torch.load(one / "rank0.pt", weights_only=True)
    r2 = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    shards = torch.cat([r["loss"]["centres.weight"] for r in r2])
    torch.testing.assert_close(shards, r1["loss"]["centres.weight"], **FLOAT64_TOLERANCE)
    key = "embedding.projection.weight"
    p1 = r1["distill"][key]
    assert p1.dtype == torch.float64
    for r in r2:  # replicated: both ranks hold the single-process projection
        torch.testing.assert_close(r["distill"][key], p1, **FLOAT64_TOLERANCE)
    # the projection moved (its momentum is its summed gradient): not two untouched initialisations
    for state in (r1, *r2):
        opt = state["optimizer"]
        (pid,) = next(g["params"] for g in opt["param_groups"] if g["name"] == "distill_projection")
        assert float(opt["state"][pid]["momentum_buffer"].abs().sum()) > 0
    mom1 = r1["optimizer"]["state"][pid]["momentum_buffer"]
    torch.testing.assert_close(r2[0]["optimizer"]["state"][pid]["momentum_buffer"], mom1, **FLOAT64_TOLERANCE)


# ---------------------------------------------------------------- (5) resume is bit-identical
@pytest.mark.timeout(300)
def test_killed_and_resumed_distillation_run_is_bit_identical(tmp_path, faces):
    data, cache = faces
    sections = distill_sections(data, cache, distill={"images_without_identity": True},
                                data={"min_images_per_identity": 2}, train={"epochs": 4})
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_config = write_run_files(ref_dir, **sections)
    run_training(ref_dir, ref_config, ref_dir / "run")
    config = write_run_files(tmp_path, **{**sections, "data": {**sections["data"], "workers": 1}})
    run = tmp_path / "run"
    proc = run_training(tmp_path, config, run, kill_at_step=5, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004"]
    start = torch.load(run / "checkpoints" / "step_00000004" / "rank0.pt", weights_only=True)
    run_training(tmp_path, config, run, "--resume", "auto")
    assert_identical(final_state(ref_dir / "run", 12), final_state(run, 12))
    ref = torch.load(ref_dir / "run" / "checkpoints" / "step_00000012" / "rank0.pt", weights_only=True)
    got = torch.load(run / "checkpoints" / "step_00000012" / "rank0.pt", weights_only=True)
    assert_identical(ref["distill"], got["distill"], "distill")
    assert not torch.equal(start["distill"]["embedding.projection.weight"], got["distill"]["embedding.projection.weight"])


def test_distillation_cannot_be_switched_in_a_resumed_run(tmp_path, faces):
    data, cache = faces
    plain = distill_sections(data, cache, train={"max_steps": 1})
    plain["loss"] = {}
    trainer = make_trainer(tmp_path, **plain)
    trainer.fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000001"
    with pytest.raises(ValueError, match="trained without loss.distill.*model.init_from"):
        make_trainer(tmp_path, resume=str(checkpoint), **distill_sections(data, cache, train={"max_steps": 1}))


# ---------------------------------------------------------------- (6) refusals
def test_config_errors_say_what_is_wrong(tmp_path, faces):
    from pydantic import ValidationError

    from facerec.teachers.cache import CacheWriter
    from training.config import load_config

    data, cache = faces
    folder = ["data.kind=folder", f"data.path={data}"]
    with pytest.raises(ValidationError, match="both 0, so there is nothing to distil"):
        load_config(None, folder + [f"loss.distill={{cache: {cache}, relational_weight: 0}}"])
    with pytest.raises(ValidationError, match="synthetic images have none"):
        load_config(None, [f"loss.distill.cache={cache}"])
    with pytest.raises(ValidationError, match="images_without_identity applies to data.kind folder or pool"):
        load_config(None, ["data.kind=rec", "data.path=x.rec", f"loss.distill.cache={cache}",
                           "loss.distill.images_without_identity=true"])
    with pytest.raises(ValidationError, match="temperature"):
        load_config(None, folder + [f"loss.distill.cache={cache}", "loss.distill.temperature=0"])
    with pytest.raises(ValidationError, match="relational_kind"):
        load_config(None, folder + [f"loss.distill.cache={cache}", "loss.distill.relational_kind=l2"])
    with pytest.raises(ValidationError, match="cache"):
        load_config(None, folder + ["loss.distill={relational_weight: 1}"])
    assert load_config(None, folder + [f"loss.distill.cache={cache}"]).loss.distill.relational_weight == 1.0

    def refused(path, match):
        with pytest.raises(ValueError, match=match):
            trainer_at(tmp_path / f"run_{path.name}", **distill_sections(data, path))

    refused(tmp_path / "nowhere", r"does not exist: compute it with `facerec teach")
    (tmp_path / "not_a_cache").mkdir()
    refused(tmp_path / "not_a_cache", "is not a teacher cache")
    CacheWriter(tmp_path / "empty", "onnx-1-abc", 16, {}).close()
    refused(tmp_path / "empty", "holds no teacher embedding")


def test_low_coverage_is_warned(tmp_path, faces):
    from facerec.teachers.cache import CacheWriter
    from facerec.teachers.compute import read_bytes
    from facerec.teachers import content_hash

    data, cache = faces
    small = tmp_path / "small_cache"
    first = sorted(data.glob("*/*.png"))[:3]
    with CacheWriter(small, "onnx-1-abc", 16, {}) as writer:
        writer.add([content_hash(read_bytes(("file", str(p)))) for p in first], np.eye(3, 16, dtype=np.float32))
    trainer = make_trainer(tmp_path, **distill_sections(data, small))
    assert int(trainer.distill.found.sum()) == 3
    text = (tmp_path / "run" / "log.jsonl").read_text()
    assert "warning: only 11.5% of the training images have a teacher embedding" in text
