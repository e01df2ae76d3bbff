"""Name registries for backbones, adaptation strategies, test-time methods, heads and datamodules.

Classes register themselves with a lower-case name by decorator; importing :mod:`lightning_transfer` imports every
module, so the registries are full. YAML refers to a class by its class name (``class_path: LoRA``) or by its full
import path; the registry names are what ``python -m lightning_transfer list`` prints and what ``bench`` takes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """A mapping from lower-case names to classes of one family."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not _NAME_RE.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower case (letters, digits, '_'), e.g. 'lora'")

        def decorator(cls: T) -> T:
            existing = self._classes.get(name)
            if existing is not None and existing.__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.kind} name {name!r} is taken by {existing.__module__}.{existing.__qualname__}")
            self._classes[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._classes)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._classes.items())

    def get(self, name: str) -> T:
        """Look up by registry name or class name (case-insensitive); the error lists what exists."""
        key = name.lower()
        if key in self._classes:
            return self._classes[key]
        for cls in self._classes.values():
            if cls.__name__.lower() == key:
                return cls
        raise KeyError(self.unknown_message(name))

    def find(self, name: str) -> T | None:
        try:
            return self.get(name)
        except KeyError:
            return None

    def unknown_message(self, name: str) -> str:
        choices = ", ".join(f"{cls.__name__} ({n})" for n, cls in self.items())
        return f"unknown {self.kind} {name!r}; registered {self.kind}s: {choices}"

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def __len__(self) -> int:
        return len(self._classes)


BACKBONES: Registry = Registry("backbone")
STRATEGIES: Registry = Registry("adaptation strategy")
TEST_TIME: Registry = Registry("test-time method")
DATAMODULES: Registry = Registry("datamodule")
HEADS: Registry = Registry("head")

register_backbone = BACKBONES.register
register_strategy = STRATEGIES.register
register_test_time = TEST_TIME.register
register_datamodule = DATAMODULES.register
register_head = HEADS.register


def first_doc_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
