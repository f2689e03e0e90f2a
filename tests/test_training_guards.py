"""Trainer guards: crash-safe re-saves of a step, best.json vs pruning, the non-finite guard (fp16
overflow, no clipping), amp 'auto', resume under the stored config, the resumed log, the
protocol-identity warning, and the distributed environment (torchrun / SLURM)."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from training import checkpoint as ckpt
from training.config import Config, load_config

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_helpers import make_trainer, nan_embeddings, read_log


class Killed(BaseException):
    """Stands in for a SIGKILL at a chosen instant (nothing catches a BaseException here)."""


def save(root: Path, step: int, tag: float, best=None, keep: int = 5) -> Path:
    extra = {"best": best} if best is not None else {}
    return ckpt.save_checkpoint(root, step, 0, 1, {"w": torch.tensor([tag])}, {"tag": tag}, "x: 1\n",
                                {"tag": tag}, keep=keep, **extra)


def tag_of(path: Path) -> float:
    return float(torch.load(path / "model.pt", weights_only=True)["w"][0])


# ---------------------------------------------------------------- 1. re-saving one step
def test_a_kill_while_resaving_a_step_never_leaves_a_partial_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, 4, 1.0)

    def rmtree_killed_half_way(path, *args, **kwargs):  # deletes one file, then the process dies
        (Path(path) / "model.pt").unlink()
        raise Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree_killed_half_way)
    with pytest.raises(Killed):
        save(root, 4, 2.0)
    monkeypatch.undo()
    for step, path in ckpt.list_checkpoints(root):  # whatever is listed is loadable
        assert (path / "model.pt").is_file() and (path / "rank0.pt").is_file(), path
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4] and tag_of(ckpt.step_dir(root, 4)) == 2.0
    ckpt.recover_checkpoints(root)  # the trainer's start-up: the half-deleted copy goes
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]


def test_a_kill_between_setting_the_old_copy_aside_and_the_commit_restores_it(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, 4, 1.0)
    replace = os.replace

    def replace_killed_at_commit(src, dst):
        if str(src).endswith(".tmp"):
            raise Killed
        return replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_killed_at_commit)
    with pytest.raises(Killed):
        save(root, 4, 2.0)
    monkeypatch.undo()
    listed = dict(ckpt.list_checkpoints(root))  # the aside copy stands in for step 4...
    assert listed[4].name == "step_00000004.old" and tag_of(listed[4]) == 1.0
    notes = ckpt.recover_checkpoints(root)  # ...and is put back when its replacement never came
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4] and tag_of(ckpt.step_dir(root, 4)) == 1.0
    assert notes and "restored step_00000004" in notes[0]


@pytest.mark.parametrize("val", [{"every_steps": 4}, {"every_steps": 0}], ids=["every-4-steps", "every-epoch"])
def test_validation_and_the_periodic_save_of_one_step_write_one_checkpoint(tmp_path, monkeypatch, val):
    """A first validation always improves: with every_steps=4 it saves step 4, then the periodic
    save of step 4 would write the same state again; at an epoch end (6 steps) the periodic save
    waits for the epoch's validation."""
    from training import trainer as trainer_module

    calls = collections.Counter()
    real = trainer_module.ckpt.save_checkpoint

    def counting(root, step, *args, **kwargs):
        calls[step] += 1
        return real(root, step, *args, **kwargs)

    monkeypatch.setattr(trainer_module.ckpt, "save_checkpoint", counting)
    every = 4 if val["every_steps"] else 6
    trainer = make_trainer(tmp_path, val=val, train={"checkpoint_every": every, "epochs": 2})
    trainer.fit()
    assert calls[every] == 1 and max(calls.values()) == 1, calls
    meta = ckpt.read_meta(ckpt.step_dir(trainer.ckpt_dir, every))
    assert meta["metrics"] and meta["best"]["step"] == every


