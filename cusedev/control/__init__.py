"""The control plane: server, runtime (kexec, `cusedev run` supervision), control socket,
state dir, sysfs tree and runtime paths.

``cusedev.control`` itself keeps the control socket's client side (``request``, ``connect``,
``ControlError``), which scripts and tests use.
"""

from .channel import ControlError, connect, peer_ids, receive, request, send

__all__ = ["ControlError", "connect", "peer_ids", "receive", "request", "send"]
