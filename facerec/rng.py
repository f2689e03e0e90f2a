"""A module-owned random generator whose state travels in the module's state dict.

Random choices inside the loss (ElasticFace margins, Partial FC negative sampling) must be
reproducible across ranks and across a resume, independent of the global RNG that data
augmentation also consumes. ``get_extra_state`` puts the generator state into ``state_dict()``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SeededRNG(nn.Module):
    """Mixin for modules with their own generator; call ``self.generator(device)`` to draw."""

    def init_rng(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != torch.device(device):
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if self._pending_state is not None:
                gen.set_state(self._pending_state)
                self._pending_state = None
            self._generator = gen
        return self._generator

    def get_extra_state(self):
        state = self._generator.get_state() if self._generator is not None else None
        return {"generator": state if state is not None else self._pending_state}

    def set_extra_state(self, state) -> None:
        self._generator = None
        self._pending_state = state.get("generator") if state else None
