"""In-process trainer set-up shared by the trainer tests: a Trainer on the tiny registered model and
the synthetic data of ``test_checkpoint_resume``, its JSON-lines log, and a forward pass that turns
every embedding into NaN (so the loss is NaN while the parameters stay finite)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from test_checkpoint_resume import write_run_files

from training.config import load_config


def make_trainer(tmp_path: Path, resume=None, **sections):
    from training.trainer import Trainer

    config_file = write_run_files(tmp_path, **sections)
    if str(tmp_path) not in sys.path:
        sys.path.insert(0, str(tmp_path))
    cfg = load_config(config_file, [f"run_dir={tmp_path / 'run'}"])
    return Trainer(cfg, resume=resume)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def nan_embeddings(trainer, monkeypatch) -> None:
    """From now on the model's embeddings are NaN: every step has a NaN loss."""
    forward = trainer.model.forward

    def poisoned(x):
        out = forward(x)
        out.embedding = out.embedding * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", poisoned)