# ---------------------------------------------------------------- 5. best.json and pruning
def test_a_crash_between_the_commit_and_best_json_cannot_prune_the_best(tmp_path, monkeypatch):
    """Validation improves at steps 2 and 4; the process dies right after committing step 4 but
    before best.json names it. The resumed run (no further improvement, keep_checkpoints=1) must
    still keep step 4 and name it best."""
    from training import trainer as trainer_module

    scores = iter([0.5, 0.9, 0.1, 0.1])

    def fake_validate(*args, **kwargs):
        value = next(scores)
        return types.SimpleNamespace(as_dict=lambda: {"accuracy": value}, kfold="k", tar=[])

    monkeypatch.setattr(trainer_module, "validate", fake_validate)
    real_mark = ckpt.mark_best

    def mark_then_die(root, step, *args):
        if step == 4:
            raise Killed
        real_mark(root, step, *args)

    sections = {"val": {"every_steps": 2}, "train": {"max_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 1}}
    first = make_trainer(tmp_path, **sections)
    monkeypatch.setattr(ckpt, "mark_best", mark_then_die)
    monkeypatch.setattr(trainer_module.ckpt, "mark_best", mark_then_die)
    with pytest.raises(Killed):
        first.fit()
    assert (first.ckpt_dir / "step_00000004").is_dir()
    monkeypatch.setattr(ckpt, "mark_best", real_mark)
    monkeypatch.setattr(trainer_module.ckpt, "mark_best", real_mark)
    resumed = make_trainer(tmp_path, resume="auto", **sections)
    assert resumed.step == 4 and resumed.best == 0.9
    resumed.fit()
    best = ckpt.read_best(resumed.ckpt_dir)
    assert best["step"] == 4 and best["value"] == 0.9
    assert (resumed.ckpt_dir / best["dir"]).is_dir() and ckpt.is_complete(resumed.ckpt_dir / best["dir"])
    assert [s for s, _ in ckpt.list_checkpoints(resumed.ckpt_dir)] == [4, 8]


# ---------------------------------------------------------------- 2. the non-finite guard
def _poison_gradients(trainer, monkeypatch, value: float, steps: int | None = None):
    """The loss stays finite; the gradient reaching the embedding is ``value`` for ``steps`` calls."""
    calls = {"n": 0}

    class Poison(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return torch.full_like(grad, value)

    forward = trainer.model.forward

    def poisoned(x):
        out = forward(x)
        calls["n"] += 1
        if steps is None or calls["n"] <= steps:
            out.embedding = Poison.apply(out.embedding)
        return out

    monkeypatch.setattr(trainer.model, "forward", poisoned)


@pytest.mark.parametrize("clip", [0, None])
def test_without_clipping_a_nan_gradient_is_still_skipped(tmp_path, monkeypatch, clip):
    from training.trainer import NonFiniteError

    trainer = make_trainer(tmp_path, optim={"clip_grad_norm": clip}, val={"kind": "none"},
                           train={"nan_patience": 3, "log_every": 1})
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    _poison_gradients(trainer, monkeypatch, float("nan"))
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        trainer.fit()
    for k, v in trainer.raw_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.isfinite(p).all() for p in trainer.loss_fn.parameters())


def _fp16_scaler(trainer, init_scale: float):
    # fp16 autocast is not needed to exercise the scaler path: an enabled GradScaler is
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    assert trainer.scaler.is_enabled()


def test_fp16_scaler_overflows_are_back_off_not_bad_steps(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, val={"kind": "none"},
                           train={"nan_patience": 3, "log_every": 1, "max_steps": 8})
    _fp16_scaler(trainer, 2.0**16)
    _poison_gradients(trainer, monkeypatch, float("inf"), steps=5)  # 5 overflows, then healthy
    summary = trainer.fit()
    assert summary["step"] == 8
    train = [r for r in read_log(trainer.run_dir) if r["kind"] == "train"]
    assert sum(r["overflow_steps"] for r in train) == 5 and sum(r["skipped_steps"] for r in train) == 0
    assert not [r for r in read_log(trainer.run_dir) if r["kind"] == "message" and "skipped" in r["text"]]
    assert trainer.scaler.get_scale() == 2.0**16 / 2**5


def test_fp16_overflow_that_persists_below_scale_one_stops_the_run(tmp_path, monkeypatch):
    from training.trainer import NonFiniteError

    trainer = make_trainer(tmp_path, val={"kind": "none"}, train={"nan_patience": 2, "log_every": 1})
    _fp16_scaler(trainer, 4.0)  # 4, 2, 1: back-off; 0.5, 0.25: bad
    _poison_gradients(trainer, monkeypatch, float("inf"))
    with pytest.raises(NonFiniteError, match="2 consecutive"):
        trainer.fit()
    assert trainer.step == 5
    train = [r for r in read_log(trainer.run_dir) if r["kind"] == "train"]
    assert sum(r["overflow_steps"] for r in train) == 3 and sum(r["skipped_steps"] for r in train) == 2


def test_fp16_skips_when_the_global_norm_is_not_finite_though_local_gradients_are(tmp_path, monkeypatch):
    """DDP with sharded centres: another rank's non-finite shard makes the global norm inf while
    this rank's gradients are finite; the scaler must skip here too, or the replicas diverge."""
    import training.trainer as trainer_module

    trainer = make_trainer(tmp_path, val={"kind": "none"}, train={"nan_patience": 5, "log_every": 1, "max_steps": 2})
    _fp16_scaler(trainer, 2.0**16)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    real = trainer_module.clip_grad_norm
    monkeypatch.setattr(trainer_module, "clip_grad_norm",
                        lambda *a, **k: real(*a, **k) * float("inf"))  # as if another shard overflowed
    trainer.fit()
    for k, v in trainer.raw_model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no step applied
    train = [r for r in read_log(trainer.run_dir) if r["kind"] == "train"]
    assert sum(r["overflow_steps"] for r in train) == 2 and trainer.scaler.get_scale() == 2.0**14


def test_fp16_nan_loss_counts_as_bad_at_any_scale(tmp_path, monkeypatch):
    from training.trainer import NonFiniteError

    trainer = make_trainer(tmp_path, val={"kind": "none"}, train={"nan_patience": 3, "log_every": 1})
    _fp16_scaler(trainer, 2.0**16)
    nan_embeddings(trainer, monkeypatch)
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        trainer.fit()
    assert trainer.step == 3


# ---------------------------------------------------------------- 3. amp auto
def test_amp_auto_uses_native_bf16_else_fp16_with_a_scaler(monkeypatch):
    from training import optim

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def emulating(including_emulation: bool = True):  # a V100/T4: bf16 only by emulation
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulating)
    assert optim.autocast_dtype("auto", cuda) == torch.float16
    assert optim.make_scaler(torch.float16, cpu).is_enabled()  # fp16 always comes with a scaler
    assert not optim.make_scaler(torch.bfloat16, cpu).is_enabled()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert optim.autocast_dtype("auto", cuda) == torch.bfloat16
    # an older torch without the argument: the compute capability decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert optim.autocast_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert optim.autocast_dtype("auto", cuda) == torch.bfloat16
    assert optim.autocast_dtype("auto", cpu) is None  # the CPU stays in fp32
    assert optim.autocast_dtype("fp16", cuda) == torch.float16 and optim.autocast_dtype("off", cuda) is None


# ---------------------------------------------------------------- 4. resume under the stored config
def fake_run(run_dir: Path, config: Config, step: int = 4) -> Path:
    """A run directory whose checkpoint stores ``config`` (enough for the command line to read)."""
    path = ckpt.step_dir(run_dir / "checkpoints", step)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config.to_yaml())
    (path / "meta.json").write_text(json.dumps({"step": step, "world_size": 1}))
    for name in ("model.pt", "rank0.pt"):
        (path / name).write_bytes(b"")
    return path


