"""Trainer tests: configs, schedules, the NaN guard, the stored config, and 2-process DDP on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from training.config import Config, apply_override, load_config
from training.schedule import WarmupDecay

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_checkpoint_resume import (  # noqa: E402
    FLOAT64_TOLERANCE,
    run_one_and_two_processes,
    write_run_files,
)
from trainer_helpers import make_trainer, nan_embeddings  # noqa: E402



# ---------------------------------------------------------------- config
def test_overrides_are_typed_and_unknown_keys_fail(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optim: {lr: 0.1}\ndata: {batch_size: 32}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ndata: {workers: 0}\n")
    cfg = load_config(child, ["optim.lr=0.05", "loss.unpg=true", "data.identity_range=[0, 10]"])
    assert cfg.optim.lr == 0.05 and cfg.loss.unpg is True
    assert cfg.data.batch_size == 32 and cfg.data.workers == 0 and cfg.data.identity_range == (0, 10)
    with pytest.raises(Exception):
        load_config(child, ["optim.lrr=0.05"])
    with pytest.raises(ValueError):
        apply_override({}, "optim.lr")


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "training" / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    from training.__main__ import config_path

    cfg = load_config(config_path(name))
    assert isinstance(cfg, Config)
    assert Config.model_validate(__import__("yaml").safe_load(cfg.to_yaml())) == cfg


def test_schedule_warmup_then_decay():
    poly = WarmupDecay(total_steps=100, warmup_steps=10, kind="poly", power=2.0)
    assert 0 < poly(0) < poly(5) < poly(9) < 1.0
    assert poly(10) == pytest.approx(1.0) and poly(100) == pytest.approx(0.0)
    cosine = WarmupDecay(total_steps=100, warmup_steps=0, kind="cosine", min_ratio=0.1)
    assert cosine(0) == pytest.approx(1.0) and cosine(50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(100) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_tokens():
    from facerec.losses import FaceRecognitionLoss
    from facerec.models import create_model
    from training.optim import param_groups

    model = create_model("vit_tiny_fiqa", depth=1)
    groups = {g["name"]: g for g in param_groups(model, FaceRecognitionLoss(4, 512), 0.05)}
    exempt = {id(p) for p in groups["backbone_no_decay"]["params"]}
    for name, p in model.named_parameters():
        expected = p.ndim <= 1 or name in model.no_weight_decay()
        assert (id(p) in exempt) == expected, name
    assert groups["centres"]["weight_decay"] == 0.05


# ---------------------------------------------------------------- in-process trainer
def test_nan_guard_skips_bad_steps_and_stops(tmp_path, monkeypatch):
    from training.trainer import NonFiniteError

    trainer = make_trainer(tmp_path, train={"nan_patience": 3, "log_every": 1},
                           val={"kind": "none"})
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    nan_embeddings(trainer, monkeypatch)
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        trainer.fit()
    for k, v in trainer.raw_model.state_dict().items():  # every bad step was skipped
        assert torch.equal(v, before[k]), k
    momentum = [s.get("momentum_buffer") for s in trainer.optimizer.state.values()]
    assert all(m is None or not torch.isnan(m).any() for m in momentum)


def test_resolved_config_is_stored_and_reloads_the_same_model(tmp_path):
    import yaml

    from facerec.models import create_model

    trainer = make_trainer(tmp_path, train={"epochs": 1}, val={"kind": "none"})
    trainer.fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000006"
    cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    assert cfg == trainer.cfg
    state = torch.load(ckpt / "model.pt", weights_only=True)
    model = create_model(cfg.model.name, **cfg.model.kwargs).eval()
    model.load_state_dict(state["model"])
    x = torch.randn(2, 3, 112, 112)
    trainer.raw_model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).embedding, trainer.raw_model(x).embedding)


def test_training_learns_on_synthetic_faces(tmp_path):
    trainer = make_trainer(tmp_path, data={"num_classes": 4, "images_per_class": 16},
                           loss={"unpg": False, "sample_rate": 1.0, "margin": "arcface"},
                           optim={"lr": 0.1}, train={"epochs": 4, "log_every": 8})
    summary = trainer.fit()
    assert summary["step"] == 32 and summary["best"] is not None and summary["best"] > 0.7
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"kind": "train"' in log and '"kind": "val"' in log


def test_a_run_stopped_inside_an_epoch_is_validated_at_its_last_step(tmp_path):
    """train.max_steps ending mid-epoch: the last step is validated too (it can be the best), once."""
    import json

    trainer = make_trainer(tmp_path, data={"num_classes": 4, "images_per_class": 16},
                           train={"epochs": 3, "max_steps": 11, "log_every": 4})
    summary = trainer.fit()
    assert summary["step"] == 11
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    val_steps = [r["step"] for r in rows if r.get("kind") == "val"]
    assert val_steps == [8, 11]  # 8 steps per epoch: the epoch end, then the last step


# ---------------------------------------------------------------- 2-process DDP on CPU
def test_two_process_ddp_equals_one_process_on_the_concatenated_batch(tmp_path):
    """torchrun with 2 gloo processes (batch 4 each) == 1 process with batch 8, after 2 steps:
    proves the gradient-SUM hook, the sharded centres and the global-norm clipping. Both runs
    compute in float64 (see ``FLOAT64``): in float32 the batch split alone changes the result on
    some CPUs."""
    sections = dict(loss={"sample_rate": 1.0}, val={"kind": "none"},
                    train={"max_steps": 2, "deterministic": False, "checkpoint_every": 100})
    run_one_and_two_processes(tmp_path, sections)

    one = tmp_path / "one" / "checkpoints" / "step_00000002"
    two = tmp_path / "two" / "checkpoints" / "step_00000002"
    m1 = torch.load(one / "model.pt", weights_only=True)["model"]
    m2 = torch.load(two / "model.pt", weights_only=True)["model"]
    single = torch.load(one / "rank0.pt", weights_only=True)
    for k in m1:
        assert m1[k].dtype == m2[k].dtype == torch.float64, k
        torch.testing.assert_close(m2[k], m1[k], msg=k, **FLOAT64_TOLERANCE)
    full = single["loss"]["centres.weight"]
    shards = [torch.load(two / f"rank{r}.pt", weights_only=True)["loss"]["centres.weight"] for r in (0, 1)]
    assert shards[0].shape[0] == 3 and shards[1].shape[0] == 3  # 6 classes split over 2 ranks
    torch.testing.assert_close(torch.cat(shards), full, **FLOAT64_TOLERANCE)
    # Every parameter, backbone and centre shard alike, got a non-zero gradient (its SGD momentum
    # sums them) and lr > 0, so the weights moved: the comparisons above are not of two untouched
    # seeded initialisations. (Read from the checkpoints: building a Trainer here would import the
    # float64 plugin into the test process.)
    for run in (one, two):
        for rank_file in sorted(run.glob("rank*.pt")):
            opt = torch.load(rank_file, weights_only=True)["optimizer"]
            groups = {g["name"]: g["params"] for g in opt["param_groups"]}
            assert {"backbone", "centres"} <= set(groups), groups.keys()
            momenta = [opt["state"][i]["momentum_buffer"] for ids in groups.values() for i in ids]
            assert len(momenta) == len(m1) + 1 and all(m.abs().sum() > 0 for m in momenta), rank_file


def test_single_image_identities_do_not_drive_the_quality_target(tmp_path):
    """A folder with one single-image identity: the trainer masks it out of the quality loss."""
    import cv2
    import numpy as np

    from training.config import load_config
    from training.trainer import Trainer

    rng = np.random.default_rng(0)
    for ident, n in (("a", 3), ("b", 3), ("c", 1)):
        for k in range(n):
            path = tmp_path / "data" / ident / f"{k}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    from training.__main__ import CONFIG_DIR

    cfg = load_config(CONFIG_DIR / "tiny_cpu.yaml", [
        f"data.path={tmp_path / 'data'}", "data.identity_range=null", "data.center_crop=null",
        "data.workers=0", "data.batch_size=4", "val.kind=none", "model.name=vit_tiny_fiqa",
        "model.kwargs={depth: 1}",
        "train.max_steps=1", "train.progress=false", f"run_dir={tmp_path / 'run'}",
    ])
    trainer = Trainer(cfg)
    assert trainer.loss_fn.quality_classes.tolist() == [True, True, False]
    assert trainer.quality_excluded_classes == 1


def test_amp_off_survives_yaml():
    """YAML 1.1 reads a bare `off` as false: `--set train.amp=off` must still mean 'off'."""
    from training.__main__ import config_path
    from training.config import load_config

    assert load_config(config_path("tiny_cpu"), ["train.amp=off"]).train.amp == "off"
    with pytest.raises(ValueError, match="amp"):
        load_config(config_path("tiny_cpu"), ["train.amp=on"])  # true is not a mode


# ---------------------------------------------------------------- collapse monitor
def test_pair_collapse_matches_a_direct_count():
    from facerec.eval.spread import pair_collapse

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 6, generator=g)
    emb[6:9] = emb[0] * torch.tensor([[1.0], [2.0], [0.5]])  # rows 6-8 point where row 0 points
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 5, -1, 6, 6])
    n = torch.nn.functional.normalize(emb, dim=1)
    cosines = [float(n[i] @ n[j]) for i in range(12) for j in range(i + 1, 12)
               if labels[i] >= 0 and labels[j] >= 0 and labels[i] != labels[j]]
    mean, high = pair_collapse(emb, labels, threshold=0.9).tolist()
    assert mean == pytest.approx(sum(cosines) / len(cosines), abs=1e-6)
    assert high == pytest.approx(sum(c > 0.9 for c in cosines) / len(cosines), abs=1e-7)
    assert high >= 6 / len(cosines)  # the 6 pairs among rows 0, 6, 7, 8 (all different labels)
    assert torch.isnan(pair_collapse(emb[:2], labels[:2])).all()  # one identity: no pair


def test_trainer_logs_the_collapse_monitor_and_warns_once_per_episode(tmp_path, monkeypatch):
    import json

    trainer = make_trainer(tmp_path, train={"epochs": 1, "log_every": 1}, val={"kind": "none"})
    forward = trainer.model.forward
    calls = {"n": 0}

    def collapsing(x):  # steps 3-4 map every image onto one direction, the others are untouched
        out = forward(x)
        calls["n"] += 1
        if calls["n"] in (3, 4):
            out.embedding = out.embedding[:1].expand_as(out.embedding) + 0 * out.embedding
        return out

    monkeypatch.setattr(trainer.model, "forward", collapsing)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 6 and all("pair_cos" in r and 0 <= r["collapsed_pairs"] <= 1 for r in train)
    assert [r["collapsed_pairs"] == pytest.approx(1.0) for r in train] == [False, False, True, True, False, False]
    warnings = [r for r in records if r["kind"] == "message" and "collapsing" in r["text"]]
    assert len(warnings) == 1 and "step 3:" in warnings[0]["text"]


# ---------------------------------------------------------------- fine-tuning: init_from, imprinted centres
def test_init_from_copies_the_backbone_and_refuses_another_architecture(tmp_path):
    first = make_trainer(tmp_path, train={"epochs": 1}, val={"kind": "none"})
    first.fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000006"
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    second = make_trainer(tmp_path / "b", model={"init_from": str(ckpt)}, train={"epochs": 1},
                          val={"kind": "none"})
    trained = torch.load(ckpt / "model.pt", weights_only=True)["model"]
    for key, value in second.raw_model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    log = (tmp_path / "b" / "run" / "log.jsonl").read_text()
    assert "backbone initialised from" in log
    # a resumed run restores its own checkpoint and never reads init_from (here: a file that is gone)
    from training.trainer import Trainer

    cfg = load_config(tmp_path / "config.yaml", [f"run_dir={tmp_path / 'run'}", "model.init_from=/gone/model.pt"])
    resumed = Trainer(cfg, resume="auto")
    assert resumed.step == 6 and resumed.init_origin is None
    with pytest.raises(ValueError, match="holds a 'tiny_face' model, but model.name is 'mobilefacenet'"):
        make_trainer(tmp_path / "c", model={"name": "mobilefacenet", "imports": [], "init_from": str(ckpt)},
                     val={"kind": "none"})


def test_imprinted_centres_are_the_class_mean_unit_embeddings(tmp_path):
    import cv2
    import numpy as np

    from facerec.data.datasets import EvalTransform, read_rgb

    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for person in range(3):
        (root / f"p{person}").mkdir(parents=True)
        for i in range(2 + person):  # 2, 3 and 4 images
            cv2.imwrite(str(root / f"p{person}" / f"{i}.png"), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    from facerec.losses import FaceRecognitionLoss
    from facerec.models import create_model
    from training.build import init_centres

    write_run_files(tmp_path)  # the tiny_face plugin, importable below
    sys.path.insert(0, str(tmp_path))
    __import__("tiny_face_plugin")
    torch.manual_seed(3)
    pretrained = tmp_path / "pretrained.pt"  # a trainer-style model.pt of another (random) backbone
    torch.save({"model": create_model("tiny_face").state_dict(), "model_name": "tiny_face", "model_kwargs": {}},
               pretrained)
    with pytest.raises(ValueError, match="imprint needs model.init_from"):
        make_trainer(tmp_path, data={"kind": "folder", "path": str(root)}, loss={"centres_init": "imprint"})
    trainer = make_trainer(tmp_path, data={"kind": "folder", "path": str(root), "batch_size": 4},
                           model={"init_from": str(pretrained)},
                           loss={"centres_init": "imprint", "sample_rate": 1.0},
                           val={"kind": "none"})
    centres = trainer.loss_fn.centres.weight.detach()
    reference = FaceRecognitionLoss(3, centres.shape[1])  # the random centres imprinting replaced
    init_centres(reference, trainer.cfg.train.seed)
    assert torch.allclose(centres.norm(dim=1), reference.centres.weight.norm(dim=1).mean().expand(3))
    model = trainer.raw_model.eval()
    transform = EvalTransform()
    for label, person in enumerate(sorted(p.name for p in root.iterdir())):
        files = sorted((root / person).glob("*.png"))
        with torch.no_grad():
            emb = model(torch.stack([transform(read_rgb(f)) for f in files])).embedding
        direct = torch.nn.functional.normalize(emb, dim=1).mean(0)
        assert torch.nn.functional.cosine_similarity(centres[label], direct, dim=0) == pytest.approx(1.0, abs=1e-5)
    assert "imprinted 3 of 3 class centres from 9 images" in (tmp_path / "run" / "log.jsonl").read_text()
