"""A typed client for /dev/liveupdate: works against the emulator and a real v3 kernel alike.

It is only ioctls: structs are built and decoded with the cffi cdefs, errors
come back as ``OSError`` with the kernel's errno.  ``ioctl()`` and
``ioctl_raw()`` are the escape hatches for malformed-input tests (any command
number, any struct bytes, any pointer).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from . import uapi
from .core import Event, State

__all__ = ["Event", "LiveUpdateDevice", "State"]

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int


def _ctype(name: str) -> str:
    return f"struct liveupdate_ioctl_{name}"


class LiveUpdateDevice:
    """An open /dev/liveupdate.  Use as a context manager; ``close()`` drops outgoing files."""

    def __init__(self, path: str = "/dev/liveupdate", flags: int = os.O_RDWR):
        self.path = path
        self.fd = os.open(path, flags | os.O_CLOEXEC)

    def __enter__(self) -> LiveUpdateDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fileno(self) -> int:
        return self.fd

    # -- escape hatches --------------------------------------------------------------------------
    def ioctl_raw(self, cmd: int, arg: int) -> int:
        """ioctl(fd, cmd, arg) with ``arg`` as a raw pointer value; raises OSError on -1."""
        r = _ioctl(self.fd, cmd & 0xFFFFFFFF, arg)
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return r

    def ioctl(self, cmd: int, arg: Any) -> int:
        """ioctl with a cffi struct pointer (``uapi.ffi.new(...)``) or a writable buffer."""
        if isinstance(arg, uapi.ffi.CData):
            ptr = int(uapi.ffi.cast("uintptr_t", arg))
            return self.ioctl_raw(cmd, ptr)
        buf = (ctypes.c_char * len(arg)).from_buffer(arg)
        return self.ioctl_raw(cmd, ctypes.addressof(buf))

    def _call(self, cmd: int, name: str, **fields: int) -> Any:
        s = uapi.ffi.new(_ctype(name) + " *")
        s.size = uapi.ffi.sizeof(_ctype(name))
        for k, v in fields.items():
            setattr(s, k, v)
        self.ioctl(cmd, s)
        return s

    # -- typed calls -----------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return State(self._call(uapi.LIVEUPDATE_IOCTL_GET_STATE, "get_state").state)

    def set_event(self, event: int) -> None:
        self._call(uapi.LIVEUPDATE_IOCTL_SET_EVENT, "set_event", event=int(event))

    def prepare(self) -> None:
        self.set_event(Event.PREPARE)

    def cancel(self) -> None:
        self.set_event(Event.CANCEL)

    def finish(self) -> None:
        self.set_event(Event.FINISH)

    def preserve(self, fd: int, token: int) -> None:
        self._call(uapi.LIVEUPDATE_IOCTL_FD_PRESERVE, "fd_preserve", fd=fd, token=token)

    def unpreserve(self, token: int) -> None:
        self._call(uapi.LIVEUPDATE_IOCTL_FD_UNPRESERVE, "fd_unpreserve", token=token)

    def restore(self, token: int) -> int:
        """A new O_CLOEXEC fd for the incoming file ``token`` (needs `cusedev run` on the emulator)."""
        return int(self._call(uapi.LIVEUPDATE_IOCTL_FD_RESTORE, "fd_restore", token=token).fd)

    def fd_state(self, token: int, incoming: bool = False) -> State:
        s = self._call(
            uapi.LIVEUPDATE_IOCTL_GET_FD_STATE, "get_fd_state", token=token, incoming=int(incoming)
        )
        return State(s.state)

    def set_fd_event(self, token: int, event: int) -> None:
        self._call(uapi.LIVEUPDATE_IOCTL_SET_FD_EVENT, "set_fd_event", token=token, event=int(event))
