"""Run logs: a JSON-lines file (every record), TensorBoard scalars, and a tqdm bar with ETA.

Only rank 0 logs; the other ranks get a logger whose methods do nothing, so the trainer never
branches on the rank for logging.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 progress: bool = True):
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "log.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
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
            shown = {k: values[k] for k in ("loss", "lr", "img_s") if k in values}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)
        self.file.write(json.dumps({"kind": "message", "time": round(time.time(), 3), "text": text}) + "\n")

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
