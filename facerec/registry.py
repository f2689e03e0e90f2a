"""A named registry of factories: one for backbones, one for margins, one mechanism."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


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
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._factories))}"
            ) from None
        return factory(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)
