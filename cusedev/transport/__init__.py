"""Front ends that put a ``DeviceHandler`` at a path: a CUSE char device, or a FUSE file.

A transport has ``name``, ``device_path``, ``session_node_path``, ``async start()`` (raises
``TransportError`` with a one-line reason) and ``async stop()`` (idempotent,
removes everything it created).  ``connection`` is its ``fuse.wire.Connection``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..fuse.wire import Connection


class Transport(Protocol):
    """What the server asks of a front end (``CuseTransport``, ``FuseFileTransport``)."""

    name: str
    device_path: str
    #: the FUSE connection serving the node, once started
    connection: Connection | None
    #: the node of the files the handler makes (session fds); None when it makes none
    session_node_path: str | None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class TransportError(Exception):
    """A transport cannot start; the message is one line for the user."""
