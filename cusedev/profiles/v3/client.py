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

from ...libc import function
from . import uapi
from .model import Event, State

__all__ = ["Event", "LiveUpdateDevice", "State", "new_struct"]

_ioctl = function("ioctl", (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p))


def _ctype(name: str) -> str:
    return f"struct liveupdate_ioctl_{name}"


def new_struct(name: str, size: int | None = None, **fields: int) -> Any:
    """A zeroed ``struct liveupdate_ioctl_<name>`` (cffi pointer) for ``LiveUpdateDevice.ioctl``.

    ``size`` defaults to the real ``sizeof``; pass another value to test the
    kernel's size checks (EINVAL below min_size, E2BIG for a non-zero tail).
    """
    s = uapi.ffi.new(_ctype(name) + " *")
    s.size = uapi.ffi.sizeof(_ctype(name)) if size is None else size
    for k, v in fields.items():
        setattr(s, k, v)
    return s


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
        s = new_struct(name, **fields)
        self.ioctl(cmd, s)
        return s

    # -- typed calls -----------------------------------------------------------------------------
    @property
    def state(self) -> State:
        """GET_STATE: the global state."""
        return State(self._call(uapi.LIVEUPDATE_IOCTL_GET_STATE, "get_state").state)

    def set_event(self, event: int) -> None:
        """SET_EVENT with any value (``Event`` member or a raw int, e.g. FREEZE → EINVAL)."""
        self._call(uapi.LIVEUPDATE_IOCTL_SET_EVENT, "set_event", event=int(event))

    def prepare(self) -> None:
        """SET_EVENT(PREPARE): NORMAL → PREPARED (EINVAL elsewhere; EEXIST if KHO was finalized)."""
        self.set_event(Event.PREPARE)

    def cancel(self) -> None:
        """SET_EVENT(CANCEL): PREPARED/FROZEN → NORMAL (ENOENT when KHO is not finalized)."""
        self.set_event(Event.CANCEL)

    def finish(self) -> None:
        """SET_EVENT(FINISH): UPDATED → NORMAL; incoming files never restored are dropped."""
        self.set_event(Event.FINISH)

    def preserve(self, fd: int, token: int) -> None:
        """FD_PRESERVE: register a memfd (or unlinked tmpfs file) ``fd`` of this process under ``token``."""
        self._call(uapi.LIVEUPDATE_IOCTL_FD_PRESERVE, "fd_preserve", fd=fd, token=token)

    def unpreserve(self, token: int) -> None:
        """FD_UNPRESERVE: drop the outgoing file ``token``."""
        self._call(uapi.LIVEUPDATE_IOCTL_FD_UNPRESERVE, "fd_unpreserve", token=token)

    def restore(self, token: int) -> int:
        """A new O_CLOEXEC fd for the incoming file ``token`` (needs `cusedev run` on the emulator)."""
        return int(self._call(uapi.LIVEUPDATE_IOCTL_FD_RESTORE, "fd_restore", token=token).fd)

    def fd_state(self, token: int, incoming: bool = False) -> State:
        """GET_FD_STATE of an outgoing (or, with ``incoming=True``, incoming) file."""
        s = self._call(
            uapi.LIVEUPDATE_IOCTL_GET_FD_STATE, "get_fd_state", token=token, incoming=int(incoming)
        )
        return State(s.state)

    def set_fd_event(self, token: int, event: int) -> None:
        """SET_FD_EVENT: one file's PREPARE/FREEZE/CANCEL (outgoing) or FINISH (incoming)."""
        self._call(uapi.LIVEUPDATE_IOCTL_SET_FD_EVENT, "set_fd_event", token=token, event=int(event))
