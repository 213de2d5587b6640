"""A typed client for the session ABI: the emulator (under `cusedev run`) and a 6.19/7.2 kernel alike.

``SessionDevice`` is an open /dev/liveupdate; ``create_session`` and
``retrieve_session`` give ``LuoSession`` objects, each owning its session fd
(closing it is the session's release: outgoing sessions are torn down,
retrieved ones finished).  Errors are ``OSError`` with the kernel's errno;
``call`` is the escape hatch for malformed-input tests.
"""

from __future__ import annotations

import ctypes
import os
from typing import TypeVar

from ...libc import libc
from . import uapi

__all__ = ["LuoSession", "SessionDevice", "call"]

_ioctl = libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int


def call(fd: int, cmd: int, buf: bytearray | None) -> bytearray | None:
    """ioctl(fd, cmd, buf) with ``buf`` written back in place (None passes a NULL pointer)."""
    if buf is None:
        r = _ioctl(fd, cmd & 0xFFFFFFFF, None)
    else:
        cbuf = (ctypes.c_char * len(buf)).from_buffer(buf)
        r = _ioctl(fd, cmd & 0xFFFFFFFF, ctypes.addressof(cbuf))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return buf


def _name(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return raw.ljust(uapi.NAME_LENGTH, b"\0")[: uapi.NAME_LENGTH]


_F = TypeVar("_F", bound="_OwnedFd")


class _OwnedFd:
    """An fd this object owns: a context manager, closed once (what closing means is the subclass's)."""

    fd: int

    def __enter__(self: _F) -> _F:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LuoSession(_OwnedFd):
    """One session fd.  ``close()`` releases the session (the kernel's effect: see the module text)."""

    def __init__(self, fd: int):
        self.fd = fd

    def preserve(self, fd: int, token: int) -> None:
        """PRESERVE_FD: hand the memfd ``fd`` to this outgoing session under ``token``."""
        c = uapi.PRESERVE_FD
        call(self.fd, c.cmd, bytearray(c.struct.pack(c.size, fd, token)))

    def retrieve(self, token: int) -> int:
        """RETRIEVE_FD: a new O_CLOEXEC fd of the carried file ``token``."""
        c = uapi.RETRIEVE_FD
        buf = call(self.fd, c.cmd, bytearray(c.struct.pack(c.size, -1, token)))
        assert buf is not None
        return int(c.struct.unpack(buf)[1])

    def finish(self, reserved: int = 0) -> None:
        """FINISH: done with this retrieved session; files not retrieved are dropped."""
        c = uapi.FINISH
        call(self.fd, c.cmd, bytearray(c.struct.pack(c.size, reserved)))

    @property
    def name(self) -> str:
        """GET_NAME (7.2)."""
        c = uapi.GET_NAME
        buf = call(self.fd, c.cmd, bytearray(c.struct.pack(c.size, 0, b"")))
        assert buf is not None
        return bytes(c.struct.unpack(buf)[2]).split(b"\0", 1)[0].decode()


class SessionDevice(_OwnedFd):
    """An open /dev/liveupdate speaking the session ABI; closing it changes no session (they live on
    through their fds)."""

    def __init__(self, path: str = "/dev/liveupdate", flags: int = os.O_RDWR):
        self.path = path
        self.fd = os.open(path, flags | os.O_CLOEXEC)

    def _session_call(self, c: uapi.Command, name: str | bytes) -> LuoSession:
        buf = call(self.fd, c.cmd, bytearray(c.struct.pack(c.size, -1, _name(name))))
        assert buf is not None
        return LuoSession(int(c.struct.unpack(buf)[1]))

    def create_session(self, name: str | bytes) -> LuoSession:
        """CREATE_SESSION: a new outgoing session (needs `cusedev run` on the emulator)."""
        return self._session_call(uapi.CREATE_SESSION, name)

    def retrieve_session(self, name: str | bytes) -> LuoSession:
        """RETRIEVE_SESSION: a session carried by the last live update."""
        return self._session_call(uapi.RETRIEVE_SESSION, name)
