"""Reach into the calling process: its thread group, and its fds (pidfd_open + pidfd_getfd).

Only ever used on the process that made the current request, with the fd it
passed (issue 7's rule); nothing here walks other processes.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438


def tgid_of(tid: int) -> int:
    """The thread-group id of thread ``tid`` (pidfd_open wants the leader)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    raise ProcessLookupError(errno.ESRCH, "no such process")


def pidfd_open(pid: int) -> int:
    fd = _syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def getfd(tid: int, fd: int) -> int:
    """A duplicate, in this process, of fd ``fd`` of the thread ``tid``'s process (O_CLOEXEC).

    Raises ``OSError(EBADF)`` when the fd is not open there, like the kernel's fdget.
    """
    if fd < 0:
        raise OSError(errno.EBADF, "Bad file descriptor")
    pfd = pidfd_open(tgid_of(tid))
    try:
        new = _syscall(SYS_PIDFD_GETFD, ctypes.c_int(pfd), ctypes.c_int(fd), ctypes.c_uint(0))
        if new < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return new
    finally:
        os.close(pfd)
