"""Strategies: one file per method, each registering itself with :func:`register`.

Adding a method = adding one file in this package that defines a ``Strategy`` subclass decorated with
``@register``; it is discovered automatically (:class:`fednl.util.registry.Registry`).
"""

from __future__ import annotations

from fednl.strategies.base import ClientContext, ClientReply, Payload, Strategy, StrategyError
from fednl.util.registry import Registry

STRATEGIES: Registry[type[Strategy]] = Registry("method", __name__, error=StrategyError)


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: register a strategy under its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no `name`")
    return STRATEGIES.register(cls.name, cls)


def available() -> list[str]:
    return STRATEGIES.names()


def get_strategy(name: str) -> type[Strategy]:
    return STRATEGIES.get(name)


__all__ = [
    "STRATEGIES", "ClientContext", "ClientReply", "Payload", "Strategy", "StrategyError",
    "available", "get_strategy", "register",
]
