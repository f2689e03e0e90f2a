"""One registry for backbones: a new variant is one registered function."""

from __future__ import annotations

from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name; ``fn(**overrides)`` must return the model."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered backbone, e.g. ``create_model("vit_s_fiqa", mask_ratio=0.0)``."""
    try:
        factory = _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(_MODELS))}"
        ) from None
    return factory(**overrides)


def list_models() -> list[str]:
    return sorted(_MODELS)
