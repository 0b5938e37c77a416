"""One registry class for backbones, tasks and datasets."""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def closest_match(name: str, choices: Iterable[str], cutoff: float = 0.4) -> str | None:
    """The choice most like ``name`` (difflib similarity at least ``cutoff``), or None when nothing is close."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return found[0] if found else None


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the valid names and the closest one."""

    def __init__(self, kind: str, name: str, choices: Iterable[str], hint: str = ""):
        choices = sorted(choices)
        best = closest_match(name, choices)
        text = f"unknown {kind} {name!r}."
        if best:
            text += f" Did you mean {best!r}?"
        text += f" Valid {kind} names: {', '.join(choices)}."
        if hint:
            text += f" {hint}"
        super().__init__(text)
        self.kind, self.name, self.choices, self.closest = kind, name, choices, best

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text.
        return self.args[0]


class Registry(Generic[T]):
    """Name -> object. ``@REG.register("name")`` registers a builder; duplicates raise."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name != name.lower():
            raise ValueError(f"{self.kind} names are lower-case; got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
