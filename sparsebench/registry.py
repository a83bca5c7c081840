"""A tiny name -> factory registry shared by models, datasets and methods (timm style)."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from sparsebench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            hint = difflib.get_close_matches(name, self._items, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UserError(
                f"unknown {self.kind} {name!r}{did_you_mean}; choose one of: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
