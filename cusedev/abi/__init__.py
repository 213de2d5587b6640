"""ABI profiles: one op table per kernel ABI, chosen by name."""

from __future__ import annotations

from types import ModuleType


def profile(name: str = "v3") -> ModuleType:
    """The module holding ``NAME`` and ``OPS`` for an ABI profile."""
    if name == "v3":
        from . import v3

        return v3
    raise ValueError(f"unknown ABI profile {name!r} (known: v3)")