def resolved(argv: list[str]) -> Config:
    from training.__main__ import parse_args, resolve_config

    return resolve_config(parse_args(argv))


def test_resume_without_config_continues_under_the_stored_config(tmp_path, monkeypatch):
    from training.__main__ import config_path, main

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    stored = load_config(config_path("tiny_cpu"), ["optim.lr=0.01", "train.epochs=3", "run_dir=/elsewhere"])
    fake_run(run, stored)
    cfg = resolved(["--resume", str(run), "--set", "train.progress=false"])
    assert cfg.optim.lr == 0.01 and cfg.train.epochs == 3 and cfg.train.progress is False
    assert cfg.run_dir == str(run)  # continues where the checkpoint is, not where it was made
    cfg = resolved(["--resume", "auto", "--run-dir", str(run)])
    assert cfg.optim.lr == 0.01 and cfg.run_dir == str(run)
    assert main(["--resume", str(run), "--print-config"]) == 0
    broken = tmp_path / "broken"  # a stored config this version cannot read: a clear message
    path = fake_run(broken, stored)
    (path / "config.yaml").write_text(stored.to_yaml() + "retired_key: 1\n")
    with pytest.raises(SystemExit, match="not valid for this version"):
        resolved(["--resume", str(broken)])
    fresh = tmp_path / "fresh"  # auto without a checkpoint: a fresh run of the default config
    assert resolved(["--resume", "auto", "--run-dir", str(fresh)]) == load_config(
        config_path("tiny_cpu"), [f"run_dir={fresh}"])


