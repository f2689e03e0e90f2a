"""The backbone registry: a new variant is one registered function."""

from __future__ import annotations

from torch import nn

from facerec.registry import Registry

_MODELS: Registry[nn.Module] = Registry("model")

register_model = _MODELS.register


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered backbone, e.g. ``create_model("vit_s_fiqa", mask_ratio=0.0)``."""
    return _MODELS.create(name, **overrides)


def list_models() -> list[str]:
    return _MODELS.names()


def trainable_models() -> list[str]:
    """The models the trainer can train on 112 px ArcFace crops: all but those registered with
    ``trainable=False`` (imported weights on their own crop, e.g. dlib's ResNet)."""
    return [n for n in _MODELS.names() if _MODELS.traits(n).get("trainable", True)]
