"""Run logs: a JSON-lines file (every record), TensorBoard scalars, and a tqdm bar with ETA.

Only rank 0 logs; the other ranks get a logger whose methods do nothing, so the trainer never
branches on the rank for logging.

A run resumed at step S continues the same log: the records a killed session wrote after S (its
steps are about to be run again) are dropped from log.jsonl, and TensorBoard purges its events
after S, so neither shows a step twice.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 progress: bool = True, resume_step: int | None = None):
        """``resume_step``: the step of the checkpoint this run resumed from (None: not resumed)."""
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.file = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_log(run_dir / "log.jsonl", resume_step)
        self.file = open(run_dir / "log.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step P hides the events with step >= P, i.e. those logged after the checkpoint
            purge = {} if resume_step is None else {"purge_step": resume_step + 1}
            self.writer = SummaryWriter(str(run_dir / "tb"), **purge)
        except Exception:  # tensorboard is an optional extra ('facerec[train]')
            self.writer = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record, default=float) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
        if self.bar is not None and kind == "train":
            shown = {k: values[k] for k in ("loss", "relational", "embedding", "lr", "img_s") if k in values}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def message(self, text: str, step: int | None = None) -> None:
        """Print and record a message; ``step`` (the training step it is about) lets a resume drop
        it with the other records after the resumed step."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)
        record = {"kind": "message", "time": round(time.time(), 3), "text": text}
        if step is not None:
            record["step"] = int(step)
        self.file.write(json.dumps(record) + "\n")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


def truncate_log(path: Path, step: int) -> int:
    """Drop the records of ``path`` (log.jsonl) with a step after ``step`` (messages about a step
    included), and a line a kill cut short; messages without a step stay. Rewritten atomically; returns how many lines were dropped."""
    from training.checkpoint import atomic_write_bytes

    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
    return dropped
