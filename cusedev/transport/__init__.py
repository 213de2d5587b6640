"""Front ends that put a ``DeviceHandler`` at a path: a CUSE char device, or a FUSE file.

A transport has ``name``, ``device_path``, ``async start()`` (raises
``TransportError`` with a one-line reason) and ``async stop()`` (idempotent,
removes everything it created).  ``connection`` is its ``fuse.wire.Connection``.
"""

from __future__ import annotations


class TransportError(Exception):
    """A transport cannot start; the message is one line for the user."""
