"""Moving fds between a caller and the emulator: pidfd_getfd in, seccomp ADDFD out, per trapped call.

In: ``take_fd`` duplicates a caller's fd into the emulator (the kernel's ``fdget``).
Out: FUSE cannot install an fd in a caller; a seccomp listener can.  Under
`cusedev run` the profile's fd-returning commands are trapped; the runtime
re-issues each from a worker thread on a copy of the caller's fd, with the
call's ``cookie`` as the argument, so that the request reaches the caller's
own open file through the kernel.  The device finds the ``TrappedCall`` by
its cookie and runs it with the real caller, its memory and an
``FdInstaller`` bound to the notification.  Each trapped call has its own
context, created and dropped on the loop thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..libc import fail, function
from . import pidfd
from .memfd import check_usable
from .seam import Caller, CallerMemory, FdInstaller

_ioctl = function("ioctl", (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong))

#: trapped-call cookies: a range no user pointer reaches on x86_64 (canonical user addresses < 2**47)
_COOKIE_BASE = 0xC05E_DE00_0000_0000
_cookies = itertools.count(1)


def take_fd(caller: Caller, fd: int) -> int:
    """Our duplicate (O_CLOEXEC) of the caller's ``fd``; EBADF when not open there or an O_PATH fd."""
    try:
        ours = pidfd.getfd(caller.tid, fd)
    except OSError as e:
        raise fail(errno.EBADF) from e
    check_usable(ours)
    return ours


class Notification(Protocol):
    """The part of ``cusedev.run.seccomp.Notification`` an installer needs."""

    def addfd(self, srcfd: int, newfd_flags: int = ...) -> int: ...


class SeccompInstaller:
    """Installs into a process stopped in a seccomp notification (SECCOMP_IOCTL_NOTIF_ADDFD)."""

    def __init__(self, notification: Notification):
        self.n = notification

    def reserve(self, caller: Caller) -> None:
        """The kernel takes an fd number before any check: EMFILE when the table is full."""
        try:
            st = pidfd.status_values(caller.tid, (b"Tgid:", b"FDSize:"))
            tgid = st[b"Tgid:"]
            soft, _hard = resource.prlimit(tgid, resource.RLIMIT_NOFILE)
            # Every fd number from the table's size up is free: if that size is below the limit a
            # number is left, and the O(open fds) listing below (quadratic over a restore-all of
            # thousands of fds) is not needed.
            if soft == resource.RLIM_INFINITY or st[b"FDSize:"] < soft:
                return
            used = len(os.listdir(f"/proc/{tgid}/fd"))
        except OSError:
            return
        if soft != resource.RLIM_INFINITY and used >= soft:
            raise fail(errno.EMFILE)

    def install(self, caller: Caller, fd: int) -> int:
        return int(self.n.addfd(fd, os.O_CLOEXEC))


@dataclass(eq=False)
class TrappedCall:
    """One fd-returning ioctl of a `cusedev run` process, on its way through the emulator."""

    caller: Caller
    memory: CallerMemory
    installer: FdInstaller
    #: the caller's own ioctl argument (the re-issued call carries ``cookie`` instead)
    arg: int
    cookie: int = field(default_factory=lambda: _COOKIE_BASE | next(_cookies))
    #: the device's work for it when a handler completes later (cancelled if the caller dies)
    task: asyncio.Future[Any] | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """The trapped task died: stop the work done for it (its reply is then EINTR, read by nobody)."""
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()


def reissue(fd: int, cmd: int, cookie: int) -> int:
    """In a worker thread: ioctl(fd, cmd, cookie) on our copy of the caller's fd; 0 or the errno."""
    if _ioctl(fd, cmd & 0xFFFFFFFF, cookie) < 0:
        return ctypes.get_errno()
    return 0


def reissue_and_close(fd: int, cmd: int, cookie: int, ours: Callable[[int], bool]) -> int | None:
    """In one worker thread: check, re-issue and close our copy ``fd`` of the caller's fd.

    One hop instead of three: each hand-off to a worker costs about as much as
    a plain ioctl round trip.  None when ``fd`` is not an open file of our node
    (the caller's ioctl then goes on to the kernel).  The close is here, not on
    the loop, because it may be the last reference of a CUSE file, whose
    RELEASE only the loop answers; it comes before the reply so that a caller
    closing its fd right after sees the release at once, as with the kernel.
    """
    try:
        if not ours(fd):
            return None
        return reissue(fd, cmd, cookie)
    finally:
        os.close(fd)
