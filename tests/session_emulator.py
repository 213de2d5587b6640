"""An emulator serving a session profile (``cusedev serve --abi 6.19|7.2``) for the session tests.

The transport is the run's (``CUSEDEV_TEST_TRANSPORT``: the FUSE file on the
host, CUSE in the VM).  Trace and sysfs are off: the session tests look at
ioctl results, and every start is an interpreter start in the VM.
"""

from __future__ import annotations

import os

from cusedev.testing.emulator import Emulator


class SessionEmulator(Emulator):
    def __init__(self, abi: str, path: str | None = None, **kwargs: object) -> None:
        transport = os.environ.get("CUSEDEV_TEST_TRANSPORT", "fuse").strip().lower() or "fuse"
        kwargs.setdefault("trace", False)
        kwargs.setdefault("sysfs", None)
        super().__init__(path, transport, **kwargs)  # type: ignore[arg-type]
        self.abi = abi

    def _serve_args(self) -> list[str]:
        return [*super()._serve_args(), "--abi", self.abi]

    def __enter__(self) -> SessionEmulator:
        self.start()
        return self
