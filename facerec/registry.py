"""A named registry of factories: one for backbones, one for margins, one mechanism."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

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

    def register(self, fn: Callable[..., T]) -> Callable[..., T]:
        """Register ``fn`` under its own name; ``fn(**kwargs)`` builds the object."""
        if fn.__name__ in self._factories:
            raise ValueError(f"{self.kind} {fn.__name__!r} is registered twice")
        self._factories[fn.__name__] = fn
        return fn

    def create(self, name: str, **kwargs) -> T:
        try:
            factory = self._factories[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._factories) from None
        return factory(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)
