"""Per-step learning-rate schedules: linear warm-up, then polynomial or cosine decay.

The factor is a plain function of the step, held by a picklable object, so LambdaLR's state dict
round-trips through a checkpoint and a resumed run gets exactly the same learning rates.
"""

from __future__ import annotations

import math

import torch


class WarmupDecay:
    def __init__(self, total_steps: int, warmup_steps: int = 0, kind: str = "poly",
                 power: float = 2.0, min_ratio: float = 0.0):
        if kind not in ("poly", "cosine", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = max(min(int(warmup_steps), self.total_steps - 1), 0)
        self.kind = kind
        self.power = float(power)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        """Multiplier of the peak lr for the update made at ``step`` (0-based)."""
        if step < self.warmup_steps:
            # Starts above zero so the first update is not wasted.
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min(max(step - self.warmup_steps, 0) / span, 1.0)
        if self.kind == "poly":
            decay = (1.0 - t) ** self.power
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = config.warmup_steps + int(round(config.warmup_epochs * steps_per_epoch))
    fn = WarmupDecay(total_steps, warmup, config.kind, config.power, config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
