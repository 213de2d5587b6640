"""An emulator serving a session profile (``cusedev serve --abi 6.19|7.2``) for the session tests.

The transport is the run's (``CUSEDEV_TEST_TRANSPORT``: the FUSE file on the
host, CUSE in the VM).  Trace and sysfs are off: the session tests look at
ioctl results, and every start is an interpreter start in the VM.
"""

from __future__ import annotations

import os
from typing import Any

from cusedev.testing.emulator import Emulator


class SessionEmulator(Emulator):
    def __init__(self, abi: str, path: str | None = None, **kwargs: Any) -> None:
        transport = os.environ.get("CUSEDEV_TEST_TRANSPORT", "fuse").strip().lower() or "fuse"
        kwargs.setdefault("trace", False)
        kwargs.setdefault("sysfs", None)
        super().__init__(path, transport, abi=abi, **kwargs)

    def __enter__(self) -> SessionEmulator:
        self.start()
        return self
