"""The one registration convention: a component registers itself, in its own file, under a name.

A :class:`Registry` belongs to one package (``fednl.strategies``, ``fednl.data.tasks``, ``fednl.models``); the
component files of that package call :meth:`Registry.register` (usually as a decorator) when they are imported,
and the registry imports every module of its package the first time a name is looked up. Adding a component is
adding one file; nothing else lists it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> components of one kind (``what``: "method", "task", "model kind"), filled by ``package``'s files."""

    def __init__(self, what: str, package: str, *, error: type[ValueError] = ValueError):
        self.what, self.package, self.error = what, package, error
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, item: T) -> T:
        """Register ``item`` under ``name`` (registering the same item again is a no-op); returns ``item``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")
        old = self._items.get(name)
        if old is not None and old is not item:
            raise ValueError(f"{self.what} {name!r} is registered twice ({_origin(old)} and {_origin(item)})")
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` form of :meth:`register`."""
        return lambda item: self.register(name, item)

    def load(self) -> None:
        """Import every module of the package once (each registers its own components)."""
        if self._loaded:
            return
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")
        self._loaded = True

    def names(self) -> list[str]:
        self.load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self.load()
        return sorted(self._items.items())

    def get(self, name: str) -> T:
        """The component registered under ``name``; otherwise ``error`` (a ``ValueError``) lists the known names."""
        if name not in self._items:
            self.load()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self._items))}") from None

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._items


def _origin(item: object) -> str:
    return f"{getattr(item, '__module__', '?')}.{getattr(item, '__qualname__', type(item).__name__)}"
