"""Strategies: one file per method, each registering itself with :func:`register`.

Adding a method = adding one file in this package that defines a ``Strategy`` subclass decorated with
``@register``; it is discovered automatically.
"""

from __future__ import annotations

import importlib
import pkgutil

from fednl.strategies.base import ClientContext, ClientReply, Payload, Strategy, StrategyError

_REGISTRY: dict[str, type[Strategy]] = {}
_LOADED = False


def register(cls: type[Strategy]) -> type[Strategy]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"strategy name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    _LOADED = True


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise StrategyError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


__all__ = [
    "ClientContext", "ClientReply", "Payload", "Strategy", "StrategyError",
    "available", "get_strategy", "register",
]
