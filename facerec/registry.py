"""A named registry of factories: one mechanism for backbones, margins and face detectors.

A factory may carry traits, facts about what it builds that a caller needs before building it
(``@register_margin(elastic=True)``: an ElasticFace margin takes the run's seed). Asking the
registry (:meth:`Registry.traits`) replaces tests on the name's spelling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._traits: dict[str, dict[str, Any]] = {}

    def register(self, fn: Callable[..., T] | None = None, /, *, name: str | None = None, **traits):
        """Register ``fn`` under its own name (or ``name``); ``fn(**kwargs)`` builds the object.

        Used bare (``@register``) or with arguments (``@register(name="onnx", elastic=True)``).
        """
        if fn is None:
            return lambda f: self.register(f, name=name, **traits)
        key = name or fn.__name__
        if key in self._factories:
            raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._factories[key] = fn
        self._traits[key] = dict(traits)
        return fn

    def _check(self, name: str) -> None:
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._factories))}")

    def create(self, name: str, **kwargs) -> T:
        self._check(name)
        return self._factories[name](**kwargs)

    def traits(self, name: str) -> dict[str, Any]:
        """What ``name`` was registered with (``{}`` for none); an unknown name is refused."""
        self._check(name)
        return dict(self._traits[name])

    def names(self) -> list[str]:
        return sorted(self._factories)