def test_resume_with_a_different_config_fails_unless_forced(tmp_path, monkeypatch):
    from training.__main__ import config_path

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    fake_run(run, load_config(config_path("tiny_cpu"), ["optim.lr=0.01", f"run_dir={run}"]))
    argv = ["--config", "tiny_cpu", "--resume", "auto", "--run-dir", str(run)]
    with pytest.raises(SystemExit) as err:
        resolved(argv + ["--set", "train.max_steps=7"])
    text = str(err.value)
    assert "optim.lr: 0.01 (stored) -> 0.1" in text and "train.max_steps: None (stored) -> 7" in text
    assert "--force-config" in text
    assert resolved(argv + ["--set", "train.max_steps=7", "--force-config"]).optim.lr == 0.1
    # run-control fields may change: progress, logging, workers, checkpoint cadence
    same = resolved(argv + ["--set", "optim.lr=0.01", "--set", "train.progress=false", "--set", "data.workers=0",
                            "--set", "train.log_every=7", "--set", "train.checkpoint_every=9"])
    assert same.optim.lr == 0.01 and same.data.workers == 0


def test_the_method_comparison_resume_command_still_passes(tmp_path, monkeypatch):
    """benchmarks/method_comparison.py resumes a row with --config pool_mobilefacenet, its --set
    list and --run-dir: the resolved config equals the stored one, so it resumes unchanged."""
    spec = importlib.util.spec_from_file_location("method_comparison_guard", REPO / "benchmarks" / "method_comparison.py")
    mc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "method_comparison_guard", mc)
    spec.loader.exec_module(mc)
    monkeypatch.chdir(REPO)
    row = mc.plan_rows("cpu")[0]
    run = tmp_path / row.name
    first = mc.train_command("cpu", row, run, "/pool", "/lfw", None)
    assert "--resume" not in first
    config = resolved(first[first.index("training") + 1 :])
    fake_run(run, config, step=100)
    again = mc.train_command("cpu", row, run, "/pool", "/lfw", None)
    assert again[-2:] == ["--resume", "auto"]
    assert resolved(again[again.index("training") + 1 :]) == config
    changed = mc.train_command("cpu", row, run, "/pool", "/lfw", None, extra=["train.max_steps=2"])
    with pytest.raises(SystemExit, match="train.max_steps"):
        resolved(changed[changed.index("training") + 1 :])


# ---------------------------------------------------------------- 6. the log of a resumed run
def test_truncate_log_and_tensorboard_purge(tmp_path, monkeypatch):
    from training.logger import RunLogger

    lines = [{"kind": "train", "step": s, "loss": 1.0} for s in range(1, 9)]
    lines.insert(3, {"kind": "message", "text": "hello"})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st'  # a torn last line
    (tmp_path / "log.jsonl").write_text(text)
    made = {}

    class FakeWriter:
        def __init__(self, logdir, **kwargs):
            made.update(kwargs)

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    RunLogger(tmp_path, True, 10, 4, progress=False, resume_step=4).close()
    records = read_log(tmp_path)
    assert [r.get("step") for r in records] == [1, 2, 3, None, 4]
    assert made == {"purge_step": 5}  # TensorBoard hides events with step >= 5
    made.clear()
    RunLogger(tmp_path, True, 10, 0, progress=False).close()  # a fresh run purges nothing
    assert made == {} and len(read_log(tmp_path)) == 5


