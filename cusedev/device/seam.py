"""The seam between transports and the device: what a front end calls, and what it hands in.

A transport (CUSE, FUSE file) only translates kernel requests into calls on a
``DeviceHandler`` and the results back into replies; it never knows which ABI
profile answers (swtpm's one core behind several front ends).  The handler
reaches the caller's memory only through a ``CallerMemory`` the transport
provides, so the same ABI code runs over CUSE retry iovecs or process_vm_*.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True, frozen=True)
class Caller:
    """Who made a request, from the FUSE request header."""

    tid: int  # calling *thread* id (fuse_in_header.pid)
    uid: int
    gid: int


class NeedRetry(Exception):
    """Raised by a retry-based ``CallerMemory``: ask the kernel to resend with these ranges.

    The ABI layer never catches it; the CUSE transport turns it into a
    FUSE_IOCTL_RETRY reply and re-runs the whole dispatch when the data arrives.
    Dispatch is side-effect free until every range it needs has been declared.
    """

    def __init__(self, in_ranges: list[tuple[int, int]], out_ranges: list[tuple[int, int]]):
        super().__init__(in_ranges, out_ranges)
        self.in_ranges = in_ranges
        self.out_ranges = out_ranges


class CallerMemory(Protocol):
    """The calling process's memory for one ioctl (umockdev's ``resolve``)."""

    #: every access reaches the caller at once, so ``declare`` has nothing to do (dispatch skips it)
    direct: bool

    def read(self, addr: int, length: int) -> bytes:
        """Bytes at ``addr``; ``OSError(EFAULT)`` when unreadable."""

    def peek(self, addr: int, want: int, need: int) -> bytes:
        """At least ``need`` bytes at ``addr`` and up to ``want`` if they are readable.

        Lets a direct backend fetch a whole struct in one syscall while the size
        word alone decides EFAULT; a retry backend just asks for ``need``.
        """

    def declare(self, in_range: tuple[int, int], out_range: tuple[int, int] | None) -> None:
        """Announce the whole input and output ranges before the handler runs.

        A no-op for direct backends; a retry backend raises ``NeedRetry`` until
        the kernel has delivered ``in_range`` and accepted ``out_range``.
        """

    def write(self, addr: int, data: bytes | bytearray) -> None:
        """Store ``data`` at ``addr`` (within the declared out range); EFAULT when unwritable."""


#: the node a client opens (``/dev/liveupdate``)
DEVICE_NODE = "device"
#: the node of the files the profile makes (session fds): only the emulator's own opens succeed there
SESSION_NODE = "session"


class DeviceHandler(Protocol):
    """What a transport calls.  Errors are ``OSError`` with the errno to give the caller."""

    def open(self, caller: Caller, flags: int, node: str = DEVICE_NODE) -> int:
        """A new open file description of ``node`` (``DEVICE_NODE`` or ``SESSION_NODE``); returns its fh."""

    def release(self, fh: int) -> None:
        """The last reference to the description is gone (close or process death)."""

    def ioctl(self, fh: int, caller: Caller, cmd: int, arg: int, mem: CallerMemory) -> int | Awaitable[int]:
        """Run one ioctl; returns the ioctl's return value, or an awaitable of it."""

    def read(self, fh: int, caller: Caller, size: int) -> bytes:
        """read(2) on the device."""

    def write(self, fh: int, caller: Caller, data: bytes) -> int:
        """write(2) on the device."""


class FdInstaller(Protocol):
    """Puts a new fd into a caller, as the kernel's fd_install would (seccomp ADDFD in practice)."""

    def reserve(self, caller: Caller) -> None:
        """Fail with EMFILE (or the kernel's errno) when the caller has no free fd."""

    def install(self, caller: Caller, fd: int) -> int:
        """Install a dup of our ``fd`` with O_CLOEXEC in the caller; returns its number there."""


def einval() -> OSError:
    return OSError(errno.EINVAL, "Invalid argument")
