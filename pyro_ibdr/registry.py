"""Registries of subclasses by name (inference methods, posterior kinds)."""

from __future__ import annotations

from typing import Any


def _origin(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def register_subclass(registry: dict[str, Any], cls: type, attribute: str) -> None:
    """Register ``cls`` under the value of its class attribute ``attribute`` if it defines its own.

    A subclass that only inherits the attribute (``class MyIBDR(IBDR)``) is not registered, so it cannot replace
    its parent; a value taken by a class from another module or with another name is an error (defining the same
    class again, as a module reload does, replaces it).

    :raises ValueError: naming the value, the class that holds it and the fix.
    """
    key = cls.__dict__.get(attribute)
    if key is None:
        return
    registered = registry.get(key)
    if registered is not None and _origin(registered) != _origin(cls):
        raise ValueError(
            f"{attribute} {key!r} is already registered by {registered.__module__}.{registered.__qualname__}; "
            f"give {cls.__qualname__} its own {attribute}"
        )
    registry[key] = cls