def test_a_resumed_run_logs_each_step_once(tmp_path):
    first = make_trainer(tmp_path, val={"kind": "none"}, train={"epochs": 1, "log_every": 1, "checkpoint_every": 4})
    first.fit()
    # as if killed after logging step 6 but before its checkpoint: resume from step 4
    ckpt._discard(ckpt.step_dir(first.ckpt_dir, 6))
    resumed = make_trainer(tmp_path, resume="auto", val={"kind": "none"},
                           train={"epochs": 1, "log_every": 1, "checkpoint_every": 4})
    assert resumed.step == 4
    resumed.fit()
    steps = [r["step"] for r in read_log(resumed.run_dir) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resuming_an_older_step_sets_the_later_checkpoints_aside(tmp_path):
    kw = {"val": {"kind": "none"}, "train": {"epochs": 1, "log_every": 1, "checkpoint_every": 2,
                                             "keep_checkpoints": 2}}
    first = make_trainer(tmp_path, **kw)
    first.fit()
    assert [s for s, _ in ckpt.list_checkpoints(first.ckpt_dir)][-2:] == [4, 6]
    resumed = make_trainer(tmp_path, resume=str(ckpt.step_dir(first.ckpt_dir, 4)), **kw)
    assert resumed.step == 4
    # the abandoned step 6 is kept, outside the checkpoints a resume or the pruning reads
    aside = [p for p in first.ckpt_dir.iterdir() if p.name.startswith("abandoned_")]
    assert len(aside) == 1 and (aside[0] / "step_00000006" / "meta.json").exists()
    assert [s for s, _ in ckpt.list_checkpoints(first.ckpt_dir)] == [4]
    assert any("moved 1 checkpoint(s) after step 4" in r.get("text", "") for r in read_log(resumed.run_dir))
    resumed.fit()
    # the new branch's step 6 survives pruning and is what --resume auto takes
    assert [s for s, _ in ckpt.list_checkpoints(first.ckpt_dir)][-1] == 6
    assert ckpt.resolve_resume("auto", first.ckpt_dir) == ckpt.step_dir(first.ckpt_dir, 6)
    # deterministic data order and RNG: the new branch ends with the abandoned branch's weights
    new6 = torch.load(ckpt.step_dir(first.ckpt_dir, 6) / "model.pt", weights_only=True)["model"]
    old6 = torch.load(aside[0] / "step_00000006" / "model.pt", weights_only=True)["model"]
    for k in old6:
        assert torch.equal(new6[k], old6[k]), k


def test_a_resumed_run_prints_each_validation_message_once(tmp_path):
    kw = {"val": {"kind": "synthetic", "every_steps": 2}, "train": {"epochs": 1, "log_every": 1, "checkpoint_every": 4}}
    first = make_trainer(tmp_path, **kw)
    first.fit()
    ckpt._discard(ckpt.step_dir(first.ckpt_dir, 6))  # killed after validating step 6, before its checkpoint
    if (first.ckpt_dir / "best.json").exists() and ckpt.read_best(first.ckpt_dir)["step"] == 6:
        (first.ckpt_dir / "best.json").unlink()
    resumed = make_trainer(tmp_path, resume="auto", **kw)
    assert resumed.step == 4
    resumed.fit()
    records = read_log(resumed.run_dir)
    messages = [r["text"] for r in records if r["kind"] == "message" and ": validation " in r["text"]]
    assert [int(t.split(":")[0].split()[1]) for t in messages] == [2, 4, 6]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4, 6]


# ---------------------------------------------------------------- 8. the protocol identity check
def _faces(root: Path, names: list[str]) -> Path:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for name in names:
        for k in range(2):
            path = root / name / f"{k}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    return root


