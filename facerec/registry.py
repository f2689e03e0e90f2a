"""A named registry of factories: one mechanism for backbones, margins and face detectors.

A factory may carry traits, facts about what it builds that a caller needs before building it
(``@register_margin(elastic=True)``: an ElasticFace margin takes the run's seed). Asking the
registry (:meth:`Registry.traits`) replaces tests on the name's spelling.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that no registry entry (or known setting) has: a user's mistake, reported in one line."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known``, or '' when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    known = sorted(known)
    return UnknownNameError(f"unknown {kind} {name!r}{did_you_mean(name, known)}; registered: {', '.join(known)}")


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
            raise unknown_name(self.kind, name, self._factories)

    def create(self, name: str, **kwargs) -> T:
        self._check(name)
        return self._factories[name](**kwargs)

    def traits(self, name: str) -> dict[str, Any]:
        """What ``name`` was registered with (``{}`` for none); an unknown name is refused."""
        self._check(name)
        return dict(self._traits[name])

    def names(self) -> list[str]:
        return sorted(self._factories)
