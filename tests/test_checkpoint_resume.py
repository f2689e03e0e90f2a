"""Kill-and-resume: a run SIGKILLed at a fixed step, or half-way through writing a checkpoint, and
then resumed, ends with bit-identical weights to an uninterrupted run (CPU, deterministic).

The kills happen at exact points (a trainer callback after a step, tests/kill_at_step.py; a
test-only environment hook half-way through a checkpoint write), so nothing here depends on
timing. The interrupted runs use a data-loader worker, the reference run none: the data stream is
a function of (seed, epoch, position) only, so the weights must match across that too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

TINY_MODEL = '''
import torch
from torch import nn
from facerec.models.output import FaceOutput
from facerec.models.registry import list_models, register_model


class TinyFace(nn.Module):
    """A few-thousand-parameter face model with a quality head, for fast CPU tests (no BatchNorm,
    so N processes and one process on the concatenated batch compute the same thing)."""

    has_quality = True

    def __init__(self, embedding_size: int = 16):
        super().__init__()
        self.embedding_size = embedding_size
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.fc = nn.Linear(8 * 7 * 7, embedding_size)
        self.q = nn.Linear(embedding_size, 1)

    def forward(self, x, return_features=False):
        h = nn.functional.avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        e = self.fc(h)
        return FaceOutput(embedding=e, quality=self.q(e).squeeze(-1))


if "tiny_face" not in list_models():
    @register_model
    def tiny_face(**overrides):
        return TinyFace(**overrides)
'''

# Appended to the plugin by the tests that compare N processes with one process on the
# concatenated batch. The plugin is imported before the trainer builds anything, so the whole run
# (backbone, class centres, margins, UNPG, optimiser state) computes in float64. In float32 such a
# comparison is a property of the CPU, not of the code: splitting the global batch changes the
# summation order of every reduction and the kernels the CPU picks, and a few SGD steps amplify
# that to ~3e-5 on weights of ~0.1 on some machines (a 2-core Xeon) and to nothing on others. In
# float64 the same reordering leaves ~1e-16 (measured), so rtol 1e-10 keeps a margin of about a
# million over rounding, while a real defect (a wrong gradient scale, a lost centre shard, a
# mis-gathered UNPG batch) changes the weights at the scale of a learning step.
FLOAT64 = '''
torch.set_default_dtype(torch.float64)
_float32_forward = TinyFace.forward


def _float64_forward(self, x, return_features=False):
    return _float32_forward(self, x.to(torch.float64), return_features)


TinyFace.forward = _float64_forward
'''
# What the float64 comparisons allow: ~1e6 times the rounding they were measured with.
FLOAT64_TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def write_run_files(tmp: Path, float64: bool = False, **sections) -> Path:
    """The tiny-model plugin and a config for it; ``sections`` update the config's sections;
    ``float64`` makes every process that imports the plugin compute in float64 (see FLOAT64)."""
    (tmp / "tiny_face_plugin.py").write_text(TINY_MODEL + (FLOAT64 if float64 else ""))
    config = {
        "model": {"name": "tiny_face", "imports": ["tiny_face_plugin"]},
        "loss": {"margin": "elastic_arcface_plus", "margin_kwargs": {"s": 16.0, "m": 0.3},
                 "sample_rate": 0.5, "unpg": True, "quality_weight": 1.0},
        "optim": {"name": "sgd", "lr": 0.05, "clip_grad_norm": 5.0},
        "schedule": {"kind": "poly", "warmup_steps": 2},
        "data": {"kind": "synthetic", "num_classes": 6, "images_per_class": 8, "batch_size": 8,
                 "workers": 0},
        "val": {"kind": "synthetic", "folds": 4, "fars": [0.1]},
        "train": {"epochs": 2, "device": "cpu", "deterministic": True, "log_every": 2,
                  "checkpoint_every": 4, "keep_checkpoints": 2, "progress": False},
    }
    for name, values in sections.items():
        config[name].update(values)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_training(tmp: Path, config: Path, run_dir: Path, *args, env_extra=None, check=True,
                 kill_at_step: int | None = None):
    """``python -m training`` on ``config``; ``kill_at_step``: the process SIGKILLs itself right
    after that step (tests/kill_at_step.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp), str(REPO), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    env.update(env_extra or {})
    entry = ["-m", "training"] if kill_at_step is None else [str(TESTS / "kill_at_step.py"), str(kill_at_step)]
    cmd = [sys.executable, *entry, "--config", str(config), "--run-dir", str(run_dir), *args]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_one_and_two_processes(tmp: Path, sections: dict, global_batch: int = 8,
                              timeout: int = 150) -> tuple[Path, Path]:
    """The same float64 run as one process with the global batch and as torchrun with 2 gloo
    processes of half the batch each; returns the two run folders (``one``, ``two``)."""
    import socket

    data = sections.get("data", {})
    single = write_run_files(tmp, float64=True, **{**sections, "data": {**data, "batch_size": global_batch}})
    run_training(tmp, single, tmp / "one")
    ddp_dir = tmp / "ddp"
    ddp_dir.mkdir()
    double = write_run_files(ddp_dir, float64=True, **{**sections, "data": {**data, "batch_size": global_batch // 2}})
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ddp_dir), str(REPO), os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           "-m", "training", "--config", str(double), "--run-dir", str(tmp / "two")]
    proc = subprocess.run(cmd, cwd=ddp_dir, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "one", tmp / "two"


def final_state(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    model = torch.load(path / "model.pt", weights_only=True)["model"]
    rank = torch.load(path / "rank0.pt", weights_only=True)
    return {"model": model, "loss": rank["loss"], "optimizer": rank["optimizer"]["state"],
            "best": rank["best"]}


def assert_identical(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    config = write_run_files(tmp)
    run_training(tmp, config, tmp / "run")
    return final_state(tmp / "run", 12)


def test_killed_at_step_then_resumed_is_bit_identical(tmp_path, reference):
    config = write_run_files(tmp_path, data={"workers": 1})
    run = tmp_path / "run"
    proc = run_training(tmp_path, config, run, kill_at_step=5, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == ["step_00000004"]  # resumes mid-epoch: the sampler position matters
    run_training(tmp_path, config, run, "--resume", "auto")
    assert_identical(reference, final_state(run, 12))


def test_killed_during_checkpoint_write_then_resumed_is_bit_identical(tmp_path, reference):
    config = write_run_files(tmp_path)
    run = tmp_path / "run"
    proc = run_training(tmp_path, config, run, check=False,
                        env_extra={"FACEREC_TEST_KILL_IN_CHECKPOINT_WRITE": "8"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000008.tmp").is_dir()  # the half-written one...
    assert not (ckpts / "step_00000008").exists()  # ...never became a checkpoint
    partial = list((ckpts / "step_00000008.tmp").iterdir())
    assert partial and all(p.name.startswith(".") for p in partial)  # only a temp file, half full
    run_training(tmp_path, config, run, "--resume", "auto")
    assert_identical(reference, final_state(run, 12))
    assert not (ckpts / "step_00000008.tmp").exists()
    assert (run / "config.yaml").exists() and (ckpts / "step_00000012" / "config.yaml").exists()