def test_a_skipped_identity_check_is_logged_once(tmp_path):
    root = _faces(tmp_path / "faces", ["alice", "bob"])
    trainer = make_trainer(tmp_path, data={"kind": "folder", "path": str(root), "batch_size": 4},
                           val={"kind": "none"})
    assert "no source prefix" in trainer.dataset.protocol_check_skipped
    warnings = [r["text"] for r in read_log(trainer.run_dir)
                if r["kind"] == "message" and "identity check" in r["text"]]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "'alice'" in warnings[0]


def test_the_identity_check_says_why_it_did_not_run(tmp_path, monkeypatch):
    from facerec.data import protocol
    from facerec.data.recordio import write_face_rec
    from training.config import DataConfig
    from training.data import build_dataset

    prefixed = _faces(tmp_path / "pool", ["lfw__Some_One", "orl__s1"])
    monkeypatch.setattr(protocol, "has_lfw", lambda root=None: False)
    dataset = build_dataset(DataConfig(kind="folder", path=str(prefixed), workers=0), 0)
    assert "LFW data" in dataset.protocol_check_skipped and "FACEREC_DATA" in dataset.protocol_check_skipped
    image = torch.zeros(112, 112, 3, dtype=torch.uint8).numpy()
    write_face_rec(tmp_path / "rec", [(image, 0), (image, 0), (image, 1), (image, 1)])
    rec = build_dataset(DataConfig(kind="rec", path=str(tmp_path / "rec"), workers=0), 0)
    assert "no identity names" in rec.protocol_check_skipped
    synthetic = build_dataset(DataConfig(kind="synthetic"), 0)
    assert getattr(synthetic, "protocol_check_skipped", None) is None  # no people, nothing to check


# ---------------------------------------------------------------- 10. the distributed environment
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
             "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for key in DIST_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_rank_world_and_local_rank_from_torchrun_or_slurm(clean_env):
    from training.dist import env_rank_world

    assert env_rank_world() == (0, 1, 0)
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    assert env_rank_world() == (5, 8, 1)
    clean_env.delenv("SLURM_LOCALID")
    assert env_rank_world() == (5, 8, 0)
    clean_env.setenv("RANK", "3")  # torchrun's variables win over the allocation's
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "2")
    assert env_rank_world() == (3, 4, 2)


def test_init_distributed_under_slurm_needs_master_addr_and_defaults_the_port(clean_env):
    from training import dist as tdist

    calls = []
    clean_env.setattr(tdist.dist, "is_initialized", lambda: False)
    clean_env.setattr(tdist.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    clean_env.setenv("SLURM_PROCID", "1")
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("SLURM_LOCALID", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        tdist.init_distributed("cpu")
    assert not calls
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    info = tdist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device.type) == (1, 2, 1, "cpu")
    assert calls == [("gloo", {"rank": 1, "world_size": 2})] and os.environ["MASTER_PORT"] == "29500"
    clean_env.setenv("MASTER_PORT", "1234")  # an exported port is kept
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    info = tdist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank) == (0, 2, 0) and os.environ["MASTER_PORT"] == "1234"
    assert calls[-1] == ("gloo", {"rank": 0, "world_size": 2})
    for key in DIST_VARS:
        clean_env.delenv(key, raising=False)
    assert tdist.init_distributed("cpu").world_size == 1 and len(calls) == 2  # one process: no group


def test_importing_training_reads_no_distributed_variable():
    code = """
import json, os, sys
import torch, torch.distributed
seen = []
class Spy(dict):
    def __getitem__(self, k):
        seen.append(k); return dict.__getitem__(self, k)
    def get(self, k, d=None):
        seen.append(k); return dict.get(self, k, d)
    def __contains__(self, k):
        seen.append(k); return dict.__contains__(self, k)
os.environ = Spy(os.environ)
import training, training.dist, training.trainer, training.__main__
print(json.dumps(sorted(set(seen))))
"""
    env = dict(os.environ, RANK="not-a-number", WORLD_SIZE="x", SLURM_PROCID="x", SLURM_NTASKS="x",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert not seen & set(DIST_VARS), seen & set(DIST_VARS)
