"""cusedev: a userspace /dev/liveupdate (Linux Live Update Orchestrator, ABI v3).

``cusedev.Emulator`` (an emulator for tests) and ``cusedev.LiveUpdateDevice``
(the typed client) are imported on first use, so ``import cusedev`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Emulator", "EmulatorError", "LiveUpdateDevice", "__version__"]

if TYPE_CHECKING:
    from .profiles.v3.client import LiveUpdateDevice
    from .testing.emulator import Emulator, EmulatorError

_LAZY = {"Emulator": "testing.emulator", "EmulatorError": "testing.emulator", "LiveUpdateDevice": "client"}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'cusedev' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value
